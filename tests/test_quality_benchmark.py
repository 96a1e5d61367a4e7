"""Smoke test of benchmarks/quality_shapes.py at a tiny budget: it trains through train.py and writes the
per-run JSON, the summary JSON, the Markdown table and the bar chart with the expected rows; a second call with the
same settings trains nothing (resume). No timing or quality assertions.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_shapes.py"
TINY_TRAIN_ARGS = [
    "--image_size", "32", "--patch_size", "16", "--vision_hidden_size", "32", "--vision_num_hidden_layers", "1",
    "--vision_num_attention_heads", "2", "--text_from_scratch", "--text_hidden_size", "32", "--text_num_hidden_layers", "1",
    "--text_num_attention_heads", "2", "--projection_dim", "32", "--fusion_num_heads", "2",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "64",
    "--shapes_num_train_queries", "64", "--shapes_num_validation_queries", "24", "--shapes_num_test_queries", "24",
]  # fmt: skip


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("benchmark_quality_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quality_benchmark_tiny_budget_writes_table_chart_and_resumes(quality, tmp_path, monkeypatch):
    results_dir, work_dir = tmp_path / "results", tmp_path / "work"
    argv = [
        "--steps", "2", "--main_steps", "3", "--seeds", "1", "--variants", "mqirtn,no_rotation,image_only,fusion_2", "--split", "validation",
        "--results_dir", str(results_dir), "--work_dir", str(work_dir), "--no_nice", "--name", "quality_tiny",
        "--", *TINY_TRAIN_ARGS, "--shapes_cache_dir", str(tmp_path / "shapes"),
    ]  # fmt: skip
    summary = quality.main(argv)

    rows = {entry["row"]: entry for entry in summary["rows"]}
    assert list(rows) == ["mqirtn", "no_rotation", "image_only", "fusion_2"]
    # fusion_2 is train.py's default configuration at the short budget: it reuses the mqirtn_short runs.
    assert rows["fusion_2"]["same_runs_as"] == "mqirtn_short"
    # The ingredient rows train for the main budget, the others for the short one.
    assert (rows["mqirtn"]["steps"], rows["no_rotation"]["steps"], rows["image_only"]["steps"]) == (3, 3, 2)
    # What the composition does is recorded per row: no_rotation's angles are 0, MQIRTN's span radians.
    assert rows["mqirtn"]["composition"]["angle_rms"]["mean"] > 0.3
    assert rows["no_rotation"]["composition"]["angle_rms"]["mean"] == 0.0
    for entry in rows.values():
        assert entry["seeds"] == 1
        for metric in quality.METRICS:
            assert 0.0 <= entry[metric]["mean"] <= 100.0
    # Only two trainings happened, each through train.py with its own per-run JSON.
    run_files = sorted((results_dir / "quality_shapes_runs" / "validation").glob("*.json"))
    assert [path.name.split("-")[0] for path in run_files] == ["image_only", "mqirtn", "mqirtn_short", "no_rotation"]
    run = json.loads(run_files[1].read_text())
    assert run["completed_steps"] == 3 and run["split"] == "validation"
    assert "train.py" in run["command"] and "--max_train_steps 3" in run["command"]
    assert json.loads(run_files[2].read_text())["completed_steps"] == 2

    on_disk = json.loads((results_dir / "quality_tiny.json").read_text())
    assert [entry["row"] for entry in on_disk["rows"]] == ["mqirtn", "no_rotation", "image_only", "fusion_2"]
    table = (results_dir / "quality_tiny.md").read_text()
    for name in ("**mqirtn**", "no_rotation", "image_only", "fusion_2"):
        assert f"| {name} |" in table
    assert "What each ingredient adds to MQIRTN's R@1" in table and "the rotation " in table
    assert "Command: `python benchmarks/quality_shapes.py" in table
    assert (results_dir / "quality_tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(work_dir.glob("validation/*/model.safetensors"))  # model folders are not kept by default

    # Resume: a second call with the same settings finds every run's JSON and starts no training.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(subprocess, "run", no_training)
    again = quality.main(argv)
    assert again["rows"] == summary["rows"]


def test_unknown_variant_is_an_error(quality):
    with pytest.raises(SystemExit):
        quality.main(["--variants", "mqirtn,not_a_variant", "--dry_run"])


def test_every_run_shares_the_benchmark_learning_rate_unless_overridden(quality):
    args, _ = quality.parse_args([])
    assert args.shared_train_args[-2:] == ["--learning_rate", quality.DEFAULT_LEARNING_RATE]
    command = quality.train_command(args, quality.ROW_BY_NAME["tirg"], 0, quality.REPO_ROOT / "x")
    assert command.count("--learning_rate") == 1 and command[command.index("--learning_rate") + 1] == quality.DEFAULT_LEARNING_RATE
    overridden, _ = quality.parse_args(["--", "--learning_rate", "1e-3"])
    assert overridden.shared_train_args.count("--learning_rate") == 1 and overridden.shared_train_args[-1] == "1e-3"
    assert quality.settings_hash(overridden) != quality.settings_hash(args)  # runs of the two settings never mix


def test_runs_made_with_other_code_are_never_reused(quality, tmp_path, monkeypatch):
    """The cache key of a run includes the model code and train.py: after a change, old runs are not taken as new."""
    args, _ = quality.parse_args([])
    script = tmp_path / "train.py"
    script.write_text("print(1)\n")
    monkeypatch.setattr(quality, "TRAIN_SCRIPT", script)
    first = quality.settings_hash(args)
    assert quality.settings_hash(args) == first  # deterministic
    script.write_text("print(2)\n")
    assert quality.settings_hash(args) != first


def test_summarize_only_trains_nothing(quality, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("--summarize_only started a training run")

    monkeypatch.setattr(subprocess, "run", no_training)
    summary = quality.main(["--summarize_only", "--variants", "mqirtn,tirg", "--results_dir", str(tmp_path), "--name", "empty"])
    assert [(entry["row"], entry["seeds"]) for entry in summary["rows"]] == [("mqirtn", 0), ("tirg", 0)]
    assert (tmp_path / "empty.md").is_file()
