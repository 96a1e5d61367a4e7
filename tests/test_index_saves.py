"""Index saves and loads on a busy or odd file system: a load racing a re-save reads one whole save, a symlinked output
folder keeps working, a full disk is one line and leaves no partial folder; what a gallery must never hold (non-finite
or all-zero rows, a model with NaN weights) is refused."""

import json
import threading
import time

import pytest
import torch
from safetensors import SafetensorError

from modeling_mqirtn import save_for_hub
from mqirtn_app import index as gallery_index
from mqirtn_app.cli import main
from mqirtn_app.index import GalleryIndex

from utils import one_error_line, tiny_model, tiny_processor, write_image_folder


def random_index(count: int, seed: int) -> GalleryIndex:
    embeddings = torch.nn.functional.normalize(
        torch.randn(count, 8, generator=torch.Generator().manual_seed(seed)), dim=-1
    )
    return GalleryIndex(embeddings, [f"s{seed}-{i}" for i in range(count)], fingerprint="f" * 64)


def test_a_save_between_the_reads_of_a_load_is_not_a_mix(tmp_path, monkeypatch):
    """Another process re-saves the folder right after the load read index.json: the load still returns one whole
    save (here the first), not a false "mixes two saves"."""
    folder = tmp_path / "index"
    first, second = random_index(5, 0), random_index(7, 1)
    first.save(folder)
    real_loads, calls = json.loads, []

    def loads_then_resave(text, *args, **kwargs):
        if not calls:
            calls.append(1)
            second.save(folder)
        return real_loads(text, *args, **kwargs)

    monkeypatch.setattr(gallery_index.json, "loads", loads_then_resave)
    loaded = GalleryIndex.load(folder)
    assert calls and loaded.ids == first.ids and torch.equal(loaded.embeddings, first.embeddings)
    monkeypatch.setattr(gallery_index.json, "loads", real_loads)
    assert GalleryIndex.load(folder).ids == second.ids


def test_loads_racing_saves_see_whole_saves(tmp_path):
    """A thread re-saves two different indexes in turn while this one loads for two seconds: every load is one of
    them, none fails."""
    folder = tmp_path / "index"
    versions = [random_index(300, 0), random_index(200, 1)]
    versions[0].save(folder)
    expected = {tuple(v.ids): v.embeddings for v in versions}
    stop = threading.Event()

    def resave():
        turn = 0
        while not stop.is_set():
            versions[turn % 2].save(folder)
            turn += 1

    saver = threading.Thread(target=resave)
    saver.start()
    loads, errors = 0, []
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                loaded = GalleryIndex.load(folder)
            except (ValueError, OSError) as error:
                errors.append(str(error))
                continue
            loads += 1
            assert torch.equal(loaded.embeddings, expected[tuple(loaded.ids)])
    finally:
        stop.set()
        saver.join(timeout=30)
    assert not saver.is_alive() and loads > 20 and errors == [], (loads, errors[:3])


def test_symlinked_output_folder(tmp_path):
    """`--out` a link to a folder: the linked folder receives the index, the link stays, saving again works."""
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real, target_is_directory=True)
    for seed in (0, 1, 2):
        random_index(4 + seed, seed).save(link)
        assert link.is_symlink() and (real / "index.json").is_file()
        assert GalleryIndex.load(link).ids == random_index(4 + seed, seed).ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no .previous / .partial left


def test_disk_full_is_one_line_and_leaves_the_previous_index(tmp_path, monkeypatch):
    folder = tmp_path / "index"
    old = random_index(5, 0)
    old.save(folder)
    real_save_file = gallery_index.save_file

    def fill_disk(tensors, path, *args, **kwargs):
        real_save_file(tensors, path, *args, **kwargs)
        with open(path, "r+b") as handle:
            handle.truncate(100)  # what made it to disk
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(gallery_index, "save_file", fill_disk)
    with pytest.raises(OSError) as raised:
        random_index(9, 1).save(folder)
    message = str(raised.value)
    assert "could not save the gallery index into" in message and "No space left on device" in message
    assert "\n" not in message and "previous index there, if any, is kept" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no .index.partial left behind
    assert GalleryIndex.load(folder).ids == old.ids


def test_all_zero_and_non_finite_rows_are_refused():
    index = random_index(3, 0)
    rows = torch.randn(3, 8)
    rows[1] = 0
    with pytest.raises(ValueError, match=r"1 all-zero row\(s\) \(first: row 1\)"):
        index.add_embeddings(rows, ["a", "b", "c"])
    rows[1] = float("nan")
    with pytest.raises(ValueError, match=r"1 row\(s\) of non-finite"):
        index.add_embeddings(rows, ["a", "b", "c"])
    assert len(index) == 3


