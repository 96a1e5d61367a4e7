"""Damaged files and impossible settings give the `mqirtn` CLI one line on stderr and a non-zero exit, never a
traceback: truncated or garbage weights, weights lacking layers, damaged index files, an unreachable URL, --out a file.
(train.py's cases: tests/test_train_errors.py.)"""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from modeling_mqirtn import save_for_hub
from mqirtn_app.cli import main

from utils import one_error_line, tiny_model, tiny_processor, write_image_folder, write_index_json


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    save_for_hub(tiny_model().eval(), tiny_processor(root), root / "model")
    images = write_image_folder(root / "images", 3)
    assert main(["index", "--model", str(root / "model"), "--images", str(root / "images"), "--out", str(root / "index"),
                 "--no-progress"]) == 0  # fmt: skip
    return {"root": root, "query": str(images[0])}


def damaged_model(root, name, damage):
    folder = root / name
    shutil.copytree(root / "model", folder, dirs_exist_ok=True)
    weights = folder / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"not safetensors" * 10)
    elif damage == "missing_layers":
        tensors = {key: value for key, value in load_file(str(weights)).items() if "fusion" not in key}
        save_file(tensors, str(weights), metadata={"format": "pt"})
    return folder


def damaged_index(root, name, damage):
    folder = root / name
    shutil.copytree(root / "index", folder, dirs_exist_ok=True)
    meta_path, embeddings = folder / "index.json", folder / "embeddings.safetensors"
    meta = json.loads(meta_path.read_text())
    if damage == "truncated_embeddings":
        embeddings.write_bytes(embeddings.read_bytes()[:100])
        del meta["files"]  # as an older version wrote it: the file itself must be refused
    elif damage == "embeddings_of_another_save":
        embeddings.write_bytes(embeddings.read_bytes()[:100])
    elif damage == "list":
        meta = [meta]
    elif damage == "no_ids":
        del meta["ids"]
    elif damage == "no_root":
        del meta["root"]
    elif damage == "nlist":
        meta.update(backend="faiss-ivf", backend_options={"nlist": -5})
    elif damage == "fingerprint_null":
        meta["fingerprint"] = None
    write_index_json(folder, json.dumps(meta) if damage != "not_json" else "{not json")
    return folder


@pytest.mark.parametrize(
    "damage, expected",
    [("truncated", "could not load the model"), ("garbage", "could not load the model"),
     ("missing_layers", "lack 80 tensor(s) of the model (fusion.")],
)  # fmt: skip
def test_cli_damaged_model_weights(workspace, capsys, damage, expected):
    root = workspace["root"]
    model = damaged_model(root, f"model_{damage}", damage)
    capsys.readouterr()
    argv = [
        "index",
        "--model",
        str(model),
        "--images",
        str(root / "images"),
        "--out",
        str(root / f"out_{damage}"),
        "--no-progress",
    ]
    assert main(argv) == 1
    assert expected in one_error_line(capsys, "mqirtn index: error:")
    assert not (root / f"out_{damage}").exists()


@pytest.mark.parametrize(
    "damage, expected",
    [("truncated_embeddings", "is not a readable embeddings file"), ("embeddings_of_another_save", "mixes two saves"),
     ("list", "must hold a JSON object, got a list"), ("no_ids", "lacks the field 'ids'"), ("no_root", "lacks the field 'root'"),
     ("nlist", "'nlist' must be a positive integer up to 2147483647, got -5"),
     ("fingerprint_null", "records no model fingerprint"),
     ("not_json", "is not valid JSON")],
)  # fmt: skip
def test_cli_damaged_index_files(workspace, capsys, damage, expected):
    index = damaged_index(workspace["root"], f"index_{damage}", damage)
    capsys.readouterr()
    assert main(["search", "--index", str(index), "--image", workspace["query"], "--text", "make it red"]) == 1
    assert expected in one_error_line(capsys, "mqirtn search: error:")


def test_cli_unreachable_url_and_out_a_file(workspace, capsys):
    root = workspace["root"]
    capsys.readouterr()
    assert main(["search", "--index", str(root / "index"), "--image", "http://127.0.0.1:9/x.png", "--text", "x"]) == 1
    assert "could not read the image 'http://127.0.0.1:9/x.png'" in one_error_line(capsys, "mqirtn search: error:")
    (root / "a_file").write_text("x")
    assert (
        main(
            ["index", "--model", str(root / "model"), "--images", str(root / "images"), "--out", str(root / "a_file")]
        )
        == 1
    )
    assert "is a file" in one_error_line(capsys, "mqirtn index: error:")
