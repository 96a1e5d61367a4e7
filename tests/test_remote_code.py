"""The Hub round trip: a folder saved by model and processor loads with `trust_remote_code=True` in a fresh Python
process where neither `modeling_mqirtn` nor `processing` is importable, and gives the same outputs (<= 1e-5).

One subprocess loads the folders of every composition variant (starting Python + transformers dominates the cost).
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ALL_COMPOSITIONS, BLOCK_OUR_PACKAGES, tiny_model, tiny_processor

from modeling_mqirtn import MQIRTNModel


CODE_FILES = {"configuration_mqirtn.py", "modeling_mqirtn.py", "fusion_mqirtn.py", "composition_mqirtn.py", "losses_mqirtn.py"}

# Runs in the fresh process. Inputs are built there from plain data so nothing of ours is needed to make them.
# The child first records whether our packages would be found, then blocks them (a Hub user without this repository).
CHILD_SCRIPT = textwrap.dedent(
    '''
    import importlib.util
    OUR_PACKAGES = ("modeling_mqirtn", "processing")
    found = {name: importlib.util.find_spec(name) is not None for name in OUR_PACKAGES}
    '''
) + BLOCK_OUR_PACKAGES + textwrap.dedent(
    '''
    import json, os, sys
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    def make_inputs():
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)) for _ in range(3)]
        images[1] = images[1].convert("L")
        targets = [Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8), mode="RGBA") for _ in range(3)]
        return dict(images=images, text=["make it blue", "", "add a red circle to the left"], target_images=targets)

    results = {"found_before_blocking": found}
    for folder in sys.argv[1:]:
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        batch = processor(**make_inputs(), return_tensors="pt")
        with torch.no_grad():
            out = model(**batch, return_loss=True)
        tensors = {name: value for name, value in batch.items()}
        tensors.update({name: getattr(out, name) for name in ("query_embeds", "target_embeds", "logits_per_query", "loss")})
        torch.save(tensors, os.path.join(folder, "child_outputs.pt"))
        results[folder] = {
            "model_class": f"{type(model).__module__}.{type(model).__name__}",
            "processor_class": f"{type(processor).__module__}.{type(processor).__name__}",
        }
    try:
        import modeling_mqirtn  # noqa: F401
        results["still_blocked"] = {"modeling_mqirtn": False}
    except ImportError:
        results["still_blocked"] = {"modeling_mqirtn": True}
    print("RESULTS" + json.dumps(results))
    '''
)


def parent_inputs():
    """The same inputs as `make_inputs` in the child."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)) for _ in range(3)]
    images[1] = images[1].convert("L")
    targets = [Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8), mode="RGBA") for _ in range(3)]
    return dict(images=images, text=["make it blue", "", "add a red circle to the left"], target_images=targets)


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    processor = tiny_processor(tmp_path_factory.mktemp("vocab"))
    folders = {}
    for seed, composition in enumerate(ALL_COMPOSITIONS):
        folder = root / composition
        model = tiny_model(composition, seed=seed, loss_type="soft_triplet" if composition == "tirg" else "batch_based_classification")
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        folders[composition] = folder
    return folders, processor


@pytest.fixture(scope="module")
def child_results(saved_folders, tmp_path_factory):
    folders, _ = saved_folders
    workdir = tmp_path_factory.mktemp("elsewhere")  # not the repository: nothing of ours on the path
    script = workdir / "load_from_hub_folder.py"
    script.write_text(CHILD_SCRIPT)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_MODULES_CACHE=str(workdir / "hf_modules"),  # remote code is copied here, not into the user's cache
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    completed = subprocess.run(
        [sys.executable, str(script), *map(str, folders.values())],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULTS"))
    return json.loads(line[len("RESULTS") :])


def test_saved_folder_holds_code_and_auto_map(saved_folders):
    folder = saved_folders[0]["mqirtn"]
    files = set(os.listdir(folder))
    assert CODE_FILES <= files, CODE_FILES - files
    assert "processing_mqirtn.py" in files and "model.safetensors" in files
    assert not any(name.endswith(".bin") for name in files)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mqirtn"
    assert config["auto_map"]["AutoConfig"] == "configuration_mqirtn.MQIRTNConfig"
    assert config["auto_map"]["AutoModel"] == "modeling_mqirtn.MQIRTNModel"
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_mqirtn.MQIRTNProcessor"
    # Hub code imports siblings only as `from .x import Y`, never our packages.
    for name in CODE_FILES | {"processing_mqirtn.py"}:
        source = (folder / name).read_text()
        assert not re.search(r"^\s*(from|import)\s+(modeling_mqirtn|processing)\b", source, re.MULTILINE), name


@pytest.mark.slow
def test_fresh_process_cannot_import_our_packages(child_results):
    # The child is a Hub user without this repository: PYTHONPATH unset, another working directory, and a finder that
    # refuses our packages even where they are pip-installed into the environment (as `scripts/install.sh` does).
    # Loading must still work there, so the saved folder is self-contained.
    assert set(child_results["found_before_blocking"]) == {"modeling_mqirtn", "processing"}
    assert child_results["still_blocked"] == {"modeling_mqirtn": True}


@pytest.mark.slow
@pytest.mark.parametrize("composition", ALL_COMPOSITIONS)
def test_fresh_process_round_trip_gives_the_same_outputs(saved_folders, child_results, composition):
    folders, processor = saved_folders
    folder = folders[composition]
    info = child_results[str(folder)]
    assert info["model_class"].startswith("transformers_modules.") and info["model_class"].endswith(".MQIRTNModel")
    assert info["processor_class"].startswith("transformers_modules.") and info["processor_class"].endswith(".MQIRTNProcessor")
    child = torch.load(folder / "child_outputs.pt", weights_only=True)
    batch = processor(**parent_inputs(), return_tensors="pt")
    for name, value in batch.items():  # the remote processor prepares the same tensors
        assert (child[name] - value).abs().max().item() <= 1e-5, name
    model = MQIRTNModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(**batch, return_loss=True)
    for name in ("query_embeds", "target_embeds", "logits_per_query", "loss"):
        assert (child[name] - getattr(out, name)).abs().max().item() <= 1e-5, name