def test_zero_row_in_a_saved_index_is_refused(tmp_path):
    from safetensors.torch import save_file

    index = random_index(4, 0)
    index.save(tmp_path / "index")
    rows = index.embeddings.clone()
    rows[2] = 0
    save_file({"embeddings": rows}, str(tmp_path / "index" / "embeddings.safetensors"))
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    del meta["files"]  # as an index without hashes: the rows themselves must be refused
    from utils import write_index_json

    write_index_json(tmp_path / "index", meta)
    with pytest.raises(ValueError, match=r"all-zero row\(s\) \(first: row 2\)"):
        GalleryIndex.load(tmp_path / "index")


def test_cli_index_with_a_nan_model_is_one_line_and_writes_nothing(tmp_path, capsys):
    model = tiny_model().eval()
    with torch.no_grad():
        model.image_projection.weight[0, 0] = float("nan")
    folder = save_for_hub(model, tiny_processor(tmp_path), tmp_path / "model")
    write_image_folder(tmp_path / "images", 3, nested=False)
    capsys.readouterr()
    status = main(
        [
            "index",
            "--model",
            str(folder),
            "--images",
            str(tmp_path / "images"),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert status == 1
    assert "the model's weights are not finite" in one_error_line(capsys, "mqirtn index: error:")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- one-line errors
@pytest.fixture
def workspace(tmp_path):
    folder = save_for_hub(tiny_model().eval(), tiny_processor(tmp_path), tmp_path / "model")
    write_image_folder(tmp_path / "images", 3, nested=False)
    return tmp_path, folder


def test_faiss_knobs_out_of_range_are_one_line(workspace, capsys):
    pytest.importorskip("faiss")
    root, model = workspace
    base = ["index", "--model", str(model), "--images", str(root / "images"), "--no-progress"]
    capsys.readouterr()
    assert main([*base, "--backend", "faiss-ivf", "--nlist", "50", "--out", str(root / "ivf")]) == 1
    assert "`nlist` (50) is more than the gallery's 3 vectors" in one_error_line(capsys, "mqirtn index: error:")
    assert main([*base, "--backend", "faiss-hnsw", "--ef-search", str(2**31), "--out", str(root / "hnsw")]) == 1
    line = one_error_line(capsys, "mqirtn index: error:")
    assert f"--ef-search must be a positive integer up to {2**31 - 1}" in line
    assert not (root / "ivf").exists() and not (root / "hnsw").exists()
    with pytest.raises(ValueError, match="backend option 'ef_search' must be a positive integer up to"):
        GalleryIndex(torch.eye(3), ["a", "b", "c"], backend="faiss-hnsw", backend_options={"ef_search": 2**31})


def test_out_of_range_option_or_nested_json_in_index_json_is_one_line(tmp_path):
    from utils import write_index_json

    random_index(3, 0).save(tmp_path / "index")
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    write_index_json(tmp_path / "index", {**meta, "backend": "faiss-hnsw", "backend_options": {"ef_search": 2**31}})
    with pytest.raises(ValueError, match="backend option 'ef_search' must be a positive integer up to 2147483647"):
        GalleryIndex.load(tmp_path / "index")
    write_index_json(tmp_path / "index", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nests its JSON too deeply"):
        GalleryIndex.load(tmp_path / "index")


def test_csv_field_over_the_limit_is_one_line(tmp_path):
    from processing.data.loaders import load_evaluation_data

    (tmp_path / "test.csv").write_text('reference,text,target\na.png,"make it red,b.png\n' + "x" * 200_000 + "\n")
    with pytest.raises(ValueError, match=r"test.csv line \d+: not readable as CSV \(field larger than field limit"):
        load_evaluation_data("files", tmp_path, "test")


def test_hub_attention_kernel_in_config_is_refused_without_consent(workspace, capsys):
    root, model = workspace
    config = json.loads((model / "config.json").read_text())
    config["vision_config"]["attn_implementation"] = "some-org/some-kernel"
    (model / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    argv = [
        "index",
        "--model",
        str(model),
        "--images",
        str(root / "images"),
        "--out",
        str(root / "out"),
        "--no-progress",
    ]
    assert main(argv) == 1
    line = one_error_line(capsys, "mqirtn index: error:")
    assert "asks for the attention kernel 'some-org/some-kernel' from the Hub" in line
    assert "--trust-remote-code" in line


def test_cli_search_with_a_text_longer_than_the_tower_is_truncated(workspace, capsys):
    """A tokenizer without a length cap (the tiny one) and a 200-word text: ranked from its first tokens, with a
    warning, instead of a RuntimeError from the position embeddings."""
    root, model = workspace
    base = ["--model", str(model), "--no-progress"]
    assert main(["index", *base, "--images", str(root / "images"), "--out", str(root / "index")]) == 0
    capsys.readouterr()
    long_text = " ".join(["make the small red circle a large blue square"] * 25)
    argv = [
        "search",
        "--index",
        str(root / "index"),
        "--image",
        str(root / "images" / "img_001.png"),
        "--text",
        long_text,
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["rank", "score", "id"] and len(out.splitlines()) == 4
