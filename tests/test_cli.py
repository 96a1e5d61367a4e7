"""`mqirtn index` / `mqirtn search` end to end on a temporary folder of generated images (with a corrupt file and a
non-image file), and the one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from modeling_mqirtn import save_for_hub
from mqirtn_app.cli import main
from mqirtn_app.index import GalleryIndex

from utils import tiny_model, tiny_processor, write_image_folder


REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model().eval()
    processor = tiny_processor(root)
    save_for_hub(model, processor, root / "model")
    save_for_hub(tiny_model(seed=3), processor, root / "other_model")
    paths = write_image_folder(root / "images", 8)
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "images" / "readme.txt").write_text("not an image")
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no images here")
    return {"root": root, "model": model, "processor": processor, "paths": paths}


@pytest.fixture(scope="module")
def built_index(workspace):
    root = workspace["root"]
    code = main(["index", "--model", str(root / "model"), "--images", str(root / "images"), "--out", str(root / "index"),
                 "--batch-size", "3", "--no-progress"])  # fmt: skip
    assert code == 0
    return root / "index"


def test_index_skips_corrupt_and_non_image_files(workspace, built_index):
    index = GalleryIndex.load(built_index)
    assert len(index) == 8 and len(index.skipped) == 1 and "corrupt.png" in index.skipped[0]
    assert "readme.txt" not in " ".join(index.ids)
    assert index.model_name_or_path == str((workspace["root"] / "model").resolve())
    with torch.no_grad():
        expected = (
            workspace["model"]
            .get_image_features(
                pixel_values=workspace["processor"](images=[Image.open(p) for p in workspace["paths"]])["pixel_values"]
            )
            .pooler_output
        )
    torch.testing.assert_close(index.embeddings, expected, atol=1e-5, rtol=0)


def test_search_prints_json_equal_to_the_pipeline(workspace, built_index, capsys):
    root = workspace["root"]
    query = str(workspace["paths"][2])
    capsys.readouterr()
    code = main(["search", "--index", str(built_index), "--image", query, "--text", "make it red", "--top-k", "4",
                 "--json", "--grid", str(root / "grid.png"), "--attention", str(root / "attention.png"),
                 "--target", "img_002.png"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    results = json.loads(out)
    from transformers import pipeline

    pipe = pipeline("composed-image-retrieval", model=workspace["model"], processor=workspace["processor"])
    index = GalleryIndex.load(built_index, model=workspace["model"])
    expected = pipe(image=query, text="make it red", gallery=index, top_k=4)
    assert [r["id"] for r in results] == [r["id"] for r in expected]
    torch.testing.assert_close(
        torch.tensor([r["score"] for r in results]), torch.tensor([r["score"] for r in expected])
    )
    assert set(results[0]) == {"score", "index", "id"}
    for name in ("grid.png", "attention.png"):
        with Image.open(root / name) as picture:
            assert picture.format == "PNG" and picture.width > 300


def test_search_prints_a_ranked_table(workspace, built_index, capsys):
    capsys.readouterr()
    code = main(["search", "--index", str(built_index), "--image", str(workspace["paths"][0]), "--text", "add a circle",
                 "--top-k", "3"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and lines[0].split() == ["rank", "score", "id"] and len(lines) == 4
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3"]


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_folder", "does not exist or is not a folder"),
        ("no_images", "no image files"),
        ("missing_model", "the model folder"),
        ("not_an_index", "is not a gallery index"),
        ("other_model", "another checkpoint"),
        ("missing_query", "--image"),
        ("unknown_target", "--target"),
    ],
)
def test_errors_are_one_line_and_nonzero(workspace, built_index, capsys, case, expected):
    root = workspace["root"]
    query = str(workspace["paths"][0])
    argv = {
        "missing_folder": ["index", "--model", str(root / "model"), "--images", str(root / "nope"), "--out", str(root / "x")],
        "no_images": ["index", "--model", str(root / "model"), "--images", str(root / "empty"), "--out", str(root / "x")],
        "missing_model": ["index", "--model", str(root / "no_model"), "--images", str(root / "images"), "--out", str(root / "x")],
        "not_an_index": ["search", "--index", str(root / "images"), "--image", query, "--text", "it"],
        "other_model": ["search", "--index", str(built_index), "--model", str(root / "other_model"), "--image", query, "--text", "it"],
        "missing_query": ["search", "--index", str(built_index), "--image", str(root / "nope.png"), "--text", "it"],
        "unknown_target": ["search", "--index", str(built_index), "--image", query, "--text", "it", "--target", "zzz"],
    }[case]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 1
    line = error_line(capsys)
    assert line.startswith(f"mqirtn {argv[0]}: error:") and expected in line


def test_unknown_backend_is_a_usage_error(workspace, capsys):
    root = workspace["root"]
    with pytest.raises(SystemExit) as exit_info:
        main(["index", "--model", str(root / "model"), "--images", str(root / "images"), "--out", str(root / "x"),
              "--backend", "annoy"])  # fmt: skip
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert "invalid choice: 'annoy'" in line and "faiss-hnsw" in line


@pytest.mark.slow
def test_console_script_subprocess_exit_status(workspace, built_index):
    """As a separate process (what the `mqirtn` console script runs): exit status and stderr, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    root = workspace["root"]
    command = [sys.executable, "-m", "mqirtn_app.cli", "search", "--index", str(built_index),
               "--model", str(root / "other_model"), "--image", str(workspace["paths"][0]), "--text", "make it red"]  # fmt: skip
    completed = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1].startswith("mqirtn search: error: this gallery index was built")


