"""Every save is atomic: a crash at any write leaves the old version or the new one, never a mix, and the reader says
which. Crashes are injected by monkeypatching the writes (no timing); one real `kill -9` of the index save (slow).

- `GalleryIndex.save`: embeddings, FAISS file and index.json staged in a sibling folder and swapped in; index.json
  lists the content hashes that `load` verifies; the FAISS record names the embeddings' hash.
- train.py checkpoints: a folder being re-saved loses its marker first; the marker (with content hashes) is written
  last; resume refuses or skips a damaged checkpoint, naming why.
- train.py's final model: staged and renamed in, so a crash while writing leaves the previous model loadable.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.testing_utils import CaptureLogger

from mqirtn_app import atomic
from mqirtn_app import index as gallery_index
from mqirtn_app.index import GalleryIndex
from mqirtn_train import checkpoints
from mqirtn_train.checkpoints import (
    CHECKPOINT_COMPLETE_FILE,
    checkpoint_damage,
    list_checkpoints,
    save_checkpoint,
    save_model,
)
from mqirtn_train.run import TrainingProgress

from utils import REPO_ROOT, tiny_model, tiny_processor


class Crash(Exception):
    """Stands for the process dying at this point (the code under test has no handler that could clean up)."""


def gallery(size: int, seed: int, backend: str = "exact") -> GalleryIndex:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.nn.functional.normalize(torch.randn(size, 16, generator=generator), dim=-1)
    return GalleryIndex(embeddings, [f"s{seed}-{i}" for i in range(size)], fingerprint=f"{seed:064x}", backend=backend)


def crash_at(monkeypatch, targets: list[tuple[object, str]], when: int) -> dict:
    """Makes the `when`-th call (0-based, counted over all `targets`) of these functions raise `Crash` before it runs."""
    calls = {"count": 0}
    for owner, name in targets:
        original = getattr(owner, name)

        def wrapper(*args, _original=original, **kwargs):
            calls["count"] += 1
            if calls["count"] - 1 == when:
                raise Crash()
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)
    return calls


def index_write_points():
    """Every file write, flush, rename and removal `GalleryIndex.save` does (FAISS: `write_index` too)."""
    import faiss

    return [
        (gallery_index, "save_file"), (faiss, "write_index"), (Path, "write_text"), (atomic, "fsync_file"),
        (atomic, "fsync_dir"), (os, "replace"), (shutil, "rmtree"),
    ]  # fmt: skip


def count_index_writes(monkeypatch, tmp_path, backend) -> int:
    """The writes of a save over an existing index."""
    gallery(300, 1, backend).save(tmp_path / "count")
    with monkeypatch.context() as patch:
        calls = crash_at(patch, index_write_points(), when=-1)
        gallery(200, 2, backend).save(tmp_path / "count")
    return calls["count"]


@pytest.mark.parametrize("backend", ["exact", "faiss-flat"])
def test_index_save_crashing_at_each_write_leaves_old_or_new(monkeypatch, tmp_path, backend):
    old, new = gallery(300, 1, backend), gallery(200, 2, backend)
    writes = count_index_writes(monkeypatch, tmp_path, backend)
    assert writes >= 6
    seen = set()
    for when in range(writes + 1):
        folder = tmp_path / f"crash{when}"
        old.save(folder)
        with monkeypatch.context() as patch:
            crash_at(patch, index_write_points(), when)
            try:
                new.save(folder)
                crashed = False
            except Crash:
                crashed = True
        assert crashed == (when < writes)
        with CaptureLogger(gallery_index.logger) as captured:
            loaded = GalleryIndex.load(folder)
        version = {tuple(old.ids): "old", tuple(new.ids): "new"}[tuple(loaded.ids)]
        expected = old if version == "old" else new
        torch.testing.assert_close(loaded.embeddings, expected.embeddings, rtol=0, atol=0)
        assert loaded.fingerprint == expected.fingerprint
        if backend != "exact":  # the saved FAISS file is the one of these embeddings, or none is read
            assert loaded._faiss_index is None or loaded._faiss_index.ntotal == len(expected)
        if not folder.exists():  # between the two renames: the previous version, and load says so
            assert version == "old" and "was interrupted" in captured.out
        seen.add(version)
        # The next save completes whatever state the crash left.
        new.save(folder)
        assert GalleryIndex.load(folder).ids == new.ids
    assert seen == {"old", "new"}


def test_index_load_refuses_embeddings_from_another_save(tmp_path):
    """What the non-atomic save left after a kill between its two writes: new embeddings beside the old ids."""
    gallery(300, 1).save(tmp_path / "a")
    gallery(300, 2).save(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "embeddings.safetensors", tmp_path / "a" / "embeddings.safetensors")
    with pytest.raises(ValueError, match="mixes two saves"):
        GalleryIndex.load(tmp_path / "a")


def test_faiss_file_of_another_gallery_of_the_same_size_is_not_used(tmp_path):
    gallery(300, 1, "faiss-flat").save(tmp_path / "a")
    gallery(300, 2, "faiss-flat").save(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "faiss.index", tmp_path / "a" / "faiss.index")
    with CaptureLogger(gallery_index.logger) as captured:
        loaded = GalleryIndex.load(tmp_path / "a")
    assert loaded._faiss_index is None and "is not the file index.json lists" in captured.out


def test_index_save_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ValueError, match="not part of a gallery index"):
        gallery(10, 1).save(tmp_path / "photos")
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"precious"


KILL_CHILD = textwrap.dedent(
    """
    import sys, torch
    from mqirtn_app.index import GalleryIndex
    versions = []
    for seed in (1, 2):
        embeddings = torch.nn.functional.normalize(torch.randn(60000, 64, generator=torch.Generator().manual_seed(seed)), dim=-1)
        versions.append(GalleryIndex(embeddings, [f"s{seed}-{i}" for i in range(60000)]))
    step = 0
    while True:
        versions[step % 2].save(sys.argv[1])
        if step == 0:
            print("saved", flush=True)
        step += 1
    """
)


@pytest.mark.slow
def test_index_save_killed_with_sigkill_leaves_old_or_new(tmp_path):
    """A real `kill -9` at several moments of a loop of saves (two 60000 x 64 galleries in turn)."""
    folder = tmp_path / "index"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    for attempt, delay in enumerate((0.05, 0.13, 0.29, 0.41, 0.67)):
        child = subprocess.Popen(
            [sys.executable, "-c", KILL_CHILD, str(folder)], env=env, stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout.readline().strip() == "saved"
            time.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        loaded = GalleryIndex.load(folder)
        seed = int(loaded.ids[0].split("-")[0][1:])
        assert loaded.ids == [f"s{seed}-{i}" for i in range(60000)]
        expected = torch.nn.functional.normalize(
            torch.randn(60000, 64, generator=torch.Generator().manual_seed(seed)), dim=-1
        )
        torch.testing.assert_close(loaded.embeddings, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- checkpoints
class FakeAccelerator:
    """The part of `accelerate.Accelerator` that `save_checkpoint` / `save_model` use, one process; `save_state` writes
    a "model" and an "optimizer" file whose contents are the given version."""

    is_main_process = True

    def __init__(self):
        self.version = "old"

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model

    def save_state(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "optimizer.bin"):
            save_file({"v": torch.tensor([1.0 if self.version == "old" else 2.0])}, str(Path(path) / name))


@pytest.fixture(autouse=True)
def accelerate_state():
    from accelerate import PartialState

    PartialState(cpu=True)  # train.py's logger (accelerate's) needs one


def checkpoint_args(tmp_path):
    import argparse

    return argparse.Namespace(output_dir=str(tmp_path), checkpoints_total_limit=3)


def checkpoint_write_points():
    """Every write of a checkpoint save: the marker's removal, the state files, the flushes, the marker."""
    module = sys.modules[__name__]  # FakeAccelerator.save_state writes through this module's `save_file`
    return [
        (Path, "unlink"),
        (module, "save_file"),
        (checkpoints, "fsync_dir"),
        (checkpoints, "fsync_file"),
        (checkpoints, "write_bytes_atomic"),
    ]


