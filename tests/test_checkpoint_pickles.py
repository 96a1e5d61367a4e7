"""Resuming never unpickles: the training progress and the learning-rate schedule come from the checkpoint's
progress.json (JSON), accelerate's files are read with `weights_only=True`, and a checkpoint holding accelerate's
custom-state pickles (`custom_checkpoint_*.pkl`, which accelerate loads with full unpickling) or a progress.json
without file hashes is refused in one line. A crafted pickle whose loading would write a file proves nothing ran."""

import json

import pytest
import torch

from mqirtn_app.atomic import file_hashes
from mqirtn_train.checkpoints import CHECKPOINT_COMPLETE_FILE, checkpoint_damage, checkpoint_record

from utils import TRAIN_DATA_ARGS, one_error_line, run_train_script


TINY_MODEL = [
    "--patch_size", "8", "--vision_hidden_size", "32", "--vision_num_hidden_layers", "1", "--vision_num_attention_heads", "2",
    "--text_from_scratch", "--text_hidden_size", "32", "--text_num_hidden_layers", "1", "--text_num_attention_heads", "2",
    "--projection_dim", "32", "--fusion_num_heads", "4", "--per_device_train_batch_size", "8",
]  # fmt: skip


class WritesAFile:
    """Unpickling this calls `open(path, "w").write("code ran")`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('code ran')",))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint: two steps of a tiny run, saved at step 2."""
    import _pytest.monkeypatch

    root = tmp_path_factory.mktemp("pickles")
    with _pytest.monkeypatch.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("MQIRTN_CACHE", str(root / "cache"))
        argv = [
            *TRAIN_DATA_ARGS,
            *TINY_MODEL,
            "--max_train_steps",
            "2",
            "--checkpointing_steps",
            "2",
            "--output_dir",
            str(root / "out"),
            "--no-do_eval",
        ]
        assert run_train_script(argv, monkeypatch) in (0, None)
    path = root / "out" / "checkpoints" / "checkpoint-2"
    assert checkpoint_damage(path) is None
    return root, path


def _copy_with(checkpoint, target, pickles=(), drop_hashes=False):
    import shutil

    shutil.copytree(checkpoint, target)
    for name, payload in pickles:
        torch.save(payload, target / name)  # the format accelerate's load_custom_state reads
    record = json.loads((target / CHECKPOINT_COMPLETE_FILE).read_text())
    record["files"] = {k: v for k, v in file_hashes(target).items() if k != CHECKPOINT_COMPLETE_FILE}  # re-signed
    if drop_hashes:
        del record["files"]
    (target / CHECKPOINT_COMPLETE_FILE).write_text(json.dumps(record))
    return target


def test_checkpoints_hold_no_pickled_custom_state(checkpoint):
    _, path = checkpoint
    assert not list(path.glob("custom_checkpoint_*.pkl"))
    record = checkpoint_record(path)
    assert record["completed_steps"] == 2 and record["lr_scheduler"]["last_epoch"] == 2


def _resume(root, checkpoint, monkeypatch, name):
    monkeypatch.setenv("MQIRTN_CACHE", str(root / "cache"))
    argv = [
        *TRAIN_DATA_ARGS,
        *TINY_MODEL,
        "--max_train_steps",
        "3",
        "--output_dir",
        str(root / name),
        "--no-do_eval",
        "--resume_from_checkpoint",
        str(checkpoint),
    ]
    return run_train_script(argv, monkeypatch)


def test_crafted_custom_state_pickle_is_refused_and_never_loaded(checkpoint, tmp_path, monkeypatch, capsys):
    root, path = checkpoint
    marker = tmp_path / "code_ran"
    crafted = _copy_with(
        path, tmp_path / "crafted", pickles=[(f"custom_checkpoint_{i}.pkl", WritesAFile(marker)) for i in range(2)]
    )
    assert _resume(root, crafted, monkeypatch, "crafted_out") == 1
    line = one_error_line(capsys, "train.py: error:")
    assert "custom_checkpoint_0.pkl, custom_checkpoint_1.pkl, pickled state that is never loaded" in line
    assert not marker.exists()


def test_marker_without_file_hashes_is_not_resumed(checkpoint, tmp_path, monkeypatch, capsys):
    root, path = checkpoint
    unsigned = _copy_with(path, tmp_path / "unsigned", drop_hashes=True)
    assert checkpoint_damage(unsigned) == "its progress.json lists no file hashes, so its files cannot be checked"
    assert _resume(root, unsigned, monkeypatch, "unsigned_out") == 1
    assert "lists no file hashes" in one_error_line(capsys, "train.py: error:")


def test_resume_restores_progress_and_schedule_from_json(checkpoint, monkeypatch, capsys):
    """A clean resume: one more step from step 2, the schedule continuing (no pickles needed)."""
    root, path = checkpoint
    assert _resume(root, path, monkeypatch, "resumed_out") in (0, None)
    state = json.loads((root / "resumed_out" / "training_state.json").read_text())
    assert state["completed_steps"] == 3


def test_crafted_rng_state_is_read_without_running_code(checkpoint, tmp_path, monkeypatch, capsys):
    """accelerate's own pickles (RNG states, optimizer) are read with `weights_only=True`: a crafted one is an error
    (one line), and its code does not run."""
    root, path = checkpoint
    marker = tmp_path / "code_ran"
    crafted = _copy_with(path, tmp_path / "crafted_rng", pickles=[("random_states_0.pkl", WritesAFile(marker))])
    assert _resume(root, crafted, monkeypatch, "crafted_rng_out") == 1
    assert "weights_only" in one_error_line(capsys, "train.py: error:")
    assert not marker.exists()