def test_faiss_index_is_built_by_index_and_read_by_each_search(workspace, monkeypatch, capsys):
    """`index --backend faiss-ivf` saves the trained FAISS index; `search` (one process per query) reads it."""
    from mqirtn_app import index as gallery_index

    root = workspace["root"]
    builds = []
    original = gallery_index._build_faiss
    monkeypatch.setattr(
        gallery_index, "_build_faiss", lambda backend, *a: builds.append(backend) or original(backend, *a)
    )
    capsys.readouterr()
    code = main(["index", "--model", str(root / "model"), "--images", str(root / "images"), "--out", str(root / "ivf"),
                 "--backend", "faiss-ivf", "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and builds == ["faiss-ivf"]
    assert (
        out.strip()
        == f"Indexed 8 images from {root / 'images'} into {root / 'ivf'} (backend faiss-ivf, skipped 1 unreadable file(s))"
    )
    assert (root / "ivf" / "faiss.index").is_file()
    assert json.loads((root / "ivf" / "index.json").read_text())["faiss"]["ntotal"] == 8

    query = str(workspace["paths"][1])
    code = main(["search", "--index", str(root / "ivf"), "--image", query, "--text", "make it red", "--top-k", "3",
                 "--json"])  # fmt: skip
    results = json.loads(capsys.readouterr().out)
    assert code == 0 and builds == ["faiss-ivf"]  # the search read the saved index: no k-means, no rebuild
    index = GalleryIndex.load(root / "ivf", model=workspace["model"], backend="exact")
    from transformers import pipeline

    pipe = pipeline("composed-image-retrieval", model=workspace["model"], processor=workspace["processor"])
    expected = pipe(image=query, text="make it red", gallery=index, top_k=3)
    assert [r["id"] for r in results] == [r["id"] for r in expected]  # 8 vectors in 1 list: IVF is exact here


def test_device_cpu_dtype_bfloat16_index_and_search(workspace, monkeypatch, capsys):
    from mqirtn_app import cli

    loaded = []
    original = cli.load_model

    def recording(*args, **kwargs):
        model, processor = original(*args, **kwargs)
        loaded.append((model.dtype, model.device.type))
        return model, processor

    monkeypatch.setattr(cli, "load_model", recording)
    root = workspace["root"]
    out = root / "index_bf16"
    assert main(["index", "--model", str(root / "model"), "--images", str(root / "images"), "--out", str(out),
                 "--no-progress", "--device", "cpu", "--dtype", "bfloat16"]) == 0  # fmt: skip
    query = str(workspace["paths"][1])
    capsys.readouterr()
    assert main(["search", "--index", str(out), "--image", query, "--text", "make it red", "--top-k", "8", "--json",
                 "--device", "cpu", "--dtype", "bfloat16"]) == 0  # fmt: skip
    results = json.loads(capsys.readouterr().out)
    assert loaded == [(torch.bfloat16, "cpu"), (torch.bfloat16, "cpu")]
    # bfloat16 keeps ~3 significant digits: the scores are those of the float32 model within that.
    with torch.no_grad():
        processor, model = workspace["processor"], workspace["model"]
        query_embeds = model.get_query_features(
            **processor(images=[Image.open(query)], text=["make it red"])
        ).pooler_output
        gallery_pixels = processor(images=[Image.open(p) for p in workspace["paths"]])["pixel_values"]
        gallery = model.get_image_features(pixel_values=gallery_pixels).pooler_output
    expected = dict(
        zip(
            [p.name if p.parent.name == "images" else f"sub/{p.name}" for p in workspace["paths"]],
            (query_embeds @ gallery.T)[0].tolist(),
        )
    )
    assert len(results) == 8
    for result in results:
        assert abs(result["score"] - expected[result["id"]]) < 0.05, result


@pytest.mark.parametrize(
    "device, expected",
    [("tpu", "--device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"), ("nonsense:0:1", "--device must be")]
    + ([] if torch.cuda.is_available() else [("cuda", "--device cuda: no CUDA device is available here")]),
)
def test_unavailable_device_is_one_line(workspace, built_index, capsys, device, expected):
    capsys.readouterr()
    argv = [
        "search",
        "--index",
        str(built_index),
        "--image",
        str(workspace["paths"][0]),
        "--text",
        "it",
        "--device",
        device,
    ]
    assert main(argv) == 1
    assert expected in error_line(capsys)


def test_version_and_dtype_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("mqirtn ")
    with pytest.raises(SystemExit) as exit_info:
        main(["search", "--index", "x", "--image", "y", "--text", "z", "--dtype", "float64"])
    assert exit_info.value.code == 2 and "invalid choice: 'float64'" in capsys.readouterr().err


def test_searching_a_bfloat16_index_in_float32_names_the_dtype(workspace, capsys):
    root = workspace["root"]
    out = root / "index_bf16_only"
    assert main(["index", "--model", str(root / "model"), "--images", str(root / "images"), "--out", str(out),
                 "--no-progress", "--dtype", "bfloat16", "--device", "cpu"]) == 0  # fmt: skip
    capsys.readouterr()
    argv = ["search", "--index", str(out), "--image", str(workspace["paths"][0]), "--text", "it", "--device", "cpu"]
    assert main(argv) == 1
    line = error_line(capsys)
    assert "another checkpoint" in line and "search it with that --dtype (this search loaded it in float32)" in line
