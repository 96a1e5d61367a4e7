"""The NaN guard: besides --max_nonfinite_steps non-finite losses in a row, a budget of non-finite losses over the run
(--max_nonfinite_total) stops a run that diverges late; a model whose weights or probe embeddings are not finite is
never saved (a one-line error naming the last checkpoint with finite weights, non-zero exit)."""

import argparse

import pytest
import torch
from safetensors.torch import save_file
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mqirtn_train.checkpoints import CHECKPOINT_COMPLETE_FILE, check_finite_model, save_checkpoint, save_model
from mqirtn_train.errors import TrainingStopped
from mqirtn_train.run import TrainingProgress

from utils import read_json, run_train, tiny_model, tiny_processor


class FakeAccelerator:
    """What `save_model` / `save_checkpoint` use, one process; `save_state` writes weights of the given value."""

    is_main_process = True
    weight = 1.0

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model

    def save_state(self, path):
        save_file({"w": torch.full((2,), self.weight)}, f"{path}/model.safetensors")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mqirtn-cache")


@pytest.fixture(autouse=True)
def accelerate_state():
    from accelerate import PartialState

    PartialState(cpu=True)


def checkpoints(output, weights: dict[int, float]):
    accelerator, progress = FakeAccelerator(), TrainingProgress()
    for step, weight in weights.items():
        progress.completed_steps, accelerator.weight = step, weight
        (output / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True, exist_ok=True)
        save_checkpoint(accelerator, argparse.Namespace(output_dir=str(output), checkpoints_total_limit=5), progress)


def test_a_model_with_non_finite_weights_is_not_saved_and_the_last_good_checkpoint_is_named(tmp_path):
    processor, output = tiny_processor(tmp_path), tmp_path / "run"
    checkpoints(output, {2: 1.0, 4: float("nan")})  # checkpoint-4 was saved after the divergence
    good = tiny_model().eval()
    save_model(FakeAccelerator(), good, processor, output)
    before = (output / "model.safetensors").read_bytes()
    diverged = tiny_model().eval()
    with torch.no_grad():
        diverged.image_projection.weight[0, 0] = float("nan")
    with pytest.raises(TrainingStopped, match=r"not finite \(image_projection.weight\).*checkpoint-2 ") as error:
        save_model(FakeAccelerator(), diverged, processor, output)
    assert "\n" not in str(error.value)
    assert (output / "model.safetensors").read_bytes() == before  # the previous model is untouched


def test_finite_weights_with_non_finite_embeddings_are_refused(tmp_path, monkeypatch):
    model = tiny_model().eval()
    infinite = BaseModelOutputWithPooling(pooler_output=torch.full((1, 32), float("inf")))
    monkeypatch.setattr(model, "get_image_features", lambda pixel_values: infinite)
    with pytest.raises(TrainingStopped, match=r"\(gallery embeddings\).*No checkpoint with finite weights"):
        check_finite_model(model, tiny_processor(tmp_path), tmp_path)


@pytest.mark.slow
def test_a_run_diverging_late_stops_on_its_non_finite_budget(tmp_path, cache_dir):
    """Micro-batches 1, 2 and 4 non-finite (never 3 in a row): before, exit 0 and a saved model."""
    output = tmp_path / "late"
    failed = run_train(
        ["--output_dir", str(output), "--max_train_steps", "8", "--no-do_eval", "--checkpointing_steps", "1",
         "--max_nonfinite_steps", "3", "--max_nonfinite_total", "3"],
        cache_dir, check=False, faults=["--nonfinite_micro_steps", "1,2,4"],
    )  # fmt: skip
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1, failed.stderr[-3000:]
    last = errors[0]
    assert last.startswith(
        "train.py: error: The loss was non-finite for 3 micro-batches in this run (--max_nonfinite_total 3)"
    )
    # skipped updates keep the weights finite: the newest checkpoint (step 4, two non-finite losses before it) is good
    assert "The last checkpoint with finite weights is" in last and "checkpoint-4 " in last
    assert not (output / "model.safetensors").exists()
    progress = read_json(output / "checkpoints" / "checkpoint-4" / CHECKPOINT_COMPLETE_FILE)
    assert progress["nonfinite_micro_batches"] == 2 and progress["completed_steps"] == 4
