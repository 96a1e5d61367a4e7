#!/usr/bin/env python
"""The processor's own ViT pixel path against transformers' PIL image processor, in one process, on the same decoded
images: ms per image of `MQIRTNProcessor(images=...)` (which takes the path) and of `image_processor(images=...)` (what
it replaced), and whether their pixel values are equal bit for bit.

Images: random pictures of 48 px (the main job's size: no resize) and of 256-512 px a side (resized to the target),
in batches of 32; targets 48 px (train.py's processor) and 224 px (a ViT-B/16's). Median of `--repeats` alternated
passes after a warm-up.

    python benchmarks/pixel_path.py                 # writes benchmarks/results/pixel_path.json
    python benchmarks/pixel_path.py --quick         # seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image


REPO_ROOT = Path(__file__).resolve().parents[1]


def pictures(count: int, low: int, high: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(
            rng.integers(
                0, 256, (int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1)), 3), dtype=np.uint8
            )
        )
        for _ in range(count)
    ]


def main(argv=None) -> dict:
    from transformers import AutoTokenizer, ViTImageProcessorPil

    from processing import MQIRTNProcessor
    from processing.processing_mqirtn import _resize_rescale_normalize_recipe

    from machine_info import machine, write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="few images, one pass: the figures mean nothing")
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "pixel_path.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 8, 1
    torch.set_num_threads(1)
    from mqirtn_train.arguments import default_text_model

    tokenizer = AutoTokenizer.from_pretrained(default_text_model())  # the main job's (offline) tokenizer
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/pixel_path.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "what": "ms per image (median of alternated passes); ratio = image processor / processor's path",
        "results": [],
    }
    for source, (low, high) in {"48 px": (48, 48), "256-512 px": (256, 512)}.items():
        images = pictures(args.images, low, high)
        batches = [images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)]
        for side in (48, 224):
            image_processor = ViTImageProcessorPil(
                size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3
            )
            assert _resize_rescale_normalize_recipe(image_processor) is not None
            processor = MQIRTNProcessor(image_processor=image_processor, tokenizer=tokenizer)
            candidates = {
                "processor_path": lambda: [processor(images=b)["pixel_values"] for b in batches],
                "image_processor": lambda: [
                    image_processor(images=b, return_tensors="pt")["pixel_values"] for b in batches
                ],
            }
            outputs = {name: torch.cat(function()) for name, function in candidates.items()}  # warm-up
            times = {name: [] for name in candidates}
            for repeat in range(args.repeats):
                for name in list(candidates) if repeat % 2 == 0 else list(candidates)[::-1]:
                    start = time.perf_counter()
                    candidates[name]()
                    times[name].append(time.perf_counter() - start)
            ms = {name: 1000 * statistics.median(values) / len(images) for name, values in times.items()}
            entry = {
                "source": source,
                "target_px": side,
                "images": len(images),
                "ms_per_image": {name: round(value, 4) for name, value in ms.items()},
                "ratio": round(ms["image_processor"] / ms["processor_path"], 2),
                "bit_identical": torch.equal(outputs["processor_path"], outputs["image_processor"]),
            }
            record["results"].append(entry)
            print(
                f"[{source} -> {side} px] processor's path {ms['processor_path']:.3f} ms/img, image processor "
                f"{ms['image_processor']:.3f} ms/img ({entry['ratio']}x), bit-identical: {entry['bit_identical']}",
                flush=True,
            )
    output = write_json(args.output, record)
    print(f"Wrote {output}")
    return record


if __name__ == "__main__":
    main()
