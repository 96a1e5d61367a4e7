#!/usr/bin/env python
"""Retrieval quality of every composition variant and MQIRTN ablation on the built-in shapes benchmark.

Each row is trained and evaluated by `train.py` itself, run as a subprocess (no second training loop here), with
**identical** towers, data, step budget, seeds and learning rate (5e-4, chosen on the validation split at this
budget; see DEFAULT_LEARNING_RATE); only the row's own flags differ:

    baselines   mqirtn, composeae, tirg, realspace_concat, image_only, text_only   (--composition; the
                baselines follow their published code: BatchNorm, Dropout, ReLU, PyTorch default init)
    ablations   MQIRTN without the rotation (rotation=false: delta = 0, same parameters), without the symmetric
                constraint (symmetric_loss_weight=0), without the reconstruction terms, without the image residual,
                with the soft-triplet loss, with 0 / 1 / 2 fusion layers

Two budgets. The rows that test the paper's ingredients (mqirtn, no_rotation, no_symmetric, no_reconstruction,
no_image_residual and TIRG, the best faithful baseline at the short budget) train for the main job's budget
(`--main_steps`, default 936 = train.py's 3 epochs of 20,000 queries at batch 64): a mechanism that needs training
to act cannot be judged after 200 steps. The other rows train for `--steps` (default 200), next to MQIRTN at the
same budget (`mqirtn_short`; the 2-fusion-layer row is that run). Every row records what its composition does after
training (angle rms, share of |delta| > pi/4, the composition term's norm share, the symmetric loss with the
conjugate and with the same rotation) from train.py's eval_results.json.

Every run reads its `eval_results.json` (and `training_state.json`) into
`benchmarks/results/quality_shapes_runs/<split>/<row>-seed<S>-steps<N>-<settings hash>.json`; a run whose JSON
exists is skipped, so an interrupted benchmark resumes where it stopped. The summary (R@1/5/10/50 as mean ± std
over seeds) goes to `benchmarks/results/<name>.json`, `<name>.md` and a bar chart `<name>.png`, where <name> is
`quality_shapes` for the test split (the reported table) and `quality_shapes_<split>` otherwise (`_quick` added
with --quick). Choose settings on `--split validation`; report `--split test` with train.py's defaults.

    python benchmarks/quality_shapes.py --split validation --quick        # minutes: does everything work?
    python benchmarks/quality_shapes.py --split test                      # full: 3 seeds x 11 runs
    python benchmarks/quality_shapes.py --split test --steps 300 --seeds 1   # the one-seed table in the README
    python benchmarks/quality_shapes.py --variants mqirtn,tirg -- --learning_rate 5e-4   # extra flags go to train.py

Budget arithmetic (this machine: 2 shared CPU cores, one thread per run, `nice -n 10`). train.py's default
shapes configuration (48 px, ViT 192x4 from scratch, frozen all-MiniLM-L6-v2, batch 64) trains MQIRTN at
~1.35 steps/s and the fusion-free baselines at ~2.6 steps/s (measured: 60 steps in 46 s and 23 s); a run also
pays ~35 s of start-up, test-split evaluation (5,000 queries, 8,320 gallery images) and saving. One seed is
12 trainings (fusion_2 reuses mqirtn): 7 MQIRTN-like runs and 5 baselines. At the default 200 steps that is
7 x (200/1.35 + 35 ≈ 183 s) + 5 x (200/2.6 + 35 ≈ 112 s) ≈ 1,840 s ≈ 31 minutes per seed, so the full default of
3 seeds is ≈ 92 minutes: under two hours with ~25% slack for a busier machine. The one-seed 300-step table of the
README: 7 x 257 s + 5 x 150 s ≈ 42 minutes. --quick: 60 steps, 1 seed, 3,000/500/1,000 shapes queries, about
50 s per MQIRTN run and 30 s per baseline (≈ 8 minutes for all rows).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "train.py"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
METRICS = ("recall@1", "recall@5", "recall@10", "recall@50")
DEFAULT_STEPS, DEFAULT_SEEDS = 200, 3
MAIN_JOB_STEPS = 936  # train.py's default run: 3 epochs of 20,000 shapes queries at batch 64
# The benchmark's learning rate for every row, chosen on the validation split at its 200-step budget (3 seeds each,
# results/quality_shapes_validation_200*.md): MQIRTN R@1 43.2 +- 2.9 at 5e-4 vs 31-32 at 2.5e-4, 14.3 +- 11.0 at 1e-3
# (train.py's default, tuned for its 936-step run) and 5.0 at 2e-3; TIRG 22.5 +- 1.2 at 5e-4 vs 21.6 +- 2.8 at 1e-3,
# 5.3 at 2e-3. `-- --learning_rate X` overrides it.
DEFAULT_LEARNING_RATE = "5e-4"
QUICK_STEPS, QUICK_SEEDS = 60, 1
QUICK_SHAPES_SIZES = ("--shapes_num_train_queries", "3000", "--shapes_num_validation_queries", "500", "--shapes_num_test_queries", "1000")


@dataclass(frozen=True)
class Row:
    """One line of the table: a name, what it is, its group, its budget and its train.py flags (on top of the shared
    ones). `budget` is "main" (the main job's step budget, `--main_steps`) or "short" (`--steps`)."""

    name: str
    label: str  # short, for the chart
    description: str
    group: str  # "variant" or "ablation"
    train_args: tuple[str, ...] = ()
    same_as: str | None = None  # identical to another row's configuration: reuse its runs
    budget: str = "short"


ROWS: tuple[Row, ...] = (
    # The paper's ingredients, at the main job's budget.
    Row("mqirtn", "MQIRTN (default)", "MQIRTN: fusion + complex composition + all losses", "variant", budget="main"),
    Row("tirg_main", "TIRG", "TIRG: gated residual (best faithful baseline at the short budget)", "variant", ("--composition", "tirg"), budget="main"),
    Row("no_rotation", "− rotation (δ ≡ 0)", "MQIRTN, rotation=false: angles forced to 0, same parameters", "ablation", ("--config_overrides", "rotation=false"), budget="main"),
    Row("no_symmetric", "− symmetric constraint", "MQIRTN, symmetric_loss_weight=0", "ablation", ("--config_overrides", "symmetric_loss_weight=0"), budget="main"),
    Row(
        "no_reconstruction",
        "− reconstruction terms",
        "MQIRTN, both reconstruction weights 0",
        "ablation",
        ("--config_overrides", "reconstruction_image_loss_weight=0,reconstruction_text_loss_weight=0"),
        budget="main",
    ),
    Row("no_image_residual", "− image residual", "MQIRTN, --no_image_residual", "ablation", ("--no_image_residual",), budget="main"),
    # Every variant and the architecture ablations, at the short budget.
    Row("mqirtn_short", "MQIRTN (default)", "MQIRTN: fusion + complex composition + all losses", "variant"),
    Row("composeae", "ComposeAE", "ComposeAE (published modules): complex composition, no fusion", "variant", ("--composition", "composeae")),
    Row("tirg", "TIRG", "TIRG (published modules): gated residual", "variant", ("--composition", "tirg")),
    Row("realspace_concat", "real-space concat", "ComposeAE's real-space ablation (published modules)", "variant", ("--composition", "realspace_concat")),
    Row("image_only", "image only", "query = reference image", "variant", ("--composition", "image_only")),
    Row("text_only", "text only", "query = modification text", "variant", ("--composition", "text_only")),
    Row("soft_triplet", "soft-triplet loss", "MQIRTN, --loss_type soft_triplet", "ablation", ("--loss_type", "soft_triplet")),
    Row("fusion_0", "0 fusion layers", "MQIRTN, --num_fusion_layers 0", "ablation", ("--num_fusion_layers", "0")),
    Row("fusion_1", "1 fusion layer", "MQIRTN, --num_fusion_layers 1", "ablation", ("--num_fusion_layers", "1")),
    Row("fusion_2", "2 fusion layers", "MQIRTN, --num_fusion_layers 2 (the default: same runs as mqirtn_short)", "ablation", ("--num_fusion_layers", "2"), same_as="mqirtn_short"),
)
# What train.py's eval_results.json records about the composition after training, kept per run.
COMPOSITION_KEYS = (
    "angle_rms", "angle_share_over_quarter_pi", "composition_norm_share", "loss_symmetric", "loss_symmetric_same_rotation",
    "back_query_cosine_conjugate_vs_same", "grad_share_base", "grad_share_symmetric", "grad_share_reconstruction_image",
    "grad_share_reconstruction_text",
)
ROW_BY_NAME = {row.name: row for row in ROWS}


# ================================================================================================ arguments
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="Train every MQIRTN composition variant and ablation on shapes through train.py and compare Recall@K. "
        "Arguments after `--` (or any this script does not know) are passed to every train.py run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=_positive_int, default=None, help=f"Steps of the short-budget rows (default {DEFAULT_STEPS}, --quick {QUICK_STEPS}).")
    parser.add_argument(
        "--main_steps", type=_positive_int, default=None,
        help=f"Steps of the rows that test the paper's ingredients (default {MAIN_JOB_STEPS}, the main job's budget; --quick {QUICK_STEPS}).",
    )
    parser.add_argument("--seeds", type=_positive_int, default=None, help=f"Training seeds per row: 0..N-1 (default {DEFAULT_SEEDS}, --quick {QUICK_SEEDS}).")
    parser.add_argument("--variants", default=None, help=f"Comma-separated subset of rows (default: all): {', '.join(ROW_BY_NAME)}.")
    parser.add_argument("--split", choices=("validation", "test"), default="test", help="validation to choose settings, test to report.")
    parser.add_argument("--quick", action="store_true", help=f"Minutes: {QUICK_STEPS} steps, {QUICK_SEEDS} seed, smaller shapes splits.")
    parser.add_argument("--results_dir", default=str(RESULTS_DIR), help="Where the per-run and summary JSON, the table and the chart go.")
    parser.add_argument("--name", default=None, help="Summary file name stem (default quality_shapes[_<split>][_quick]).")
    parser.add_argument("--work_dir", default=str(REPO_ROOT / "outputs" / "quality_shapes"), help="train.py output folders (models; not kept in git).")
    parser.add_argument("--keep_models", action="store_true", help="Keep each run's saved model folder (default: deleted after reading its results).")
    parser.add_argument("--no_nice", action="store_true", help="Run train.py without `nice -n 10`.")
    parser.add_argument("--threads", type=_positive_int, default=1, help="OMP_NUM_THREADS of each run (1 is fastest on a shared 2-core machine).")
    parser.add_argument("--dry_run", action="store_true", help="Print the commands, run nothing.")
    parser.add_argument(
        "--summarize_only", action="store_true",
        help="Train nothing: write the table from the runs already made (rows report how many seeds they have).",
    )
    args, train_extra = parser.parse_known_args(argv)
    train_extra = [item for item in train_extra if item != "--"]

    args.steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    args.main_steps = args.main_steps or (QUICK_STEPS if args.quick else MAIN_JOB_STEPS)
    args.seeds = args.seeds or (QUICK_SEEDS if args.quick else DEFAULT_SEEDS)
    if args.variants is None:
        args.rows = list(ROWS)
    else:
        names = [name.strip() for name in args.variants.split(",") if name.strip()]
        unknown = [name for name in names if name not in ROW_BY_NAME]
        if unknown or not names:
            parser.error(f"--variants: unknown row(s) {unknown or names!r}; allowed: {', '.join(ROW_BY_NAME)}")
        args.rows = [ROW_BY_NAME[name] for name in names]
    for forbidden in ("--output_dir", "--seed", "--max_train_steps", "--eval_split", "--composition"):
        if any(item == forbidden or item.startswith(forbidden + "=") for item in train_extra):
            parser.error(f"{forbidden} is set by this script per run; do not pass it through to train.py")
    if args.name is None:
        args.name = "quality_shapes" + ("" if args.split == "test" else f"_{args.split}") + ("_quick" if args.quick else "")
    # Shared train.py flags of every run: same data, towers, budget; the wall-clock guard off so every run takes
    # exactly --steps steps; no qualitative figures (they cost time and nobody looks at them here).
    shared = ["--max_train_minutes", "0", "--num_results_grids", "0"]
    if not any(item == "--learning_rate" or item.startswith("--learning_rate=") for item in train_extra):
        shared += ["--learning_rate", DEFAULT_LEARNING_RATE]
    if args.quick:
        shared += list(QUICK_SHAPES_SIZES)
    args.shared_train_args = shared + train_extra
    return args, train_extra


# ================================================================================================ runs
def code_fingerprint() -> str:
    """Hash of the code a run depends on (the model package's Hub files and train.py): a run made with other code is
    never reused as if it were this code's."""
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "modeling_mqirtn").glob("*_mqirtn.py")) + [TRAIN_SCRIPT]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def settings_hash(args) -> str:
    """Short hash of everything shared by the runs and of the code (so results of other settings or of other code are
    never mixed in)."""
    return hashlib.sha256(json.dumps([args.shared_train_args, code_fingerprint()]).encode()).hexdigest()[:8]


