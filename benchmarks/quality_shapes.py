#!/usr/bin/env python
"""Retrieval quality on the built-in shapes benchmark: MQIRTN as published, this package's default, the baselines,
each of the default's departures from ComposeAE alone, and ablations, every row at one budget with matched seeds.

Each run is train.py itself, started as a subprocess (no second training loop here), with identical towers, data
and step budget; only the row's own flags, the seed and the composition's learning rate differ. The grid:

    main        mqirtn_paper (MQIRTN as published: fusion + ComposeAE's modules, no image residual), mqirtn (the
                default: that plus the image residual and five module changes), tirg, composeae, realspace_concat;
                the main job's 936 steps, seeds 0-4
    deviation   mqirtn_paper plus ONE of the default's changes (shared projection, plain MLPs without BatchNorm /
                Dropout, the small rho_conv, normal init, angle LayerNorm, image residual); 936 steps, seeds 0-2
    ablation    the default without the rotation (angles still feed rho_conv), without any angle path, without the
                symmetric constraint, without the reconstruction terms; 936 steps, seeds 0-2
    spread      the default with one suspect of its seed-to-seed spread changed: the logit scale fixed, the mapping
                weights initialised (1, 1), no angle LayerNorm, half the learning rate; and the default with the two
                changes that do not help the paper preset reverted to ComposeAE's modules (two projections, its
                rho_conv); 936 steps, seeds 0-4, read on validation (every test-split run's model is evaluated on
                validation too)

Differences between rows are **paired by seed**: the mean +- std of the per-seed differences over the seeds both rows
have; a row is never subtracted from a mean over other seeds.

Learning rate, per composition: `LEARNING_RATES`. `--lr_grid` trains every main composition at each rate of
`LR_GRID` on the validation split at a shorter budget (`LR_GRID_STEPS`, seed 0) and the summary says which rate each
composition's grid chooses and whether `LEARNING_RATES` agrees.

**The run cache cannot go stale.** A run is stored as `<results_dir>/quality_runs/<split>/<row>-seed<S>-<key>.json`
where key hashes train.py's full argument list (row flags, seed, steps, learning rate, data sizes), the thread count
and the installed library versions (torch, transformers, accelerate, datasets, tokenizers, numpy, Pillow, the text
tower's package, ...). Inside, `sources` records the SHA-256 of every file of this repository the run imported
(train.py and whatever it imported from modeling_mqirtn/, processing/, mqirtn_app/ or any other package of the
repository, collected from `sys.modules` when the run ends). A stored run counts only while every one of those files
is unchanged; otherwise it is reported as stale and trained again. A run whose repository packages came from another
checkout (an editable install elsewhere) fails. `--at_commit C` trains with the code of commit C (exported once to
<work_dir>/code/) and judges runs against it, so a grid can be continued at one code version over many sessions
while the checkout moves on; its runs are keyed apart from the checkout's.

Chunks: `--max_runs N` / `--max_minutes M` stop after N trainings / start none after M minutes, so each invocation
fits a working stretch and the cache accumulates; several invocations of one command work side by side (each run is
claimed by one process under <work_dir>/claims/; one core each with the default --threads 1); `--summarize_only`
trains nothing and writes what exists and what is missing. Summaries: `<results_dir>/<name>.json` and `.md` (name `quality_grid`, `quality_lr_grid` with --lr_grid).

    python benchmarks/quality_shapes.py --max_minutes 25                 # next runs of the grid, in order
    python benchmarks/quality_shapes.py --at_commit <C> --max_minutes 25 # the same at the grid's pinned code
    python benchmarks/quality_shapes.py --summarize_only                 # the table so far, and what is missing
    python benchmarks/quality_shapes.py --lr_grid --max_minutes 25       # the learning-rate grid on validation
    python benchmarks/quality_shapes.py --quick --split validation       # minutes: does everything work?

Cost here (2 shared CPU cores, one thread per run): a fusion run of 936 steps takes about 12 minutes alone
(~1.35 steps/s), a baseline about 6 (~2.6 steps/s), plus about a minute of start-up and test evaluation; with other
jobs on the machine, up to twice that. The whole grid is 25 main + 18 deviation + 12 ablation + 20 spread runs:
about 14 hours of one core.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
# The code the runs train with: this checkout, or with --at_commit a snapshot of one commit (`code_snapshot`).
CODE_ROOT = REPO_ROOT
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
METRICS = ("recall@1", "recall@5", "recall@10", "recall@50")
MAIN_JOB_STEPS = 936  # train.py's default run: 3 epochs of 20,000 shapes queries at batch 64
SEEDS = {"main": 5, "deviation": 3, "ablation": 3, "spread": 5}
# Learning rate of the new layers per composition: the best validation R@1 of `--lr_grid` (LR_GRID at LR_GRID_STEPS,
# seed 0; benchmarks/results/quality_lr_grid.md). R@1 at 1.25e-4 / 2.5e-4 / 5e-4 / 1e-3: mqirtn_paper 12.60 / 19.55 /
# 8.25 / 2.15; TIRG 37.45 / 42.10 / 42.50 / 34.75; ComposeAE 12.05 / 17.55 / 19.50 / 9.95; real-space 30.20 / 35.90 /
# 32.20 / 23.60. The default: see the grid's summary (it says whether this table agrees with it).
LEARNING_RATES = {
    "mqirtn_paper": "2.5e-4",
    "mqirtn": "5e-4",
    "tirg": "5e-4",
    "composeae": "5e-4",
    "realspace_concat": "2.5e-4",
}
# Rates a factor 2 apart; a choice at either end of the grid is reported as such (the grid should then grow).
LR_GRID = ("1.25e-4", "2.5e-4", "5e-4", "1e-3")
LR_GRID_STEPS = 300
QUICK_STEPS = 40
QUICK_SHAPES_SIZES = (
    "--shapes_num_train_queries",
    "3000",
    "--shapes_num_validation_queries",
    "500",
    "--shapes_num_test_queries",
    "1000",
)
# What train.py's eval_results.json records about the composition after training, kept per run.
COMPOSITION_KEYS = (
    "angle_rms",
    "angle_share_over_quarter_pi",
    "angle_spread_across_texts",
    "angle_text_share",
    "composition_norm_share",
    "loss_symmetric",
    "loss_symmetric_same_rotation",
    "loss_symmetric_zero_rotation",
    "loss_symmetric_shuffled_rotation",
    "back_query_cosine_conjugate_vs_same",
    "grad_share_base",
    "grad_share_symmetric",
    "grad_share_reconstruction_image",
    "grad_share_reconstruction_text",
)


@dataclass(frozen=True)
class Row:
    """One line of the table: its name, what it is, its group (main / deviation / ablation / spread: a change to the
    default, seeded like the main rows), its composition (which sets its learning rate) and its train.py flags on top
    of the shared ones."""

    name: str
    description: str
    group: str
    composition: str
    train_args: tuple[str, ...] = ()
    learning_rate: str | None = None  # this row's own rate instead of its composition's


def _paper(deviations: str) -> tuple[str, ...]:
    return ("--composition", "mqirtn_paper", "--config_overrides", deviations)


ROWS: tuple[Row, ...] = (
    Row("mqirtn_paper", "MQIRTN as published: fusion + ComposeAE's modules, no image residual", "main", "mqirtn_paper", ("--composition", "mqirtn_paper")),
    Row("mqirtn", "the default: mqirtn_paper + image residual + the five module changes", "main", "mqirtn"),
    Row("tirg", "TIRG (published modules)", "main", "tirg", ("--composition", "tirg")),
    Row("composeae", "ComposeAE (published modules), no fusion", "main", "composeae", ("--composition", "composeae")),
    Row("realspace_concat", "ComposeAE's real-space ablation (published modules)", "main", "realspace_concat", ("--composition", "realspace_concat")),
    Row("paper+shared_projection", "one complex projection for both mappings", "deviation", "mqirtn_paper", _paper("composition_deviations=[shared_projection]")),
    Row("paper+plain_mlps", "Linear-GELU-Linear maps, no BatchNorm / Dropout", "deviation", "mqirtn_paper", _paper("composition_deviations=[plain_mlps]")),
    Row("paper+small_conv", "rho_conv: 2 convs x 16 channels, average pooling", "deviation", "mqirtn_paper", _paper("composition_deviations=[small_conv]")),
    Row("paper+normal_init", "0.02-std normal init", "deviation", "mqirtn_paper", _paper("composition_deviations=[normal_init]")),
    Row("paper+angle_layernorm", "LayerNorm on the angles", "deviation", "mqirtn_paper", _paper("composition_deviations=[angle_layernorm]")),
    Row("paper+image_residual", "text-gated residual of the reference", "deviation", "mqirtn_paper", _paper("image_residual=true")),
    Row("no_rotation", "default, rotation=false: identity rotation, angles still feed rho_conv", "ablation", "mqirtn", ("--config_overrides", "rotation=false")),
    Row("no_angle_path", "default, rotation=false + angle_channel=false: no angle path", "ablation", "mqirtn", ("--config_overrides", "rotation=false,angle_channel=false")),
    Row("no_symmetric", "default, symmetric_loss_weight=0", "ablation", "mqirtn", ("--config_overrides", "symmetric_loss_weight=0")),
    Row("no_reconstruction", "default, both reconstruction weights 0", "ablation", "mqirtn", ("--config_overrides", "reconstruction_image_loss_weight=0,reconstruction_text_loss_weight=0")),
    Row("spread:fixed_logit_scale", "default, logit scale fixed at its initial 20", "spread", "mqirtn", ("--logit_scale_lr", "0")),
    Row("spread:mapping_init_1_1", "default, mapping weights initialised (1, 1), not (10, 1)", "spread", "mqirtn", ("--config_overrides", "composition_weights_init=[1,1]")),
    Row("spread:no_angle_layernorm", "default without the angle LayerNorm", "spread", "mqirtn", _paper("composition_deviations=[shared_projection,plain_mlps,small_conv,normal_init],image_residual=true")),
    Row("spread:half_lr", "default at half its learning rate", "spread", "mqirtn", (), "half"),
    Row("revert:projections_conv", "default with ComposeAE's two projections and rho_conv (the two changes that do not help the paper preset)", "spread", "mqirtn", _paper("composition_deviations=[plain_mlps,normal_init,angle_layernorm],image_residual=true")),
)  # fmt: skip
ROW_BY_NAME = {row.name: row for row in ROWS}
# Paired comparisons of the table: (row, minus row, what the difference says).
PAIRS: tuple[tuple[str, str, str], ...] = (
    ("mqirtn_paper", "tirg", "MQIRTN as published vs TIRG"),
    ("mqirtn_paper", "composeae", "MQIRTN as published vs ComposeAE (what fusion adds to it)"),
    ("mqirtn_paper", "realspace_concat", "MQIRTN as published vs ComposeAE's real-space ablation"),
    ("mqirtn", "mqirtn_paper", "what our additions add to MQIRTN as published"),
    ("mqirtn", "tirg", "the default vs TIRG"),
    ("mqirtn", "composeae", "the default vs ComposeAE"),
    *(
        (row.name, "mqirtn_paper", f"what {row.name.split('+')[1]} adds to the paper preset")
        for row in ROWS
        if row.group == "deviation"
    ),
    *(("mqirtn", row.name, f"what the default loses as {row.name}") for row in ROWS if row.group == "ablation"),
    *(
        (row.name, "mqirtn", f"what {row.name.split(':')[1]} changes in the default")
        for row in ROWS
        if row.group == "spread"
    ),
)


# ================================================================================================ arguments
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="Train the shapes quality grid through train.py in cached chunks and compare Recall@K, paired by seed. "
        "Arguments after `--` (or any this script does not know) are passed to every train.py run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help=f"Steps of every run (default {MAIN_JOB_STEPS}; --lr_grid {LR_GRID_STEPS}; --quick {QUICK_STEPS}).",
    )
    parser.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        help=f"Seeds 0..N-1 of every row (default per group: {SEEDS}; --lr_grid and --quick 1).",
    )
    parser.add_argument(
        "--variants", default=None, help=f"Comma-separated rows (default: all): {', '.join(ROW_BY_NAME)}."
    )
    parser.add_argument(
        "--split",
        choices=("validation", "test"),
        default=None,
        help="Evaluation split (default test; --lr_grid validation).",
    )
    parser.add_argument(
        "--lr_grid",
        action="store_true",
        help=f"The learning-rate grid {LR_GRID} of every main composition, on validation.",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"Minutes: {QUICK_STEPS} steps, 1 seed, smaller shapes splits."
    )
    parser.add_argument(
        "--max_runs", type=_positive_int, default=None, help="Train at most this many runs in this call."
    )
    parser.add_argument(
        "--max_minutes", type=_positive_float, default=None, help="Start no run after this many minutes."
    )
    parser.add_argument("--results_dir", default=str(RESULTS_DIR), help="Where the per-run JSON and the summaries go.")
    parser.add_argument(
        "--name",
        default=None,
        help="Summary file name stem (default quality_grid / quality_lr_grid, _quick / _<split> added).",
    )
    parser.add_argument(
        "--work_dir",
        default=str(REPO_ROOT / "outputs" / "quality_shapes"),
        help="train.py output folders (not kept in git).",
    )
    parser.add_argument(
        "--keep_models",
        action="store_true",
        help="Keep each run's model folder (default: deleted after reading its results).",
    )
    parser.add_argument("--nice", type=int, default=19, help="Niceness of the train.py runs (0: not niced).")
    parser.add_argument(
        "--threads", type=_positive_int, default=1, help="OMP_NUM_THREADS of each run (part of the run key)."
    )
    parser.add_argument(
        "--at_commit",
        default=None,
        help="Train (and judge runs) with the code of this git commit, exported to <work_dir>/code/<commit>, instead of "
        "this checkout: later sessions continue one grid at one code version while the code moves on.",
    )
    parser.add_argument("--dry_run", action="store_true", help="Print the commands of the missing runs, run nothing.")
    parser.add_argument(
        "--pair_runs",
        nargs=2,
        metavar=("GLOB_A", "GLOB_B"),
        default=None,
        help="Train nothing: the per-seed differences A - B of two sets of stored run JSONs (any of this script's run "
        "files, by glob), over the seeds both sets have.",
    )
    parser.add_argument(
        "--summarize_only", action="store_true", help="Train nothing: summarize what exists, list what is missing."
    )
    parser.add_argument(
        "--update_readme",
        action="store_true",
        help="Also write the summary's short table into README.md (between its quality-grid markers).",
    )
    args, train_extra = parser.parse_known_args(argv)
    train_extra = [item for item in train_extra if item != "--"]
    for forbidden in (
        "--output_dir",
        "--seed",
        "--max_train_steps",
        "--eval_split",
        "--composition",
        "--learning_rate",
    ):
        if any(item == forbidden or item.startswith(forbidden + "=") for item in train_extra):
            parser.error(f"{forbidden} is set by this script per run; do not pass it through to train.py")
    args.split = args.split or ("validation" if args.lr_grid else "test")
    args.steps = args.steps or (QUICK_STEPS if args.quick else LR_GRID_STEPS if args.lr_grid else MAIN_JOB_STEPS)
    if args.variants is None:
        args.rows = [row for row in ROWS if row.group == "main"] if args.lr_grid else list(ROWS)
    else:
        names = [name.strip() for name in args.variants.split(",") if name.strip()]
        unknown = [name for name in names if name not in ROW_BY_NAME]
        if unknown or not names:
            parser.error(f"--variants: unknown row(s) {unknown or names!r}; allowed: {', '.join(ROW_BY_NAME)}")
        args.rows = [ROW_BY_NAME[name] for name in names]
    if args.name is None:
        args.name = ("quality_lr_grid" if args.lr_grid else "quality_grid") + ("_quick" if args.quick else "")
        if args.split != ("validation" if args.lr_grid else "test"):
            args.name += f"_{args.split}"
    # Shared train.py flags: the wall-clock guard off (every run takes exactly its steps), no qualitative figures.
    shared = ["--max_train_minutes", "0", "--num_results_grids", "0"]
    if args.quick:
        shared += list(QUICK_SHAPES_SIZES)
    args.shared_train_args = shared + train_extra
    args.shared_eval_args = shared[2:] + evaluation_flags(train_extra)  # the same data; the model folder has the rest
    return args, train_extra


# Flags passed through to train.py that an `--eval_only` of the trained model needs too (the data); the others
# (tower sizes, optimisation) are the saved model's or training's own, and train.py refuses most with a model folder.
EVALUATION_FLAG_PREFIXES = ("--shapes_", "--per_device_eval_batch_size", "--dataloader_num_workers")


def evaluation_flags(train_extra: list[str]) -> list[str]:
    """The `EVALUATION_FLAG_PREFIXES` flags of `train_extra`, each with its values."""
    kept, keep = [], False
    for item in train_extra:
        if item.startswith("--"):
            keep = item.startswith(EVALUATION_FLAG_PREFIXES)
        if keep:
            kept.append(item)
    return kept


def row_seeds(args, row: Row) -> list[int]:
    if args.seeds is not None:
        return list(range(args.seeds))
    return [0] if (args.lr_grid or args.quick) else list(range(SEEDS[row.group]))


def row_learning_rate(row: Row) -> str:
    """The row's rate: its composition's (`LEARNING_RATES`), or half of it for a row whose `learning_rate` is "half"."""
    rate = LEARNING_RATES[row.composition]
    if row.learning_rate is None:
        return rate
    if row.learning_rate != "half":
        return row.learning_rate
    mantissa, exponent = f"{float(rate) / 2:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def run_learning_rates(args, row: Row) -> list[str]:
    return list(LR_GRID) if args.lr_grid else [row_learning_rate(row)]


# ================================================================================================ the run cache
def library_versions() -> dict[str, str | None]:
    """The versions of the libraries that decide a run's weights (`mqirtn_train.versions`; imported here, not at the
    top, so this script can also record runs of an older commit's code)."""
    from mqirtn_train.versions import library_versions as installed

    return installed()


