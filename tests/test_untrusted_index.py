"""An index file is data, never consent to run code: `mqirtn search` loads the model an `index.json` names with this
package's installed classes unless `--trust-remote-code` is given, and then only if the folder's code files are those
the index recorded when it was built. The crafted folders here write a marker file when their Python code runs."""

import json
import shutil

import pytest

from modeling_mqirtn import save_for_hub
from mqirtn_app.cli import main

from utils import tiny_model, tiny_processor, write_image_folder, write_index_json


PAYLOAD = "import pathlib\npathlib.Path({marker!r}).write_text('code ran')\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    save_for_hub(tiny_model().eval(), tiny_processor(root), root / "model")
    images = write_image_folder(root / "images", 3)
    assert main(["index", "--model", str(root / "model"), "--images", str(root / "images"), "--out",
                 str(root / "index"), "--no-progress"]) == 0  # fmt: skip
    return {"root": root, "query": str(images[0])}


def crafted(workspace, name: str, model_type: str | None = None):
    """A copy of the indexed model whose `modeling_mqirtn.py` writes a marker, and an index naming it."""
    root = workspace["root"]
    folder, marker = root / name, root / f"{name}.marker"
    shutil.copytree(root / "model", folder)
    code = folder / "modeling_mqirtn.py"
    code.write_text(PAYLOAD.format(marker=str(marker)) + code.read_text())
    if model_type is not None:
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = model_type
        (folder / "config.json").write_text(json.dumps(config))
    index = root / f"{name}.index"
    shutil.copytree(root / "index", index)
    meta = json.loads((index / "index.json").read_text())
    meta["model_name_or_path"] = str(folder)
    write_index_json(index, meta)
    return index, marker


def search(workspace, index, *extra):
    return main(["search", "--index", str(index), "--image", workspace["query"], "--text", "make it red", *extra])


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def test_an_mqirtn_folder_with_its_own_code_loads_with_the_installed_classes(workspace, capsys):
    index, marker = crafted(workspace, "same_type")
    capsys.readouterr()
    assert search(workspace, index) == 0  # same weights: a safe load, and the search runs
    assert not marker.exists()


def test_another_architecture_is_refused_without_consent(workspace, capsys):
    index, marker = crafted(workspace, "other_type", model_type="evil")
    capsys.readouterr()
    assert search(workspace, index) == 1
    assert not marker.exists()
    assert "--trust-remote-code" in error_line(capsys)


def test_consent_runs_only_the_code_the_index_recorded(workspace, capsys):
    index, marker = crafted(workspace, "tampered", model_type="evil")
    capsys.readouterr()
    assert search(workspace, index, "--trust-remote-code") == 1
    assert not marker.exists()
    line = error_line(capsys)
    assert "changed since the index was built" in line and "modeling_mqirtn.py" in line


def test_consent_with_an_index_that_records_no_code_digest_is_refused(workspace, capsys):
    index, marker = crafted(workspace, "no_digest", model_type="evil")
    meta = json.loads((index / "index.json").read_text())
    del meta["model_code"]
    write_index_json(index, meta)
    capsys.readouterr()
    assert search(workspace, index, "--trust-remote-code") == 1
    assert not marker.exists()
    assert "records no digest" in error_line(capsys)