def row_steps(args, row: Row) -> int:
    return args.main_steps if row.budget == "main" else args.steps


def run_json_path(args, row: Row, seed: int) -> Path:
    return Path(args.results_dir) / "quality_shapes_runs" / args.split / f"{row.name}-seed{seed}-steps{row_steps(args, row)}-{settings_hash(args)}.json"


def train_command(args, row: Row, seed: int, output_dir: Path) -> list[str]:
    command = [] if args.no_nice else ["nice", "-n", "10"]
    command += [sys.executable, str(TRAIN_SCRIPT), "--output_dir", str(output_dir), "--seed", str(seed)]
    command += ["--max_train_steps", str(row_steps(args, row)), "--eval_split", args.split]
    return command + args.shared_train_args + list(row.train_args)


def run_one(args, row: Row, seed: int) -> dict:
    """Train + evaluate one (row, seed) with train.py; return (and save) its results."""
    output_dir = Path(args.work_dir) / args.split / f"{row.name}-seed{seed}-steps{row_steps(args, row)}-{settings_hash(args)}"
    command = train_command(args, row, seed, output_dir)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = output_dir.parent / f"{output_dir.name}.log"
    start = time.time()
    with open(log_path, "w") as log:
        completed = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - start
    if completed.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(f"train.py failed for {row.name} seed {seed} (exit {completed.returncode}); log {log_path}:\n" + "\n".join(tail))
    eval_results = json.loads((output_dir / "eval_results.json").read_text())
    state_path = output_dir / "training_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    result = {
        "row": row.name,
        "seed": seed,
        "split": args.split,
        "steps": row_steps(args, row),
        "completed_steps": state.get("completed_steps"),
        "train_seconds": state.get("train_seconds"),
        "wall_seconds": round(wall, 1),
        "metrics": eval_results[args.split],
        "composition": {k: v for k, v in eval_results.get("composition", {}).get("end", {}).items() if k in COMPOSITION_KEYS},
        "command": " ".join(command[command.index(sys.executable) :]).replace(sys.executable, "python").replace(str(REPO_ROOT) + os.sep, ""),
    }
    path = run_json_path(args, row, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep_models:
        import shutil

        shutil.rmtree(output_dir, ignore_errors=True)
    return result


# ================================================================================================ summary
def summarize(args, runs: dict[str, list[dict]]) -> dict:
    rows = []
    for row in args.rows:
        results = runs.get(row.same_as or row.name, [])
        entry = {
            "row": row.name, "label": row.label, "description": row.description, "group": row.group, "budget": row.budget,
            "steps": row_steps(args, row), "train_args": list(row.train_args), "seeds": len(results),
        }
        if row.same_as:
            entry["same_runs_as"] = row.same_as
        for metric in METRICS:
            values = [result["metrics"][metric] for result in results]
            entry[metric] = {
                "mean": statistics.fmean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else None,
                "values": values,
            }
        entry["composition"] = {}
        for key in COMPOSITION_KEYS:
            values = [result["composition"][key] for result in results if key in result.get("composition", {})]
            if values:
                entry["composition"][key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        times = [result["train_seconds"] for result in results if result.get("train_seconds") is not None]
        entry["train_seconds_mean"] = round(statistics.fmean(times), 1) if times else None
        rows.append(entry)
    return {
        "benchmark": "shapes",
        "split": args.split,
        "steps": args.steps,
        "main_steps": args.main_steps,
        "seeds": list(range(args.seeds)),
        "quick": args.quick,
        "shared_train_args": args.shared_train_args,
        "command": "python benchmarks/quality_shapes.py " + " ".join(args.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS={args.threads}",
        "rows": rows,
    }


def _cell(stat: dict) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}" if len(stat["values"]) > 1 else f"{stat['mean']:.2f}"


def _composition_cell(entry: dict, key: str) -> str:
    stat = entry.get("composition", {}).get(key)
    return "–" if stat is None else f"{stat['mean']:.2f}"


def _gap_line(ours: dict | None, contenders: list[dict], budget_words: str) -> list[str]:
    contenders = [e for e in contenders if e["recall@1"]["mean"] is not None]
    if not ours or ours["recall@1"]["mean"] is None or not contenders:
        return []
    best = max(contenders, key=lambda e: e["recall@1"]["mean"])
    gaps = ", ".join(f"R@{m.split('@')[1]} {ours[m]['mean'] - best[m]['mean']:+.2f}" for m in METRICS)
    return ["", f"MQIRTN minus the best baseline by R@1 {budget_words} ({best['row']}): {gaps} points."]


def markdown_table(summary: dict) -> str:
    seeds = len(summary["seeds"])
    by_name = {e["row"]: e for e in summary["rows"]}
    lines = [
        f"Shapes **{summary['split']}** split, "
        + (f"mean ± std over up to {seeds} seeds (the seeds column says how many each row has)" if seeds > 1 else "1 seed")
        + f", R@K in %. {summary['date']}, {summary['machine']}. δ rms: the rotation angles' rms (rad) after training; "
        "comp. share: the composition term's share of the norms of the two query terms (composition, image residual); "
        "L_sym conj / same: the symmetric loss with the conjugate rotation and with the same rotation (train.py's "
        "composition diagnostics on 4 fixed training batches after training).",
    ]
    for budget, title in (("main", f"the main job's budget, {summary['main_steps']} steps"), ("short", f"{summary['steps']} steps")):
        entries = [e for e in summary["rows"] if e.get("budget", "short") == budget]
        if not entries:
            continue
        lines += [
            "",
            f"**At {title}**",
            "",
            "| row | what | seeds | R@1 | R@5 | R@10 | R@50 | δ rms | comp. share | L_sym conj / same | train s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for group in ("variant", "ablation"):
            for entry in (e for e in entries if e["group"] == group):
                name = f"**{entry['row']}**" if entry["row"] in ("mqirtn", "mqirtn_short") else entry["row"]
                cells = " | ".join(_cell(entry[m]) for m in METRICS)
                seconds = "–" if entry["train_seconds_mean"] is None else f"{entry['train_seconds_mean']:.0f}"
                sym = f"{_composition_cell(entry, 'loss_symmetric')} / {_composition_cell(entry, 'loss_symmetric_same_rotation')}"
                lines.append(
                    f"| {name} | {entry['description']} | {entry['seeds']} | {cells} | {_composition_cell(entry, 'angle_rms')} | "
                    f"{_composition_cell(entry, 'composition_norm_share')} | {sym} | {seconds} |"
                )
        ours = by_name.get("mqirtn" if budget == "main" else "mqirtn_short")
        contenders = [e for e in entries if e["group"] == "variant" and e is not ours]
        lines += _gap_line(ours, contenders, f"at {title}")
        if budget == "main" and ours and ours["recall@1"]["mean"] is not None:
            effects = []
            for name, what in (("no_rotation", "the rotation"), ("no_symmetric", "the symmetric constraint"),
                               ("no_reconstruction", "the reconstruction terms"), ("no_image_residual", "the image residual")):
                other = by_name.get(name)
                if other and other["recall@1"]["mean"] is not None:
                    effects.append(f"{what} {ours['recall@1']['mean'] - other['recall@1']['mean']:+.2f}")
            if effects:
                lines += ["", "What each ingredient adds to MQIRTN's R@1 (full model minus the ablation): " + ", ".join(effects) + " points."]
    lines += ["", f"Command: `{summary['command']}`"]
    return "\n".join(lines) + "\n"


def bar_chart(summary: dict, path: Path) -> None:
    """Horizontal grouped bars: R@1 and R@10 per row with std error bars; baselines above, ablations below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in summary["rows"] if e["recall@1"]["mean"] is not None]
    if not entries:
        return
    entries = sorted(entries, key=lambda e: (e["group"] != "variant",))  # keep the table order within groups
    labels = [f"{e['label']} · {e['steps']} steps" for e in entries]
    n = len(entries)
    fig, ax = plt.subplots(figsize=(10, 0.55 * n + 1.6))
    height = 0.38
    positions = list(range(n))
    colors = {"recall@1": "#2b6cb0", "recall@10": "#9ec5e8"}
    for offset, metric in ((-height / 2, "recall@1"), (height / 2, "recall@10")):
        means = [e[metric]["mean"] for e in entries]
        stds = [e[metric]["std"] for e in entries]
        bars = ax.barh([p + offset for p in positions], means, height=height, xerr=stds if any(stds) else None, capsize=3,
                       color=colors[metric], label=metric.replace("recall", "R"))
        for bar, mean, std in zip(bars, means, stds):
            ax.text(bar.get_width() + std + 0.8, bar.get_y() + bar.get_height() / 2, f"{mean:.1f}", va="center", fontsize=8)
    ax.set_yticks(positions)
    ax.set_yticklabels(labels, fontsize=9)
    for tick, entry in zip(ax.get_yticklabels(), entries):
        if entry["row"] in ("mqirtn", "mqirtn_short"):
            tick.set_fontweight("bold")
            tick.set_color("#c53030")
    ax.invert_yaxis()
    boundary = sum(e["group"] == "variant" for e in entries)
    if 0 < boundary < n:
        ax.axhline(boundary - 0.5, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xlim(0, 105)
    ax.set_xlabel("Recall@K (%)")
    seeds = len(summary["seeds"])
    ax.set_title(
        f"shapes {summary['split']}: {summary['main_steps']} steps (ingredients) / {summary['steps']} (others), "
        + (f"mean ± std over up to {seeds} seeds" if seeds > 1 else "1 seed")
        + ("\nbaselines above the line, MQIRTN ablations below" if 0 < boundary < n else ""),
        fontsize=10,
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(args, runs: dict[str, list[dict]]) -> dict:
    summary = summarize(args, runs)
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{args.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results_dir / f"{args.name}.md").write_text(f"# Retrieval quality on shapes ({args.split})\n\n" + markdown_table(summary) + f"\n![chart]({args.name}.png)\n")
    bar_chart(summary, results_dir / f"{args.name}.png")
    return summary


# ================================================================================================ main
def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, _ = parse_args(argv)
    args.argv = argv
    to_train = []
    for row in args.rows:
        source = ROW_BY_NAME[row.same_as] if row.same_as else row
        if source not in to_train:
            to_train.append(source)
    jobs = [(row, seed) for row in to_train for seed in range(args.seeds)]
    if args.dry_run:
        for row, seed in jobs:
            print(" ".join(train_command(args, row, seed, Path(args.work_dir) / "DIR")))
        return {}

    runs: dict[str, list[dict]] = {}
    start = time.time()
    trained = 0
    for index, (row, seed) in enumerate(jobs, 1):
        path = run_json_path(args, row, seed)
        if path.is_file():
            result = json.loads(path.read_text())
            status = "cached"
        elif args.summarize_only:
            continue
        else:
            result = run_one(args, row, seed)
            trained += 1
            status = f"{result['wall_seconds']:.0f} s"
        runs.setdefault(row.name, []).append(result)
        metrics = result["metrics"]
        elapsed = time.time() - start
        eta = elapsed / trained * sum(not run_json_path(args, r, s).is_file() for r, s in jobs[index:]) if trained else 0.0
        print(
            f"[{index}/{len(jobs)}] {row.name:<18} seed {seed}: "
            + "  ".join(f"R@{m.split('@')[1]} {metrics[m]:6.2f}" for m in METRICS)
            + f"  ({status}; elapsed {elapsed / 60:.1f} min, ~{eta / 60:.0f} min left)",
            flush=True,
        )
        write_summary(args, runs)  # partial results are usable while the rest runs
    summary = write_summary(args, runs)
    print(markdown_table(summary))
    print(f"Wrote {Path(args.results_dir) / args.name}.json / .md / .png")
    return summary


if __name__ == "__main__":
    main()
