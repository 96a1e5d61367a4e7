#!/usr/bin/env python
"""A picture of what MQIRTN's composition does in a trained model: its rotation angles against a newly initialised
model of the same configuration, and each loss term's share of the gradient at step 0 and after training.

    python benchmarks/composition_picture.py outputs/mqirtn-shapes          # writes docs/composition.png

The angles are read with `output_composition=True` on shapes training queries (the first `--queries` of the split,
through the saved processor). The new model has the trained model's text tower (the main job's is pretrained and
frozen, so that is its starting point) and newly initialised everything else. The gradient shares come from the run's
`eval_results.json` (train.py's composition diagnostics).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def angles_of(model, processor, rows) -> torch.Tensor:
    """Rotation angles (N, d) of the queries in `rows` (shapes training rows: reference_image, modification_text)."""
    model.eval()
    chunks = []
    for start in range(0, len(rows), 64):
        part = rows[start : start + 64]
        batch = processor(images=part["reference_image"], text=part["modification_text"], return_tensors="pt")
        chunks.append(model(**batch, output_composition=True).composition_angles)
    return torch.cat(chunks)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="A train.py output folder (model, processor, eval_results.json).")
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--output", default=str(REPO_ROOT / "docs" / "composition.png"))
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import modeling_mqirtn  # noqa: F401  (registers the Auto classes)
    import processing  # noqa: F401
    from modeling_mqirtn import MQIRTNModel
    from processing import MQIRTNProcessor
    from processing.data.shapes import load_shapes

    folder = Path(args.model_dir)
    trained = MQIRTNModel.from_pretrained(folder)
    processor = MQIRTNProcessor.from_pretrained(folder)
    torch.manual_seed(42)
    fresh = MQIRTNModel(trained.config)
    # The main job starts from the pretrained text tower and keeps it frozen: the trained model's text tower is that
    # starting point, so the new model gets it too (everything else newly initialised, as at step 0).
    fresh.text_model.load_state_dict(trained.text_model.state_dict())
    record = json.loads((folder / "eval_results.json").read_text())
    composition = record.get("composition", {})
    image_size = trained.config.vision_config.image_size
    rows = load_shapes("train", num_queries=20_000, image_size=image_size).select(range(args.queries))
    angles = {
        "newly initialised": angles_of(fresh, processor, rows),
        "after training": angles_of(trained, processor, rows),
    }

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.3, 1]})
    bins = torch.linspace(-4, 4, 81).tolist()
    for (label, values), color in zip(angles.items(), ("#9ec5e8", "#2b6cb0")):
        flat = values.flatten()
        rms = flat.pow(2).mean().sqrt().item()
        share = (flat.abs() > math.pi / 4).float().mean().item()
        # How much the angle of one dimension changes from text to text (the text's information in the rotation).
        across_texts = values.std(dim=0).mean().item()
        left.hist(
            flat.clamp(-4, 4).tolist(),
            bins=bins,
            alpha=0.75,
            color=color,
            density=True,
            label=f"{label}: rms {rms:.2f} rad, |δ| > π/4 for {share:.0%}, spread across texts {across_texts:.2f} rad",
        )
    for x in (-math.pi / 4, math.pi / 4):
        left.axvline(x, color="gray", linestyle=":", linewidth=1)
    left.set_xlabel("rotation angle δ (rad), every dimension of every query")
    left.set_ylabel("density")
    left.set_title(f"Angles read from the text ({args.queries} shapes training queries)", fontsize=10)
    left.legend(fontsize=8, loc="upper left")

    terms = ["base", "symmetric", "reconstruction_image", "reconstruction_text"]
    labels = ["base (metric)", "symmetric", "reconstr. image", "reconstr. text"]
    width = 0.38
    for offset, moment, color in ((-width / 2, "start", "#9ec5e8"), (width / 2, "end", "#2b6cb0")):
        values = [composition.get(moment, {}).get(f"grad_share_{term}", 0.0) for term in terms]
        bars = right.bar(
            [i + offset for i in range(len(terms))],
            values,
            width=width,
            color=color,
            label="step 0" if moment == "start" else "after training",
        )
        for bar, value in zip(bars, values):
            right.text(bar.get_x() + bar.get_width() / 2, value + 0.01, f"{value:.2f}", ha="center", fontsize=7)
    right.set_xticks(range(len(terms)))
    right.set_xticklabels(labels, fontsize=8)
    right.set_ylim(0, 1)
    right.set_ylabel("share of the gradient norm")
    end = composition.get("end", {})
    right.set_title(
        "Each loss term's gradient share (shared parameters)\n"
        f"after training: L_sym {end.get('loss_symmetric', float('nan')):.2f} with the conjugate, "
        f"{end.get('loss_symmetric_same_rotation', float('nan')):.2f} without",
        fontsize=9,
    )
    right.legend(fontsize=8)
    fig.tight_layout()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    print(f"Wrote {output}")
    return output


if __name__ == "__main__":
    main()