def test_resaved_checkpoint_crashing_at_each_write_is_refused_or_new(monkeypatch, tmp_path):
    """Re-saving checkpoint-3 (a resumed run reaching the same step): before, a crash after the new weights kept the
    old marker, and `latest` resumed the new weights with the old optimizer state, silently."""
    progress = TrainingProgress()
    progress.completed_steps = 3
    accelerator = FakeAccelerator()
    save_checkpoint(accelerator, checkpoint_args(tmp_path / "count"), progress)
    with monkeypatch.context() as patch:
        calls = crash_at(patch, checkpoint_write_points(), when=-1)
        save_checkpoint(accelerator, checkpoint_args(tmp_path / "count"), progress)  # over an existing one
    writes = calls["count"]
    assert writes >= 5
    for when in range(writes + 1):
        output = tmp_path / f"run{when}"
        accelerator.version = "old"
        save_checkpoint(accelerator, checkpoint_args(output), progress)
        checkpoint = output / "checkpoints" / "checkpoint-3"
        assert checkpoint_damage(checkpoint) is None
        accelerator.version = "new"
        with monkeypatch.context() as patch:
            crash_at(patch, checkpoint_write_points(), when)
            try:
                save_checkpoint(accelerator, checkpoint_args(output), progress)
                crashed = False
            except Crash:
                crashed = True
        assert crashed == (when < writes)
        versions = {load_file(str(checkpoint / name))["v"].item() for name in ("model.safetensors", "optimizer.bin")}
        damage = checkpoint_damage(checkpoint)
        if damage is None:  # complete: old before anything was touched, else all new
            assert versions == ({1.0} if when == 0 else {2.0}), (when, versions)
            assert checkpoint in list_checkpoints(output)
        else:  # invalidated: never listed, and resume names why
            assert "interrupted" in damage and checkpoint not in list_checkpoints(output)


