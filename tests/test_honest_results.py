"""Recall that cannot be silently wrong or sit beside the wrong model: a model with NaN weights is not evaluated, the
queries left out of Recall (no target) are counted in the table title, eval_results.json and the card and fail the
evaluation above --max_dropped_queries, and the metrics, training state and card are swapped in with the model they
describe (a refused model or a crash leaves the previous model's files, all of them)."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from modeling_mqirtn import save_for_hub
from mqirtn_train.errors import TrainingStopped

from utils import one_error_line, run_train_script, shape_image, tiny_model, tiny_processor


@pytest.fixture
def accelerate_state():
    from accelerate import PartialState

    PartialState(cpu=True)


def saved_model(folder: Path, nan: bool = False) -> Path:
    model = tiny_model().eval()
    if nan:
        with torch.no_grad():
            model.image_projection.weight[0, 0] = float("nan")
    return save_for_hub(model, tiny_processor(folder.parent), folder)


def own_files(folder: Path, misspelled: int) -> Path:
    """A `--dataset files` folder: test.jsonl of 6 queries over 6 images, `misspelled` of them with `tagret`."""
    folder.mkdir()
    for i in range(6):
        shape_image(i).save(folder / f"i{i}.png")
    rows = [
        {
            "reference": f"i{i}.png",
            "text": "make it red",
            "id": i,
            ("tagret" if i < misspelled else "target"): f"i{(i + 1) % 6}.png",
        }
        for i in range(6)
    ]
    (folder / "test.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return folder


def eval_only(tmp_path, monkeypatch, model: Path, data: Path, *extra) -> int:
    monkeypatch.setenv("MQIRTN_CACHE", str(tmp_path / "cache"))
    argv = [
        "--eval_only",
        "--model_name_or_path",
        str(model),
        "--dataset",
        "files",
        "--data_dir",
        str(data),
        "--eval_split",
        "test",
        "--output_dir",
        str(tmp_path / "out"),
        "--num_results_grids",
        "0",
        *extra,
    ]
    return run_train_script(argv, monkeypatch)


def test_eval_only_of_a_nan_model_is_refused(tmp_path, monkeypatch, capsys):
    model = saved_model(tmp_path / "nan_model", nan=True)
    assert eval_only(tmp_path, monkeypatch, model, own_files(tmp_path / "data", 0)) == 1
    line = one_error_line(capsys, "train.py: error:")
    assert "The model is not finite (image_projection.weight" in line and "it was not evaluated" in line
    assert not (tmp_path / "out" / "eval_results.json").exists()


def test_dropped_queries_fail_the_evaluation_by_default(tmp_path, monkeypatch, capsys):
    model = saved_model(tmp_path / "model")
    assert eval_only(tmp_path, monkeypatch, model, own_files(tmp_path / "data", 4)) == 1
    line = one_error_line(capsys, "train.py: error:")
    assert "4 of the 6 test queries (66.7 %) have no target and would be left out of Recall" in line
    assert "--max_dropped_queries 0 allows" in line
    assert not (tmp_path / "out" / "eval_results.json").exists()


def test_dropped_queries_are_counted_wherever_the_recalls_go(tmp_path, monkeypatch, capsys):
    model = saved_model(tmp_path / "model")
    status = eval_only(tmp_path, monkeypatch, model, own_files(tmp_path / "data", 4), "--max_dropped_queries", "0.7")
    assert status in (0, None)
    out = capsys.readouterr().out
    assert "test (6 queries, 4 dropped queries, 6 gallery images), %" in out
    table = out.split("gallery images), %\n", 1)[1].splitlines()
    assert "dropped_queries" not in table[0] and "recall@1" in table[0]
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text())["test"]["dropped_queries"] == 4


class FakeAccelerator:
    is_main_process = True
    trackers = ()

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model


def publish_args(output: Path) -> argparse.Namespace:
    return argparse.Namespace(
        output_dir=str(output),
        eval_only=False,
        source="shapes",
        composition="mqirtn",
        dataset_name=None,
        model_name_or_path=None,
        text_model_name_or_path=None,
        text_from_scratch=True,
        vision_model_name_or_path=None,
        hub_model_id=None,
        push_to_hub=False,
        hub_token=None,
    )


def test_metrics_are_swapped_in_with_the_model(tmp_path, accelerate_state, monkeypatch):
    from mqirtn_app import atomic
    from mqirtn_train import checkpoints
    from mqirtn_train.publishing import save_and_publish

    output, processor = tmp_path / "out", tiny_processor(tmp_path)
    old_model = tiny_model(seed=0).eval()
    results = {"test": {"recall@1": 10.0}}
    save_and_publish(
        publish_args(output), FakeAccelerator(), old_model, processor, results, {"completed_steps": 1}, {}, {}
    )
    names = {"eval_results.json", "training_state.json", "README.md", "model.safetensors"}
    assert names <= {p.name for p in output.iterdir()}
    before = {name: (output / name).read_bytes() for name in names}

    # A refused (non-finite) model: nothing of the new run is written.
    nan_model = tiny_model(seed=1).eval()
    with torch.no_grad():
        nan_model.image_projection.weight[0, 0] = float("nan")
    with pytest.raises(TrainingStopped, match="it was not saved"):
        save_and_publish(
            publish_args(output),
            FakeAccelerator(),
            nan_model,
            processor,
            {"test": {"recall@1": 99.0}},
            {"completed_steps": 2},
            {},
            {},
        )
    assert {name: (output / name).read_bytes() for name in names} == before

    # A crash before the swap (a kill, a full disk): the same.
    def crash(staged, folder):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoints, "move_files_into", crash)
    with pytest.raises(OSError):
        save_and_publish(
            publish_args(output),
            FakeAccelerator(),
            tiny_model(seed=2).eval(),
            processor,
            {"test": {"recall@1": 55.0}},
            {"completed_steps": 3},
            {},
            {},
        )
    assert {name: (output / name).read_bytes() for name in names} == before

    # A good save: the four files change together.
    monkeypatch.setattr(checkpoints, "move_files_into", atomic.move_files_into)
    save_and_publish(
        publish_args(output),
        FakeAccelerator(),
        tiny_model(seed=3).eval(),
        processor,
        {"test": {"recall@1": 42.0, "dropped_queries": 2}},
        {"completed_steps": 4},
        {},
        {},
    )
    assert json.loads((output / "eval_results.json").read_text())["test"]["recall@1"] == 42.0
    assert json.loads((output / "training_state.json").read_text())["completed_steps"] == 4
    card = (output / "README.md").read_text()
    assert "42.00" in card and "dropped_queries" in card  # the card says how many queries Recall left out
    assert (output / "model.safetensors").read_bytes() != before["model.safetensors"]
