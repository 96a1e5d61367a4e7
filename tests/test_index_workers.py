"""Decoding in DataLoader workers (`num_workers`, `mqirtn index --num-workers`): the same index as decoding in the
main process (embeddings bit for bit, ids, skipped files and their warning), with fork and spawn, the pixel cap set at
run time, the sharded path, and one-line errors."""

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.testing_utils import CaptureLogger

from modeling_mqirtn import save_for_hub
from mqirtn_app import index as gallery_index
from mqirtn_app.cli import main
from mqirtn_app.index import DecodeWorkerError, GalleryIndex, default_num_workers, embed_images
from processing import processing_mqirtn

from utils import shape_image, write_image_folder


REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """11 images (PNG and JPEG, nested, one larger than the others), a corrupt JPEG, a text file with an image suffix
    and a text file without one."""
    folder = tmp_path_factory.mktemp("gallery")
    write_image_folder(folder, 10)
    shape_image(10, size=64).save(folder / "sub" / "large.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (folder / "sub" / "notes.png").write_text("a text file with an image suffix")
    (folder / "readme.txt").write_text("not an image")
    return folder


def build(model, processor, folder, workers, **kwargs):
    with CaptureLogger(gallery_index.logger) as captured:
        index = GalleryIndex.from_folder(
            model, processor, folder, batch_size=2, num_workers=workers, progress=False, **kwargs
        )
    return index, captured.out


def assert_same_index(a, b):
    assert a.ids == b.ids and a.skipped == b.skipped
    assert torch.equal(a.embeddings, b.embeddings)  # bit for bit


def test_workers_give_the_same_index_and_warning(model, processor, gallery):
    reference, warning = build(model, processor, gallery, 0)
    assert len(reference) == 11 and len(reference.skipped) == 2
    assert "Skipped 2 unreadable image(s) of 13" in warning and "corrupt.jpg" in warning and "notes.png" in warning
    assert "readme.txt" not in " ".join(reference.ids + reference.skipped)
    for workers in (1, 2):
        index, out = build(model, processor, gallery, workers)
        assert_same_index(index, reference)
        assert out == warning


def test_in_memory_items_and_add_with_workers(model, processor, gallery, tmp_path):
    """PIL images, numpy arrays, paths, a missing path and a wrong type (skipped as today), through `from_images` and
    `add`; the pixel cap set at run time holds in (forked) workers."""
    paths = sorted(p for p in gallery.rglob("img_*"))
    items = [
        shape_image(20),
        paths[0],
        np.asarray(shape_image(21)),
        tmp_path / "missing.jpg",
        7,
        *paths[1:4],
        gallery / "sub" / "large.png",
    ]
    ids = [f"g{i}" for i in range(len(items))]
    original = processing_mqirtn.MAX_IMAGE_PIXELS
    processing_mqirtn.MAX_IMAGE_PIXELS = 50 * 50  # large.png (64 x 64) is over it
    try:
        results = []
        for workers in (0, 2):
            index = GalleryIndex.from_images(
                model, processor, items[:5], ids[:5], batch_size=2, num_workers=workers, progress=False
            )
            assert index.add(items[5:], ids[5:], batch_size=3, num_workers=workers, progress=False) == 3
            results.append(index)
    finally:
        processing_mqirtn.MAX_IMAGE_PIXELS = original
    assert_same_index(results[1], results[0])
    assert results[0].ids == ["g0", "g1", "g2", "g5", "g6", "g7"]
    assert [s.split(" (")[0] for s in results[0].skipped] == [
        str(tmp_path / "missing.jpg"),
        "#4",
        str(gallery / "sub" / "large.png"),
    ]
    assert "more than the cap of 2500" in results[1].skipped[2]


def test_embed_images_defaults_to_no_workers_and_equals_the_direct_forward(model, processor, gallery):
    paths = sorted(gallery.rglob("img_*"))
    embeddings, kept, skipped = embed_images(model, processor, paths, batch_size=4, progress=False)
    with torch.no_grad():
        expected = model.get_image_features(
            pixel_values=processor(images=[Image.open(p) for p in paths])["pixel_values"]
        ).pooler_output
    assert kept == list(range(len(paths))) and skipped == []
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=0)