def test_checkpoint_with_a_file_changed_after_its_marker_is_refused(tmp_path):
    progress = TrainingProgress()
    progress.completed_steps = 5
    accelerator = FakeAccelerator()
    save_checkpoint(accelerator, checkpoint_args(tmp_path), progress)
    checkpoint = tmp_path / "checkpoints" / "checkpoint-5"
    assert json.loads((checkpoint / CHECKPOINT_COMPLETE_FILE).read_text())["completed_steps"] == 5
    save_file({"v": torch.tensor([9.0])}, str(checkpoint / "optimizer.bin"))
    assert "optimizer.bin" in checkpoint_damage(checkpoint)


# ---------------------------------------------------------------------------------------------------- final model
def test_final_model_save_crashing_while_writing_leaves_the_previous_model(monkeypatch, tmp_path):
    from modeling_mqirtn import MQIRTNModel

    accelerator, processor = FakeAccelerator(), tiny_processor(tmp_path)
    old_model, new_model = tiny_model(seed=1).eval(), tiny_model(seed=2).eval()
    output = tmp_path / "out"
    save_model(accelerator, old_model, processor, output)
    (output / "eval_results.json").write_text("{}")  # the model shares output_dir with the run's other files

    def crashing_save_for_hub(model, processor, folder):
        model.save_pretrained(folder)  # the weights are written, the processor and code files are not yet
        raise Crash()

    with monkeypatch.context() as patch:
        patch.setattr(checkpoints, "save_for_hub", crashing_save_for_hub)
        with pytest.raises(Crash):
            save_model(accelerator, new_model, processor, output)
    loaded = MQIRTNModel.from_pretrained(output)
    for name, tensor in old_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)

    save_model(accelerator, new_model, processor, output)  # the next save discards the partial one
    loaded = MQIRTNModel.from_pretrained(output)
    for name, tensor in new_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    assert sorted(p.name for p in output.iterdir() if p.name.startswith(".")) == []
    assert (output / "eval_results.json").read_text() == "{}"


