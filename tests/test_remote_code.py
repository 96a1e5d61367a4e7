"""The Hub round trip: a folder saved by model and processor (`save_pretrained`, or `push_to_hub` into a stand-in that
records the upload) loads with `trust_remote_code=True` in a fresh Python process where neither `modeling_mqirtn` nor
`processing` is importable, through AutoModel, AutoProcessor and `pipeline("composed-image-retrieval")`, and gives the
same outputs (<= 1e-5).

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

from modeling_mqirtn import MQIRTNModel
from mqirtn_app.model_card import write_model_card

from utils import ALL_COMPOSITIONS, BLOCK_OUR_PACKAGES, tiny_model, tiny_processor


CODE_FILES = {
    "configuration_mqirtn.py",
    "modeling_mqirtn.py",
    "fusion_mqirtn.py",
    "composition_mqirtn.py",
    "losses_mqirtn.py",
}

# Runs in the fresh process. Inputs are built there from plain data so nothing of ours is needed to make them.
# The child first records whether our packages would be found, then blocks them (a Hub user without this repository).
CHILD_SCRIPT = (
    textwrap.dedent(
        """
    import importlib.util
    OUR_PACKAGES = ("modeling_mqirtn", "processing")
    found = {name: importlib.util.find_spec(name) is not None for name in OUR_PACKAGES}
    """
    )
    + BLOCK_OUR_PACKAGES
    + textwrap.dedent(
        """
    import json, os, sys
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor, pipeline

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
        card_path = os.path.join(folder, "README.md")  # train.py's card (push_to_hub writes a bare one)
        tag = None
        if os.path.exists(card_path):
            from huggingface_hub import ModelCard

            tag = ModelCard.load(card_path).data.pipeline_tag
        if tag is not None:
            # The card's pipeline tag, as the Hub's widget and "Use this model" snippet call it.
            extractor = pipeline(tag, model=folder, trust_remote_code=True)
            tensors["card_pipeline_features"] = extractor(make_inputs()["images"][0], return_tensors=True)
            results[folder + ":card"] = {
                "tag": tag,
                "pipeline_class": f"{type(extractor).__module__}.{type(extractor).__name__}",
                "as_list": extractor(make_inputs()["images"][0]),
            }
            torch.save(tensors, os.path.join(folder, "child_outputs.pt"))
        pipe = pipeline("composed-image-retrieval", model=folder, trust_remote_code=True)
        hits = pipe(image=make_inputs()["images"][0], text="make it blue", gallery=out.target_embeds, top_k=2)
        results[folder] = {
            "model_class": f"{type(model).__module__}.{type(model).__name__}",
            "processor_class": f"{type(processor).__module__}.{type(processor).__name__}",
            "pipeline_class": f"{type(pipe).__module__}.{type(pipe).__name__}",
            "pipeline_hits": [hit["index"] for hit in hits],
        }
    try:
        import modeling_mqirtn  # noqa: F401
        results["still_blocked"] = {"modeling_mqirtn": False}
    except ImportError:
        results["still_blocked"] = {"modeling_mqirtn": True}
    print("RESULTS" + json.dumps(results))
    """
    )
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


class RecordingHubApi:
    """Stands in for transformers' shared `HfApi`: `create_repo` answers, `create_commit` copies the uploaded files
    into `folder` (what the repository would hold) and records the calls."""

    def __init__(self, folder):
        self.folder, self.calls = folder, []

    def create_repo(self, repo_id, private=None, token=None, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, sorted(op.path_in_repo for op in operations)))
        for operation in operations:
            destination = self.folder / operation.path_in_repo
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(open(operation.path_or_fileobj, "rb").read())


def push_with_stand_in(model, processor, folder, monkeypatch_context):
    """`model.push_to_hub` + `processor.push_to_hub` (as a Hub user publishes) into a `RecordingHubApi` that writes
    the uploaded files to `folder`; returns the stand-in."""
    import transformers.utils.hub as transformers_hub
    from huggingface_hub import ModelCard, ModelCardData

    api = RecordingHubApi(folder)
    monkeypatch_context.setattr(transformers_hub, "_hf_api", api)
    # The card lookup would ask the Hub whether a card exists: answer "no card yet" offline.
    monkeypatch_context.setattr(
        transformers_hub,
        "create_and_tag_model_card",
        lambda repo_id, tags=None, token=None: ModelCard.from_template(ModelCardData()),
    )
    model.push_to_hub("someone/mqirtn-pushed")
    processor.push_to_hub("someone/mqirtn-pushed")
    return api


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    processor = tiny_processor(tmp_path_factory.mktemp("vocab"))
    folders = {}
    for seed, composition in enumerate(ALL_COMPOSITIONS):
        folder = root / composition
        model = tiny_model(
            composition, seed=seed, loss_type="soft_triplet" if composition == "tirg" else "batch_based_classification"
        )
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        folders[composition] = folder
    # The model card train.py writes, in one folder: its pipeline tag is loaded in the fresh process.
    write_model_card(folders["mqirtn"], {}, {"steps": 1}, dataset="shapes", composition="mqirtn")
    with pytest.MonkeyPatch.context() as patch:
        push_with_stand_in(tiny_model(seed=99), processor, root / "pushed", patch)
    folders["pushed"] = root / "pushed"
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


@pytest.mark.parametrize("how", ["save_pretrained", "push_to_hub"])
def test_saved_folder_holds_code_and_auto_map(saved_folders, how):
    folder = saved_folders[0]["mqirtn" if how == "save_pretrained" else "pushed"]
    files = set(os.listdir(folder))
    assert CODE_FILES | {"pipeline_mqirtn.py"} <= files, CODE_FILES - files
    assert "processing_mqirtn.py" in files and "model.safetensors" in files
    assert not any(name.endswith(".bin") for name in files)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mqirtn"
    assert config["auto_map"]["AutoConfig"] == "configuration_mqirtn.MQIRTNConfig"
    assert config["auto_map"]["AutoModel"] == "modeling_mqirtn.MQIRTNModel"
    # What `pipeline(task, model=folder, trust_remote_code=True)` reads to find the task's class.
    assert config["custom_pipelines"] == {
        "composed-image-retrieval": {
            "impl": "pipeline_mqirtn.ComposedImageRetrievalPipeline",
            "pt": ["AutoModel"],
            "type": "multimodal",
        },
        "image-feature-extraction": {
            "impl": "pipeline_mqirtn.MQIRTNImageFeatureExtractionPipeline",
            "pt": ["AutoModel"],
            "type": "image",
        },
    }
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_mqirtn.MQIRTNProcessor"
    # Hub code imports siblings only as `from .x import Y`, never our packages.
    for name in CODE_FILES | {"processing_mqirtn.py", "pipeline_mqirtn.py"}:
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
    assert info["processor_class"].startswith("transformers_modules.") and info["processor_class"].endswith(
        ".MQIRTNProcessor"
    )
    child = torch.load(folder / "child_outputs.pt", weights_only=True)
    assert info["pipeline_class"].startswith("transformers_modules.")
    assert info["pipeline_class"].endswith(".ComposedImageRetrievalPipeline")
    assert info["pipeline_hits"] == (child["query_embeds"][:1] @ child["target_embeds"].T).topk(2).indices[0].tolist()
    batch = processor(**parent_inputs(), return_tensors="pt")
    for name, value in batch.items():  # the remote processor prepares the same tensors
        assert (child[name] - value).abs().max().item() <= 1e-5, name
    model = MQIRTNModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(**batch, return_loss=True)
    for name in ("query_embeds", "target_embeds", "logits_per_query", "loss"):
        assert (child[name] - getattr(out, name)).abs().max().item() <= 1e-5, name


@pytest.mark.slow
def test_pushed_folder_serves_the_pipeline_in_a_fresh_process(saved_folders, child_results):
    folders, processor = saved_folders
    folder = folders["pushed"]
    info = child_results[str(folder)]
    assert info["pipeline_class"].startswith("transformers_modules.")
    assert info["pipeline_class"].endswith(".ComposedImageRetrievalPipeline")
    child = torch.load(folder / "child_outputs.pt", weights_only=True)
    assert info["pipeline_hits"] == (child["query_embeds"][:1] @ child["target_embeds"].T).topk(2).indices[0].tolist()
    model = MQIRTNModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(**processor(**parent_inputs(), return_tensors="pt"))
    assert (child["query_embeds"] - out.query_embeds).abs().max().item() <= 1e-5


def test_push_to_hub_uploads_model_processor_and_pipeline_code(tmp_path, processor, monkeypatch):
    api = push_with_stand_in(tiny_model(), processor, tmp_path / "repo", monkeypatch)
    commits = [call for call in api.calls if call[0] == "create_commit"]
    assert len(commits) == 2  # the model's and the processor's
    model_files, processor_files = commits[0][2], commits[1][2]
    assert {"config.json", "model.safetensors", "pipeline_mqirtn.py", "modeling_mqirtn.py"} <= set(model_files)
    assert "processor_config.json" in processor_files and "processing_mqirtn.py" in processor_files
    assert "custom_pipelines" in json.loads((tmp_path / "repo" / "config.json").read_text())


@pytest.mark.slow
def test_the_cards_pipeline_tag_serves_gallery_embeddings_in_a_fresh_process(saved_folders, child_results):
    """`pipeline(card.data.pipeline_tag, model=folder, trust_remote_code=True)`, as the Hub's widget and snippet call
    the card's tag, gives the image's gallery embedding (`get_image_features(...).pooler_output`)."""
    folders, processor = saved_folders
    folder = folders["mqirtn"]
    info = child_results[str(folder) + ":card"]
    assert info["tag"] == "image-feature-extraction"
    assert info["pipeline_class"].startswith("transformers_modules.")
    assert info["pipeline_class"].endswith(".MQIRTNImageFeatureExtractionPipeline")
    child = torch.load(folder / "child_outputs.pt", weights_only=True)["card_pipeline_features"]
    model = MQIRTNModel.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = model.get_image_features(**processor(images=parent_inputs()["images"][:1])).pooler_output
    assert child.shape == (1, model.config.projection_dim)
    assert (child - expected).abs().max().item() <= 1e-5
    assert torch.allclose(child.norm(dim=-1), torch.ones(1), atol=1e-5)  # L2-normalised
    assert (torch.tensor(info["as_list"]) - expected).abs().max().item() <= 1e-5  # the default output: nested lists


def test_device_map_loads_the_same_model(saved_folders):
    """`from_pretrained(..., device_map=...)` (which the card says needs `accelerate`, installed here) places the model
    and gives the same query embeddings as a plain load."""
    folders, processor = saved_folders
    plain = MQIRTNModel.from_pretrained(folders["mqirtn"]).eval()
    mapped = MQIRTNModel.from_pretrained(folders["mqirtn"], device_map="cpu").eval()
    assert {parameter.device.type for parameter in mapped.parameters()} == {"cpu"}
    batch = processor(**{k: v for k, v in parent_inputs().items() if k != "target_images"})
    with torch.no_grad():
        expected = plain.get_query_features(**batch).pooler_output
        torch.testing.assert_close(mapped.get_query_features(**batch).pooler_output, expected)