def train_arguments(args, row: Row, seed: int, learning_rate: str) -> list[str]:
    """train.py's arguments for one run, except --output_dir (a run's key is a hash of exactly these)."""
    base = [
        "--seed",
        str(seed),
        "--max_train_steps",
        str(args.steps),
        "--eval_split",
        args.split,
        "--learning_rate",
        learning_rate,
    ]
    return base + args.shared_train_args + list(row.train_args)


def run_key(args, row: Row, seed: int, learning_rate: str) -> str:
    record = {
        "train_args": train_arguments(args, row, seed, learning_rate),
        "threads": args.threads,
        "versions": library_versions(),
        "code": args.at_commit or "checkout",
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]


def run_path(args, row: Row, seed: int, learning_rate: str) -> Path:
    # ':' is not allowed in file names on every system git checks out to
    stem = f"{row.name.replace(':', '_')}-seed{seed}" + (f"-lr{learning_rate}" if args.lr_grid else "")
    return (
        Path(args.results_dir) / "quality_runs" / args.split / f"{stem}-{run_key(args, row, seed, learning_rate)}.json"
    )


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def changed_sources(run: dict, root: Path | None = None) -> list[str]:
    """The files a stored run imported that differ now in `root` (default: the code the runs train with) or are gone;
    [] when the run is current. A run without a record of its sources counts as changed."""
    root = CODE_ROOT if root is None else root
    sources = run.get("sources")
    if not sources:
        return ["(no record of the run's sources)"]
    return [
        name
        for name, digest in sorted(sources.items())
        if not (root / name).is_file() or file_digest(root / name) != digest
    ]