def test_negative_or_non_integer_workers_are_refused(model, processor, gallery):
    for value in (-1, 1.5, True):
        with pytest.raises(ValueError, match="`num_workers` must be a non-negative integer"):
            GalleryIndex.from_folder(model, processor, gallery, num_workers=value, progress=False)
    with pytest.raises(ValueError, match="`num_workers` must be a non-negative integer"):
        embed_images(model, processor, [shape_image(0)], num_workers=-2, progress=False)


def test_default_num_workers(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert default_num_workers(1000, 32, device=cuda) == 4  # min(4, CPUs): the process only launches kernels
    assert default_num_workers(1000, 32, device=cpu) == default_num_workers(1000, 32) == 2  # a quarter: model threads
    assert default_num_workers(32, 32, device=cuda) == 0  # one batch: nothing to overlap
    assert default_num_workers(1000, 32, processes=4, device=cuda) == 2  # 8 CPUs shared by 4 processes
    assert default_num_workers(1000, 32, processes=8, device=cuda) == 0  # one CPU per process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_num_workers(1000, 32, device=cpu) == 0 and default_num_workers(1000, 32, device=cuda) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_num_workers(1000, 32, device=cuda) == 0


def test_handoff_units_are_whole_batches_that_grow_to_the_byte_budget():
    for count, batch_size, pixel_bytes, workers in [
        (13, 2, 12288, 1),
        (4096, 32, 27648, 1),
        (1000, 7, 27648, 3),
        (4096, 32, 602112, 4),
        (10, 32, 27648, 2),
        (500, 8, None, 1),
    ]:
        ranges = gallery_index._handoff_ranges(count, batch_size, pixel_bytes, workers)
        assert ranges[0][0] == 0 and ranges[-1][1] == count
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in order
        assert all(start % batch_size == 0 for start, _ in ranges)  # whole model batches
        sizes = [math.ceil((stop - start) / batch_size) for start, stop in ranges]
        cap = max(1, gallery_index._HANDOFF_BYTES // (batch_size * (pixel_bytes or gallery_index._HANDOFF_BYTES)))
        assert sizes[:2] == [1, 1][: len(sizes)] and max(sizes) <= cap
        assert all(b <= 2 * a for a, b in zip(sizes, sizes[1:]))  # doubling at most
        without = gallery_index._handoff_ranges(count, batch_size, pixel_bytes, 0)
        assert without == [(s, min(s + batch_size, count)) for s in range(0, count, batch_size)]
    # 48 px images in batches of 32: 9 batches (288 images, 8 MB) a unit after the ramp; 224 px: one batch
    assert max(stop - start for start, stop in gallery_index._handoff_ranges(4096, 32, 27648, 1)) == 288
    assert max(stop - start for start, stop in gallery_index._handoff_ranges(4096, 32, 602112, 1)) == 32


class RecordingModel(torch.nn.Module):
    """Records the pixel values of each forward pass."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.inputs = model, model.config, []

    def get_image_features(self, pixel_values):
        self.inputs.append(pixel_values.clone())
        return self.inner.get_image_features(pixel_values=pixel_values)


def test_units_of_several_batches_make_the_same_forward_passes(model, processor, gallery):
    """With workers the files travel in units of several batches (here 1, 1, 2 and 3 batches of 2, skipped files
    inside), yet the model sees the same batches as without workers: the same forward passes, bit for bit."""
    files = gallery_index.image_files(gallery)
    assert [
        b - a for a, b in gallery_index._handoff_ranges(len(files), 2, gallery_index._pixel_bytes(processor), 1)
    ] == [2, 2, 4, 5]
    runs = []
    for workers in (0, 1, 2):
        recorder = RecordingModel(model)
        embeddings, kept, skipped = embed_images(
            recorder, processor, files, batch_size=2, num_workers=workers, progress=False
        )
        runs.append((recorder.inputs, embeddings, kept, skipped))
    (inputs, embeddings, kept, skipped), others = runs[0], runs[1:]
    assert len(skipped) == 2 and [x.shape[0] for x in inputs] == [1, 2, 2, 2, 2, 2] and len(kept) == 11
    for other_inputs, other_embeddings, other_kept, other_skipped in others:
        assert len(other_inputs) == len(inputs) and all(torch.equal(a, b) for a, b in zip(inputs, other_inputs))
        assert torch.equal(other_embeddings, embeddings) and other_kept == kept and other_skipped == skipped


def test_image_files_are_listed_like_rglob_sorted_by_parts(tmp_path):
    """Nested folders, upper-case suffixes and hidden files are in; links to files in, links to folders not
    followed; broken links, link loops, fifos and other suffixes out; sorted by path parts (`a/b` before `a-c`)."""
    root = tmp_path / "gallery"
    for name in ("a/b.jpg", "a-c.jpg", "z/y/x.PNG", ".hidden.webp", "real/inside.jpg", "notes.txt", "a/deep/d.jpeg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    os.symlink(root / "real", root / "a" / "linked_folder")
    os.symlink(root / "real" / "inside.jpg", root / "linked_file.jpg")
    os.symlink(root / "nowhere.jpg", root / "broken.jpg")
    os.symlink(root / "loop.jpg", root / "loop.jpg")
    os.mkfifo(root / "pipe.jpg")
    expected = [
        ".hidden.webp",
        "a/b.jpg",
        "a/deep/d.jpeg",
        "a-c.jpg",
        "linked_file.jpg",
        "real/inside.jpg",
        "z/y/x.PNG",
    ]
    assert gallery_index.image_files(root) == [root / name for name in expected]
    files, ids = gallery_index._image_files_and_ids(root)
    assert ids == expected and files == [root / name for name in expected]
    with pytest.raises(FileNotFoundError, match="does not exist or is not a directory"):
        gallery_index.image_files(root / "a" / "b.jpg")


class FailingProcessor:
    """A processor that fails on the batch holding image #3 with an error that is not an unreadable image."""

    def __init__(self, processor, exit_instead=False):
        self.processor, self.exit_instead = processor, exit_instead
        self.calls = 0

    def __call__(self, images, return_tensors="pt"):
        self.calls += 1
        if (
            self.calls == 2
        ):  # the second batch this process prepares (a forked worker: batch 2; batch 0 is decoded here)
            if self.exit_instead:
                os._exit(3)  # a worker that dies (as when the system kills it)
            raise TypeError("the processor\nbroke")
        return self.processor(images=images, return_tensors=return_tensors)


def test_worker_errors_are_one_line(model, processor, gallery):
    paths = sorted(gallery.rglob("img_*"))
    with pytest.raises(DecodeWorkerError) as caught:
        embed_images(model, FailingProcessor(processor), paths, batch_size=2, num_workers=1, progress=False)
    message = str(caught.value)
    assert "\n" not in message and "images 4-5 of 10" in message and "TypeError: the processor broke" in message
    assert "num_workers=0" in message
    with pytest.raises(TypeError, match="the processor"):  # in this process: the error itself, as before
        embed_images(model, FailingProcessor(processor), paths, batch_size=2, num_workers=0, progress=False)
    # DataLoader says the worker "exited unexpectedly", or the connection to fetch its last batch was refused or reset
    with pytest.raises(DecodeWorkerError, match=r"in 1 DataLoader worker\(s\) failed: .*; num_workers=0") as caught:
        embed_images(
            model, FailingProcessor(processor, exit_instead=True), paths, batch_size=2, num_workers=1, progress=False
        )
    assert "\n" not in str(caught.value)


def test_a_connection_refused_by_a_dead_worker_is_one_line(model, processor, gallery, monkeypatch):
    """A worker that dies while this process fetches its batch's shared memory: the connection to it is refused."""

    class DeadWorkers:
        def __next__(self):
            raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", lambda self: DeadWorkers())
    paths = sorted(gallery.rglob("img_*"))
    with pytest.raises(DecodeWorkerError) as caught:
        embed_images(model, processor, paths, batch_size=2, num_workers=1, progress=False)
    assert str(caught.value) == (
        "decoding the gallery images in 1 DataLoader worker(s) failed: ConnectionRefusedError: [Errno 111] Connection "
        "refused; num_workers=0 decodes in this process"
    )


class ModelFailingOnSecondBatch(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.calls = model, model.config, 0

    def get_image_features(self, pixel_values):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("the model broke")
        return self.inner.get_image_features(pixel_values=pixel_values)


def test_workers_stop_when_the_model_fails(model, processor, gallery):
    import multiprocessing

    paths = sorted(gallery.rglob("img_*"))
    try:
        embed_images(ModelFailingOnSecondBatch(model), processor, paths, batch_size=2, num_workers=2, progress=False)
    except RuntimeError as error:
        caught = error  # its traceback keeps embed_images' frame (and its batch iterator) alive
    assert str(caught) == "the model broke"
    assert multiprocessing.active_children() == []  # the workers are shut down now, not when the traceback is freed


SPAWN_CHILD = textwrap.dedent(
    """
    import multiprocessing, sys
    import torch
    from utils import tiny_model, tiny_processor
    from mqirtn_app.index import GalleryIndex
    from processing import processing_mqirtn

    if __name__ == "__main__":
        multiprocessing.set_start_method("spawn", force=True)
        processing_mqirtn.MAX_IMAGE_PIXELS = 50 * 50  # set at run time: spawned workers must get it too
        model, processor = tiny_model().eval(), tiny_processor(sys.argv[3])
        a, b = (GalleryIndex.from_folder(model, processor, sys.argv[2], batch_size=3, num_workers=w, progress=False)
                for w in (0, 2))
        assert a.ids == b.ids and a.skipped == b.skipped and torch.equal(a.embeddings, b.embeddings)
        print("ok", multiprocessing.get_start_method(), len(b), len(b.skipped))
    """
)


@pytest.mark.slow
def test_spawned_workers_give_the_same_index(gallery, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(SPAWN_CHILD)
    # The repository and the test helpers importable here and in the spawned workers (which inherit the environment).
    pythonpath = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath}
    completed = subprocess.run(
        [sys.executable, str(script), str(REPO_ROOT), str(gallery), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split() == ["ok", "spawn", "10", "3"]  # large.png over the run-time cap in spawned workers


@pytest.fixture(scope="module")
def saved_model(model, processor, tmp_path_factory):
    return save_for_hub(model, processor, tmp_path_factory.mktemp("model") / "model")


def test_cli_num_workers_gives_the_same_index(saved_model, gallery, tmp_path, capsys):
    indices = {}
    for workers in ("0", "2"):
        out = tmp_path / f"index_{workers}"
        code = main(["index", "--model", str(saved_model), "--images", str(gallery), "--out", str(out),
                     "--batch-size", "3", "--num-workers", workers, "--no-progress"])  # fmt: skip
        assert code == 0
        assert "Indexed 11 images" in capsys.readouterr().out
        indices[workers] = GalleryIndex.load(out)
    assert_same_index(indices["2"], indices["0"])


@pytest.mark.parametrize(
    "value, status, expected",
    [
        (
            "-1",
            1,
            "mqirtn index: error: --num-workers must be a non-negative integer (0: decode in the main process), got -1",
        ),
        ("two", 2, "argument --num-workers: invalid int value: 'two'"),
    ],
)
def test_cli_bad_num_workers_is_one_line(saved_model, gallery, tmp_path, capsys, value, status, expected):
    argv = ["index", "--model", str(saved_model), "--images", str(gallery), "--out", str(tmp_path / "i"),
            "--num-workers", value]  # fmt: skip
    if status == 2:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
    else:
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "i").exists()


@pytest.mark.slow
def test_two_rank_sharded_embedding_with_workers(model, processor, saved_model, gallery, tmp_path):
    """`mqirtn index --num-workers 1` under torchrun with 2 gloo CPU ranks: each rank decodes its shard in a worker."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "mqirtn_app.cli", "index", "--model", str(saved_model), "--images", str(gallery),
        "--out", str(tmp_path / "sharded"), "--batch-size", "2", "--num-workers", "1", "--no-progress",
    ]  # fmt: skip
    completed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("Indexed 11 images") == 1 and "embedded by 2 processes" in completed.stdout
    sharded = GalleryIndex.load(tmp_path / "sharded")
    single, _ = build(model, processor, gallery, 0)
    assert (
        sharded.ids == single.ids and sharded.skipped == single.skipped
    )  # messages name positions in the whole folder
    torch.testing.assert_close(sharded.embeddings, single.embeddings, atol=1e-5, rtol=0)


def test_index_speed_benchmark_runs_quick(tmp_path):
    """benchmarks/index_speed.py --quick: tiny model and gallery (its figures mean nothing), the JSON it writes."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("index_speed", REPO_ROOT / "benchmarks" / "index_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        record = module.main(["--quick", "--output", str(tmp_path / "index_speed.json")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "index_speed.json").read_text()) == record
    (entry,) = record["results"]
    assert {"tower", "decode_only", "end_to_end_w0", "end_to_end_w2"} <= set(entry) and entry["images"] == 12
    assert record["load_average_before"] and record["machine"]["logical_cpus"]