def test_index_save_refuses_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    with pytest.raises(ValueError, match="working folder"):
        gallery(10, 1).save(".")
    assert gallery(10, 1).save("sub") == Path("sub") and GalleryIndex.load("sub").ids == gallery(10, 1).ids


def test_load_refuses_nan_rows_and_normalises_long_ones(tmp_path):
    """index.json's hashes catch an edited file; an index saved with such rows (older versions) is caught here."""
    embeddings = torch.nn.functional.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    long_rows, nan_rows = embeddings.clone(), embeddings.clone()
    long_rows[1] *= 5
    nan_rows[2, 3] = float("nan")
    for name, rows in (("long", long_rows), ("nan", nan_rows)):
        GalleryIndex(rows, list("abcd"), fingerprint="0" * 64).save(tmp_path / name)
    with CaptureLogger(gallery_index.logger) as captured:
        loaded = GalleryIndex.load(tmp_path / "long")
    assert "1 row(s) are not unit length" in captured.out
    torch.testing.assert_close(loaded.embeddings, embeddings)
    with pytest.raises(ValueError, match="non-finite"):
        GalleryIndex.load(tmp_path / "nan")


def test_interrupted_checkpoint_folders_are_rotated_out_by_the_next_save(tmp_path):
    """A folder whose save was interrupted (no marker) is never resumable; it used to stay forever, outside
    `--checkpoints_total_limit`. The next complete save removes it and says so."""
    accelerator, progress = FakeAccelerator(), TrainingProgress()
    args = checkpoint_args(tmp_path)  # total limit 3
    folder = tmp_path / "checkpoints"
    for step in (2, 4):
        progress.completed_steps = step
        save_checkpoint(accelerator, args, progress)
    for name in ("checkpoint-6", "checkpoint-9"):  # interrupted saves: files but no marker (one past the next step)
        (folder / name).mkdir()
        save_file({"v": torch.ones(1)}, str(folder / name / "model.safetensors"))
    progress.completed_steps = 8
    save_checkpoint(accelerator, args, progress)
    assert sorted(path.name for path in folder.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-8"]
    progress.completed_steps = 10
    save_checkpoint(accelerator, args, progress)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-8", "checkpoint-10"]
    assert sorted(path.name for path in folder.iterdir()) == ["checkpoint-10", "checkpoint-4", "checkpoint-8"]


def test_accelerate_logs_no_line_per_checkpoint_file(tmp_path, caplog):
    """A real `Accelerator.save_state` / `load_state`: accelerate's INFO line per written file (and its "Saving current
    state" / "Loading states" lines) are quieted; its warnings are not."""
    import logging

    from accelerate import Accelerator

    from mqirtn_train.checkpoints import quiet_accelerate_checkpoint_logs

    # An in-process train.py run of an earlier test may have quieted them already: start from accelerate's defaults.
    logging.getLogger("accelerate.checkpointing").setLevel(logging.NOTSET)
    accelerator_logger = logging.getLogger("accelerate.accelerator")
    for existing in list(accelerator_logger.filters):
        accelerator_logger.removeFilter(existing)
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    with caplog.at_level(logging.INFO):
        accelerator.save_state(str(tmp_path / "before"))
    noisy = [r for r in caplog.records if r.name.startswith("accelerate.") and r.levelno == logging.INFO]
    assert len(noisy) >= 2  # what is quieted below: accelerate does log these
    caplog.clear()
    quiet_accelerate_checkpoint_logs()
    quiet_accelerate_checkpoint_logs()  # idempotent: one filter
    assert len(logging.getLogger("accelerate.accelerator").filters) == 1
    with caplog.at_level(logging.INFO):
        accelerator.save_state(str(tmp_path / "after"))
        accelerator.load_state(str(tmp_path / "after"))
        logging.getLogger("accelerate.checkpointing").warning("a warning still shows")
    kept = [r.getMessage() for r in caplog.records if r.name.startswith("accelerate.")]
    assert kept == ["a warning still shows"], kept
    assert model.weight.shape == (2, 2)