def imported_sources(root: Path, exclude: tuple[Path, ...] = ()) -> dict[str, str]:
    """SHA-256 of every file of the repository at `root` that is imported in this process (by relative path).

    Raises if a module named like one of the repository's own packages or modules was imported from elsewhere.
    """
    root = root.resolve()
    own = {p.name for p in root.iterdir() if (p / "__init__.py").is_file()} | {p.stem for p in root.glob("*.py")}
    sources = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not isinstance(file, str) or not os.path.isabs(file) or not os.path.isfile(file):
            continue  # built-in, frozen or namespace-like modules (some name a bare file they were not read from)
        path = Path(file).resolve()
        if root in path.parents and ".venv" not in path.relative_to(root).parts:
            if path.suffix == ".py" and path not in exclude:
                sources[path.relative_to(root).as_posix()] = file_digest(path)
        elif name.split(".")[0] in own and name != "__main__":
            raise RuntimeError(
                f"module {name} was imported from {path}, not from {root}: results would not match its code"
            )
    return dict(sorted(sources.items()))


def record_run(sources_path: str, code_root: str, train_argv: list[str]) -> int:
    """Runs `code_root`/train.py in this process with `train_argv`, then writes the sources it imported (files of
    `code_root`) to `sources_path`."""
    import runpy

    root = Path(code_root).resolve()
    train_script = root / "train.py"
    sys.argv = [str(train_script), *train_argv]  # `code_root` is importable: `run_one` puts it on PYTHONPATH
    code = 0
    try:
        runpy.run_path(str(train_script), run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    sources = imported_sources(root, exclude=(Path(__file__).resolve(),))
    sources["train.py"] = file_digest(train_script)
    Path(sources_path).write_text(json.dumps(sources, indent=1, sort_keys=True))
    return code


def train_command(args, row: Row, seed: int, learning_rate: str, output_dir: Path, sources_path: Path) -> list[str]:
    command = ["nice", "-n", str(args.nice)] if args.nice else []
    # The code root's own copy of this script runs train.py (so edits to this checkout meanwhile change nothing there).
    recorder = CODE_ROOT / "benchmarks" / "quality_shapes.py"
    recorder = (
        recorder
        if "def record_run(" in (recorder.read_text() if recorder.is_file() else "")
        else Path(__file__).resolve()
    )
    command += [sys.executable, str(recorder), "--record_run", str(sources_path), str(CODE_ROOT)]
    command += ["--output_dir", str(output_dir)]
    return command + train_arguments(args, row, seed, learning_rate)


# The training progress bar's postfix, one per step: "  37/936 [...]  loss=2.351, scale=14.7]".
_PROGRESS = re.compile(r"(\d+)/(\d+) \[[^\]]*?loss=([-+\d.eE]+), scale=([-+\d.eE]+)\]")
TRAJECTORY_POINTS = 20


def training_trajectory(log_text: str) -> dict:
    """The training loss and logit scale at TRAJECTORY_POINTS evenly spaced steps (and the last), read from the
    run's progress bar: how a seed's run got where it did (the logit scale's growth, a late collapse)."""
    by_step = {}
    for match in _PROGRESS.finditer(log_text):
        by_step[int(match.group(1))] = (float(match.group(3)), float(match.group(4)))
    if not by_step:
        return {}
    last = max(by_step)
    steps = sorted(
        {max(1, round(last * k / TRAJECTORY_POINTS)) for k in range(1, TRAJECTORY_POINTS + 1)} & set(by_step)
    )
    return {
        "step": steps,
        "loss": [by_step[step][0] for step in steps],
        "logit_scale": [by_step[step][1] for step in steps],
    }


def final_parameters(model_file: Path) -> dict:
    """The trained logit scale and the composition's mapping weights (a_linear, a_conv), from model.safetensors."""
    if not model_file.is_file():
        return {}
    from safetensors import safe_open

    values = {}
    with safe_open(str(model_file), framework="pt") as tensors:
        for name in tensors.keys():
            if name == "logit_scale" or name.endswith("mapping_weights"):
                values[name] = [round(float(x), 6) for x in tensors.get_tensor(name).float().flatten()]
    return values


def evaluate_on_validation(args, model_dir: Path, seed: int, env: dict) -> dict | None:
    """Recall@K of a test-split run's trained model on the validation split too (`train.py --eval_only`, same code):
    choices made from the grid's runs (a learning rate, a default) are then made on validation, never on test."""
    eval_dir = model_dir.with_name(model_dir.name + "-validation")
    command = ["nice", "-n", str(args.nice)] if args.nice else []
    command += [sys.executable, str(CODE_ROOT / "train.py"), "--eval_only", "--model_name_or_path", str(model_dir)]
    command += ["--output_dir", str(eval_dir), "--eval_split", "validation", "--seed", str(seed)]
    command += args.shared_eval_args
    log_path = model_dir.parent / f"{model_dir.name}-validation.log"
    with open(log_path, "w") as log:
        completed = subprocess.run(command, cwd=CODE_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if completed.returncode != 0:  # the trained run is kept all the same; the summary counts what is missing
        tail = log_path.read_text(errors="replace").splitlines()[-3:]
        print(f"validation evaluation of {model_dir} failed (log {log_path}): " + " / ".join(tail), flush=True)
        return None
    metrics = json.loads((eval_dir / "eval_results.json").read_text())["validation"]
    shutil.rmtree(eval_dir, ignore_errors=True)
    return metrics


def run_one(args, row: Row, seed: int, learning_rate: str) -> dict:
    """Train + evaluate one run with train.py; return (and store) its results."""
    path = run_path(args, row, seed, learning_rate)
    output_dir = Path(args.work_dir) / args.split / path.stem
    sources_path = output_dir.parent / f"{path.stem}.sources.json"
    command = train_command(args, row, seed, learning_rate, output_dir, sources_path)
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        TOKENIZERS_PARALLELISM="false",
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CODE_ROOT), env.get("PYTHONPATH")]))
    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = output_dir.parent / f"{path.stem}.log"
    start = time.time()
    with open(log_path, "w") as log:
        completed = subprocess.run(command, cwd=CODE_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - start
    if completed.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(
            f"train.py failed for {row.name} seed {seed} (exit {completed.returncode}); log {log_path}:\n"
            + "\n".join(tail)
        )
    eval_results = json.loads((output_dir / "eval_results.json").read_text())
    validation = evaluate_on_validation(args, output_dir, seed, env) if args.split == "test" else None
    state_path = output_dir / "training_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    composition = eval_results.get("composition", {}).get("end", {})
    result = {
        "row": row.name,
        "seed": seed,
        "split": args.split,
        "steps": args.steps,
        "learning_rate": learning_rate,
        "completed_steps": state.get("completed_steps"),
        "train_seconds": state.get("train_seconds"),
        "wall_seconds": round(wall, 1),
        "metrics": eval_results[args.split],
        "retrieval": eval_results.get("retrieval_diagnostics", {}).get(args.split, {}),
        **({"validation_metrics": validation} if validation is not None else {}),
        "composition": {k: v for k, v in composition.items() if k in COMPOSITION_KEYS},
        "final_parameters": final_parameters(output_dir / "model.safetensors"),
        "trajectory": training_trajectory(log_path.read_text(errors="replace")),
        "command": "python train.py " + " ".join(train_arguments(args, row, seed, learning_rate)),
        "threads": args.threads,
        "versions": library_versions(),
        "code": args.at_commit or "checkout",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "sources": json.loads(sources_path.read_text()),
    }
    _write_json(path, result)
    if not args.keep_models:
        shutil.rmtree(output_dir, ignore_errors=True)
    sources_path.unlink(missing_ok=True)
    return result


def _write_json(path: Path, record) -> None:
    """Atomic write (a run killed meanwhile leaves the previous file whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, path)


def lookup(args, row: Row, seed: int, learning_rate: str) -> tuple[str, dict | None]:
    """("current", run) / ("stale", run: made with other code) / ("missing", None)."""
    path = run_path(args, row, seed, learning_rate)
    if not path.is_file():
        return "missing", None
    run = json.loads(path.read_text())
    return ("stale" if changed_sources(run) else "current"), run


# ================================================================================================ summary
def _stat(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else (0.0 if values else None),
        "values": values,
    }


def summarize(args, runs: dict[tuple[str, str], dict[int, dict]], status: dict) -> dict:
    """Per (row, learning rate): Recall mean +- std over its current runs, per-type Recall@1, the composition's
    diagnostics; the paired differences; what is missing or stale."""
    rows = []
    for row in args.rows:
        for learning_rate in run_learning_rates(args, row):
            by_seed = runs.get((row.name, learning_rate), {})
            seeds = sorted(by_seed)
            entry = {
                "row": row.name,
                "description": row.description,
                "group": row.group,
                "learning_rate": learning_rate,
                "steps": args.steps,
                "train_args": list(row.train_args),
                "seeds": seeds,
                "wanted_seeds": row_seeds(args, row),
            }
            for metric in METRICS:
                entry[metric] = _stat([by_seed[s]["metrics"][metric] for s in seeds])
            first = [by_seed[s]["retrieval"].get("reference_ranked_first") for s in seeds]
            entry["reference_ranked_first"] = _stat([v for v in first if v is not None])
            types = sorted({t for s in seeds for t in by_seed[s]["retrieval"].get("by_modification_type", {})})
            entry["recall@1_by_type"] = {
                t: _stat([by_seed[s]["retrieval"]["by_modification_type"][t]["recall@1"] for s in seeds
                          if t in by_seed[s]["retrieval"].get("by_modification_type", {})])
                for t in types
            }  # fmt: skip
            validated = [s for s in seeds if "validation_metrics" in by_seed[s]]
            # A test-split run's model on validation (runs recorded before that evaluation existed have none).
            entry["validation_recall@1"] = {
                **_stat([by_seed[s]["validation_metrics"]["recall@1"] for s in validated]),
                "seeds": validated,
            }
            entry["composition"] = {}
            for key in COMPOSITION_KEYS:
                values = [by_seed[s]["composition"][key] for s in seeds if key in by_seed[s]["composition"]]
                if values:
                    entry["composition"][key] = _stat(values)
            times = [by_seed[s]["train_seconds"] for s in seeds if by_seed[s].get("train_seconds") is not None]
            entry["train_seconds_mean"] = round(statistics.fmean(times), 1) if times else None
            rows.append(entry)
    pairs = []
    if not args.lr_grid:
        for name, other, what in PAIRS:
            ours, theirs = runs.get((name, _lr(name)), {}), runs.get((other, _lr(other)), {})
            shared = sorted(set(ours) & set(theirs))
            if name not in ROW_BY_NAME or other not in ROW_BY_NAME or not shared:
                continue
            pair = {"row": name, "minus": other, "what": what, "seeds": shared}
            for metric in METRICS:
                pair[metric] = _stat([ours[s]["metrics"][metric] - theirs[s]["metrics"][metric] for s in shared])
            # The same models on validation, over the seeds both evaluated there: choices are read from this column.
            validated = [s for s in shared if "validation_metrics" in ours[s] and "validation_metrics" in theirs[s]]
            pair["validation_recall@1"] = {
                **_stat(
                    [
                        ours[s]["validation_metrics"]["recall@1"] - theirs[s]["validation_metrics"]["recall@1"]
                        for s in validated
                    ]
                ),
                "seeds": validated,
            }
            pairs.append(pair)
    chosen = {}
    if args.lr_grid:
        for entry in rows:
            mean = entry["recall@1"]["mean"]
            if mean is not None:
                best = chosen.get(entry["row"])
                if best is None or mean > best["recall@1"]:
                    chosen[entry["row"]] = {"learning_rate": entry["learning_rate"], "recall@1": mean}
        for name, choice in chosen.items():
            complete = all(e["seeds"] for e in rows if e["row"] == name)
            edge = choice["learning_rate"] in (LR_GRID[0], LR_GRID[-1])
            choice.update(complete=complete, at_edge=edge, table=LEARNING_RATES[ROW_BY_NAME[name].composition])
    return {
        "benchmark": "shapes",
        "split": args.split,
        "steps": args.steps,
        "lr_grid": args.lr_grid,
        "quick": args.quick,
        "shared_train_args": args.shared_train_args,
        "threads": args.threads,
        "versions": library_versions(),
        "code": args.at_commit or "checkout",
        "command": "python benchmarks/quality_shapes.py " + " ".join(args.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": rows,
        "paired_differences": pairs,
        "learning_rate_choice": chosen,
        "status": status,
    }


def _lr(name: str) -> str:
    return row_learning_rate(ROW_BY_NAME[name]) if name in ROW_BY_NAME else ""


def _cell(stat: dict, digits: int = 2) -> str:
    if stat["mean"] is None:
        return "–"
    return (
        f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
        if len(stat["values"]) > 1
        else f"{stat['mean']:.{digits}f}"
    )


def _validation_cell(entry: dict) -> str:
    """Validation R@1 of a row or a paired difference, naming its seeds when they are not all of the row's (pair's)."""
    stat = entry["validation_recall@1"]
    some = stat.get("seeds", entry["seeds"]) != entry["seeds"] and stat["mean"] is not None
    return _cell(stat) + (f" (seeds {','.join(map(str, stat['seeds']))})" if some else "")


def _composition_cell(entry: dict, key: str) -> str:
    stat = entry["composition"].get(key)
    return "–" if stat is None else f"{stat['mean']:.2f}"


def markdown_table(summary: dict) -> str:
    status = summary["status"]
    lines = [
        f"Shapes **{summary['split']}** split, {summary['steps']} steps per run, R@K in %: mean ± std over the seeds each "
        f"row has (seeds listed). {summary['date']}; {summary['threads']} thread per run; torch {summary['versions']['torch']}, "
        f"transformers {summary['versions']['transformers']}; code: "
        + (f"commit {summary['code']}." if summary["code"] != "checkout" else "this checkout."),
        "",
        f"**Runs: {status['current']} current, {status['missing']} missing, {status['stale']} stale** (made with code that "
        "has changed since; not counted).",
        "",
        "| row | what | lr | seeds | R@1 | R@5 | R@10 | R@50 | own ref. first | validation R@1 | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in summary["rows"]:
        seeds = ",".join(map(str, entry["seeds"])) or "none"
        wanted = len(entry["wanted_seeds"])
        seconds = "–" if entry["train_seconds_mean"] is None else f"{entry['train_seconds_mean']:.0f}"
        cells = " | ".join(_cell(entry[m]) for m in METRICS)
        lines.append(
            f"| {entry['row']} | {entry['description']} | {entry['learning_rate']} | {seeds} ({len(entry['seeds'])}/{wanted}) | "
            f"{cells} | {_cell(entry['reference_ranked_first'])} | {_validation_cell(entry)} | {seconds} |"
        )
    types = sorted({t for e in summary["rows"] for t in e["recall@1_by_type"]})
    if types:
        lines += [
            "",
            "**R@1 by modification type**",
            "",
            "| row | " + " | ".join(types) + " |",
            "|---|" + "---|" * len(types),
        ]
        for entry in summary["rows"]:
            if entry["seeds"]:
                by_type = entry["recall@1_by_type"]
                lines.append(
                    f"| {entry['row']} | "
                    + " | ".join(_cell(by_type[t]) if t in by_type else "–" for t in types)
                    + " |"
                )
    lines += [
        "",
        "**What the composition does after training** (train.py's diagnostics on 4 fixed training batches, means over "
        "seeds). δ spread: std of the angles across texts (rad, mean over dimensions); δ text share: share of the "
        "angles' mean square that varies with the text; L_sym: the symmetric loss with the conjugate, and with the "
        "controls on the same targets: no rotation, another query's conjugate, the same rotation (+δ).",
        "",
        "| row | δ rms | δ spread | δ text share | comp. share | L_sym conj | zero | shuffled | same |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in summary["rows"]:
        if entry["seeds"] and entry["composition"]:
            keys = (
                "angle_rms",
                "angle_spread_across_texts",
                "angle_text_share",
                "composition_norm_share",
                "loss_symmetric",
                "loss_symmetric_zero_rotation",
                "loss_symmetric_shuffled_rotation",
                "loss_symmetric_same_rotation",
            )
            lines.append(f"| {entry['row']} | " + " | ".join(_composition_cell(entry, k) for k in keys) + " |")
    if summary["paired_differences"]:
        lines += [
            "",
            "**Paired differences** (row minus row, per seed, over the seeds both have; mean ± std of the differences):",
            "",
            "| row − row | what | seeds | ΔR@1 | ΔR@5 | ΔR@10 | ΔR@50 | per seed ΔR@1 | validation ΔR@1 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for pair in summary["paired_differences"]:
            per_seed = ", ".join(f"{v:+.2f}" for v in pair["recall@1"]["values"])
            cells = " | ".join(_cell(pair[m]) for m in METRICS)
            lines.append(
                f"| {pair['row']} − {pair['minus']} | {pair['what']} | {','.join(map(str, pair['seeds']))} | {cells} | "
                f"{per_seed} | {_validation_cell(pair)} |"
            )
    if summary["learning_rate_choice"]:
        lines += ["", "**Learning rate chosen on validation** (best R@1 of the grid):", ""]
        for name, choice in summary["learning_rate_choice"].items():
            state = "grid complete" if choice["complete"] else "grid INCOMPLETE"
            if choice.get("at_edge"):
                state += "; AT THE GRID'S EDGE"
            agree = "agrees with" if choice["learning_rate"] == choice["table"] else "DIFFERS from"
            lines.append(
                f"- {name}: {choice['learning_rate']} (R@1 {choice['recall@1']:.2f}; {state}; {agree} LEARNING_RATES {choice['table']})"
            )
    if status["missing_runs"] or status["stale_runs"]:
        lines += ["", "**Missing**: " + ("; ".join(status["missing_runs"]) or "nothing")]
        if status["stale_runs"]:
            lines += ["", "**Stale** (trained again when the grid next runs): " + "; ".join(status["stale_runs"])]
    lines += ["", f"Command: `{summary['command']}`"]
    return "\n".join(lines) + "\n"


# The README's short table: the main rows, then what each comparison the README answers gives, paired by seed.
HEADLINE_ROWS = {
    "mqirtn_paper": "MQIRTN as published (`mqirtn_paper`)",
    "mqirtn": "this package's default (`mqirtn`)",
    "tirg": "TIRG",
    "composeae": "ComposeAE",
    "realspace_concat": "ComposeAE's real-space ablation",
}
HEADLINE_PAIRS = (
    ("mqirtn_paper", "tirg"),
    ("mqirtn_paper", "composeae"),
    ("mqirtn", "mqirtn_paper"),
    ("mqirtn", "tirg"),
    *((row.name, "mqirtn_paper") for row in ROWS if row.group == "deviation"),
)


def headline_table(summary: dict) -> str:
    """The README's results table, made from a grid summary (`quality_grid.json`): R@1 and R@10 of the main rows
    (mean ± std over their seeds) and the paired differences the README's answers rest on. tests/test_readme.py
    checks that the README holds exactly this text for the committed summary."""
    rows = {entry["row"]: entry for entry in summary["rows"]}
    lines = [
        f"| shapes {summary['split']}, {summary['steps']} steps | lr | seeds | R@1 | R@10 |",
        "|---|---|---|---|---|",
    ]
    for name, label in HEADLINE_ROWS.items():
        entry = rows.get(name)
        if entry is None or not entry["seeds"]:
            lines.append(f"| {label} | – | none | – | – |")
            continue
        seeds = ",".join(map(str, entry["seeds"]))
        lines.append(
            f"| {label} | {entry['learning_rate']} | {seeds} | {_cell(entry['recall@1'])} | {_cell(entry['recall@10'])} |"
        )
    pairs = {(pair["row"], pair["minus"]): pair for pair in summary["paired_differences"]}
    lines += ["", "| paired by seed | seeds | ΔR@1 | ΔR@10 | ΔR@1 per seed |", "|---|---|---|---|---|"]
    for name, other in HEADLINE_PAIRS:
        pair = pairs.get((name, other))
        if pair is None:
            continue
        per_seed = ", ".join(f"{value:+.2f}" for value in pair["recall@1"]["values"])
        lines.append(
            f"| {name} − {other} | {','.join(map(str, pair['seeds']))} | {_signed_cell(pair['recall@1'])} | "
            f"{_signed_cell(pair['recall@10'])} | {per_seed} |"
        )
    return "\n".join(lines) + "\n"


README_START = (
    "<!-- quality grid: made by benchmarks/quality_shapes.py from benchmarks/results/quality_grid.json -->\n"
)
README_END = "<!-- end of quality grid -->"


def readme_table(readme_text: str) -> str | None:
    """The text between the README's quality-grid markers (None without them)."""
    start, end = readme_text.find(README_START), readme_text.find(README_END)
    return None if start < 0 or end < start else readme_text[start + len(README_START) : end]


def update_readme(summary: dict, readme: Path) -> None:
    """Replaces the README's quality-grid table by `headline_table(summary)`."""
    text = readme.read_text()
    if readme_table(text) is None:
        raise SystemExit(
            f"quality_shapes.py: {readme} has no quality-grid markers ({README_START.strip()} ... {README_END})"
        )
    start, end = text.find(README_START) + len(README_START), text.find(README_END)
    readme.write_text(text[:start] + headline_table(summary) + text[end:])


def _signed_cell(stat: dict) -> str:
    return (
        "–"
        if stat["mean"] is None
        else f"{stat['mean']:+.2f}" + (f" ± {stat['std']:.2f}" if len(stat["values"]) > 1 else "")
    )


def draw_grid(runs: dict[tuple[str, str], dict[int, dict]], path: Path) -> Path | None:
    """The grid as a picture: R@1 of every run (one dot per seed, the row's mean as a bar) and, for the rows whose runs
    recorded it, the logit scale along training, one line per seed, shaded by the run's R@1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row.name for row in ROWS if any(name == row.name for name, _ in runs)]
    if not names:
        return None
    by_name = {name: by_seed for (name, _), by_seed in runs.items()}
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 0.38 * len(names) + 2.5), width_ratios=(3, 2))
    colours = {"main": "tab:blue", "deviation": "tab:orange", "ablation": "tab:green", "spread": "tab:purple"}
    for position, name in enumerate(names):
        values = [run["metrics"]["recall@1"] for run in by_name[name].values()]
        colour = colours[ROW_BY_NAME[name].group]
        left.barh(position, statistics.fmean(values), color=colour, alpha=0.25)
        left.scatter(values, [position] * len(values), color=colour, s=18, zorder=3)
        for seed, run in by_name[name].items():
            left.annotate(str(seed), (run["metrics"]["recall@1"], position), xytext=(0, 5), textcoords="offset points",
                          fontsize=6, ha="center")  # fmt: skip
    left.set_yticks(range(len(names)), names, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("R@1 (%) per seed; bar: mean")
    left.grid(axis="x", alpha=0.3)
    scores = [run["metrics"]["recall@1"] for by_seed in by_name.values() for run in by_seed.values()]
    low, high = min(scores), max(scores)
    drawn = False
    for name, style in (("mqirtn", "-"), ("tirg", "--"), ("mqirtn_paper", ":")):
        for seed, run in sorted(by_name.get(name, {}).items()):
            trajectory = run.get("trajectory") or {}
            if not trajectory.get("step"):
                continue
            shade = plt.cm.viridis((run["metrics"]["recall@1"] - low) / max(high - low, 1e-9))
            right.plot(trajectory["step"], trajectory["logit_scale"], style, color=shade, label=f"{name} seed {seed}")
            drawn = True
    if drawn:
        right.set_xlabel("step")
        right.set_ylabel("logit scale")
        right.set_title("logit scale along training (colour: the run's R@1)", fontsize=9)
        right.legend(fontsize=6, ncol=2)
    else:
        right.set_axis_off()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_summary(args, runs, status) -> dict:
    summary = summarize(args, runs, status)
    results_dir = Path(args.results_dir)
    _write_json(results_dir / f"{args.name}.json", summary)
    title = "Learning-rate grid" if args.lr_grid else "Retrieval quality"
    (results_dir / f"{args.name}.md").write_text(f"# {title} on shapes ({args.split})\n\n" + markdown_table(summary))
    return summary


# ================================================================================================ main
def code_snapshot(commit: str, work_dir: Path) -> Path:
    """The tree of `commit` (as `git archive` gives it) in `work_dir`/code/<full commit id>, made once."""
    try:
        full = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", f"{commit}^{{commit}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        raise SystemExit(
            f"quality_shapes.py: --at_commit {commit}: not a commit of this repository ({error})"
        ) from None
    folder = work_dir.resolve() / "code" / full
    if not (folder / "train.py").is_file():
        partial = folder.with_name(f"{full}.partial-{os.getpid()}")  # side-by-side invocations export apart
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "archive", full], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(partial)], input=archive, check=True)
        try:
            os.replace(partial, folder)
        except OSError:
            if not (folder / "train.py").is_file():
                raise
            shutil.rmtree(partial, ignore_errors=True)  # another invocation exported the same commit first
    return folder


def pair_runs(pattern_a: str, pattern_b: str) -> dict:
    """Per-seed differences (A - B) of every metric between two sets of stored run JSONs, over their shared seeds."""
    import glob

    def by_seed(pattern):
        runs = {}
        for name in sorted(glob.glob(pattern)):
            run = json.loads(Path(name).read_text())
            if run["seed"] in runs:
                raise SystemExit(f"quality_shapes.py --pair_runs: two runs of seed {run['seed']} match {pattern!r}")
            runs[run["seed"]] = run
        return runs

    first, second = by_seed(pattern_a), by_seed(pattern_b)
    shared = sorted(set(first) & set(second))
    if not shared:
        raise SystemExit(
            f"quality_shapes.py --pair_runs: no seed in both {pattern_a!r} ({sorted(first)}) and {pattern_b!r} ({sorted(second)})"
        )
    result = {
        "a": pattern_a,
        "b": pattern_b,
        "seeds": shared,
        "a_only": sorted(set(first) - set(second)),
        "b_only": sorted(set(second) - set(first)),
    }
    for metric in METRICS:
        result[metric] = _stat([first[s]["metrics"][metric] - second[s]["metrics"][metric] for s in shared])
    return result


def claim_run(args, path: Path) -> int | None:
    """Claims the run stored at `path` for this process (a file created exclusively under <work_dir>/claims/), so that
    several invocations of this script can work through one grid side by side, each on other runs. Returns None once
    claimed, or the pid of the live process that holds the claim; a claim whose process has ended is taken over."""
    claim = Path(args.work_dir) / "claims" / f"{path.parent.name}-{path.stem}.claim"
    claim.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            descriptor = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(claim.read_text().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and holder != os.getpid() and _alive(holder):
                return holder
            claim.unlink(missing_ok=True)  # left by a process that ended: take it over
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(str(os.getpid()))
        return None
    return -1  # another process took it over at the same moment


def release_run(args, path: Path) -> None:
    (Path(args.work_dir) / "claims" / f"{path.parent.name}-{path.stem}.claim").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _jobs(args) -> list[tuple[Row, int, str]]:
    """Every run of the selected rows, in the order they are trained: group by group (main, deviation, ablation),
    seed by seed within a group, so the rows of one seed are complete (paired) before the next seed starts."""
    jobs = []
    for group in ("main", "deviation", "ablation", "spread"):
        rows = [row for row in args.rows if row.group == group]
        for seed in range(max((len(row_seeds(args, row)) for row in rows), default=0)):
            for row in rows:
                if seed in row_seeds(args, row):
                    jobs += [(row, seed, lr) for lr in run_learning_rates(args, row)]
    return jobs


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, _ = parse_args(argv)
    args.argv = argv
    if args.pair_runs:
        result = pair_runs(*args.pair_runs)
        print(f"A - B over seeds {result['seeds']} (A only: {result['a_only']}, B only: {result['b_only']}):")
        for metric in METRICS:
            values = ", ".join(f"{v:+.2f}" for v in result[metric]["values"])
            print(f"  {metric}: {_cell(result[metric])}  (per seed {values})")
        return result
    global CODE_ROOT
    CODE_ROOT = code_snapshot(args.at_commit, Path(args.work_dir)) if args.at_commit else REPO_ROOT
    jobs = _jobs(args)
    if args.dry_run:
        for row, seed, lr in jobs:
            if lookup(args, row, seed, lr)[0] != "current":
                path = run_path(args, row, seed, lr)
                print(
                    " ".join(train_command(args, row, seed, lr, Path(args.work_dir) / path.stem, Path("SOURCES.json")))
                )
        return {}
    states = {job: lookup(args, *job) for job in jobs}

    def tally():
        runs: dict[tuple[str, str], dict[int, dict]] = {}
        status = {"current": 0, "missing": 0, "stale": 0, "missing_runs": [], "stale_runs": []}
        for (row, seed, lr), (state, run) in states.items():
            if state == "current":
                runs.setdefault((row.name, lr), {})[seed] = run
            else:
                status[f"{state}_runs"].append(f"{row.name} seed {seed}" + (f" lr {lr}" if args.lr_grid else ""))
            status[state] += 1
        return runs, status

    start, trained = time.time(), 0
    for index, job in enumerate(jobs, 1):
        if args.summarize_only or states[job][0] == "current":
            continue
        if (args.max_runs is not None and trained >= args.max_runs) or (
            args.max_minutes is not None and (time.time() - start) / 60 >= args.max_minutes
        ):
            break
        row, seed, lr = job
        label = f"{row.name} seed {seed}" + (f" lr {lr}" if args.lr_grid else "")
        states[job] = lookup(args, *job)  # another invocation may have trained it meanwhile
        if states[job][0] == "current":
            continue
        holder = claim_run(args, run_path(args, row, seed, lr))
        if holder is not None:
            print(f"[{index}/{len(jobs)}] {label}: being trained by process {holder}; left to it", flush=True)
            continue
        try:
            run = run_one(args, row, seed, lr)
        finally:
            release_run(args, run_path(args, row, seed, lr))
        states[job] = ("current", run)
        trained += 1
        print(f"[{index}/{len(jobs)}] {label}: R@1 {run['metrics']['recall@1']:.2f} ({run['wall_seconds']:.0f} s; "
              f"{(time.time() - start) / 60:.1f} min elapsed)", flush=True)  # fmt: skip
        write_summary(args, *tally())  # partial results are usable while the rest runs
    runs, status = tally()
    summary = write_summary(args, runs, status)
    if args.update_readme:
        update_readme(summary, REPO_ROOT / "README.md")
    if not args.lr_grid and draw_grid(runs, Path(args.results_dir) / f"{args.name}.png"):
        print(f"Drew {Path(args.results_dir) / args.name}.png")
    print(markdown_table(summary))
    print(f"Wrote {Path(args.results_dir) / args.name}.json / .md")
    return summary


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--record_run":
        sys.exit(record_run(sys.argv[2], sys.argv[3], sys.argv[4:]))
    main()
