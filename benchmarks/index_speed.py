#!/usr/bin/env python
"""Indexing a folder of JPEGs (`GalleryIndex.from_folder`, what `mqirtn index` runs) against the bare vision tower on
the same batches, in one process: does decoding keep up with the tower?

- tower: `model.get_image_features` on the gallery's batches, decoded and preprocessed beforehand (tensors only);
- end to end: `GalleryIndex.from_folder(..., num_workers=W)`: listing, decoding (`to_rgb_image`), preprocessing
  (the processor), embedding, for W = 0 (decode in this process) and W DataLoader workers;
- decode only: decoding + preprocessing the gallery in this process, no model (what one core can feed).

Ratio = end-to-end images/s ÷ tower images/s at the same number of torch threads (`torch.set_num_threads`, the main
process; a worker runs one thread). Wall clock (workers are other processes), median of `--repeats` passes that
alternate tower and end-to-end runs, after one warm-up pass of each.

The model is the main job's (train.py's defaults: 48 px ViT 192 x 4 from scratch, projection 256; random weights:
speed does not depend on them) or, with `--sizes paper`, a ViT-B/16 224 px. Two generated galleries (smooth random
colour fields with shapes, JPEG quality 90): 4096 images of 48 px (the main job's image size, like its shapes gallery)
and 1024 photo-like ones (a random side between 256 and 512 px per image): `--sources 48-48:4096 256-512:1024`.

    python benchmarks/index_speed.py                      # writes benchmarks/results/index_speed.json
    python benchmarks/index_speed.py --quick              # tiny sizes, seconds: checks the script runs
    python benchmarks/index_speed.py --device cuda --threads 1 --workers 0 4 8 --sources 256-512:4096   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


REPO_ROOT = Path(__file__).resolve().parents[1]


def load_average() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def write_gallery(folder: Path, count: int, min_side: int, max_side: int, seed: int = 0) -> list[Path]:
    """`count` JPEGs with a side between `min_side` and `max_side`: a smooth random colour field and a few shapes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        width, height = (int(rng.integers(min_side, max_side + 1)) for _ in range(2))
        coarse = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            x1, y1 = x0 + int(rng.integers(4, max(5, width // 2))), y0 + int(rng.integers(4, max(5, height // 2)))
            draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        path = folder / f"img_{i:05d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def build_model(size: str, quick: bool):
    """(model, processor, description): the main job's model (train.py's defaults) or a ViT-B/16 224 px one."""
    from transformers import ViTConfig, ViTImageProcessorPil

    from modeling_mqirtn import MQIRTNConfig, MQIRTNModel
    from mqirtn_train.arguments import parse_args
    from mqirtn_train.model import build_model_and_processor
    from processing import MQIRTNProcessor

    args = parse_args([])
    torch.manual_seed(0)
    if quick:
        args.image_size, args.patch_size, args.vision_hidden_size, args.vision_num_hidden_layers = 32, 8, 32, 1
    if size == "main":
        model, processor, _ = build_model_and_processor(args)
    else:  # the paper's vision tower, the main job's text tower and head
        main_model, main_processor, _ = build_model_and_processor(args)
        vision = (
            ViTConfig()
            if not quick
            else ViTConfig(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
            )
        )
        config = MQIRTNConfig.from_vision_text_configs(
            vision,
            main_model.config.text_config,
            projection_dim=args.projection_dim,
            num_fusion_layers=args.num_fusion_layers,
            fusion_num_heads=args.fusion_num_heads,
        )
        model = MQIRTNModel(config, text_model=main_model.text_model)
        side = vision.image_size
        image_processor = ViTImageProcessorPil(
            size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
        processor = MQIRTNProcessor(image_processor=image_processor, tokenizer=main_processor.tokenizer)
    vision = model.config.vision_config
    description = (
        f"ViT {vision.image_size}px/patch {vision.patch_size} hidden {vision.hidden_size} x{vision.num_hidden_layers}, "
        f"projection_dim {model.config.projection_dim}, {sum(p.numel() for p in model.vision_model.parameters()) / 1e6:.2f} M "
        "vision parameters"
    )
    return model.eval(), processor, description


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_it(function) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its workers) of `function()`."""
    start, cpu = time.perf_counter(), cpu_seconds()
    function()
    return time.perf_counter() - start, cpu_seconds() - cpu


def measure(model, processor, folder: Path, files: list[Path], args, threads: int) -> dict:
    from mqirtn_app.index import GalleryIndex, _decode_batch

    torch.set_num_threads(threads)
    count, batch_size = len(files), args.batch_size
    starts = range(0, count, batch_size)

    def decode_all():
        return [_decode_batch(files, processor, s, min(s + batch_size, count))["pixel_values"] for s in starts]

    parameter = next(model.parameters())
    # The same batches `from_folder` embeds (files sorted as `image_files` sorts them), already on the model's device.
    batches = [b.to(parameter.device, parameter.dtype) for b in decode_all()]

    @torch.inference_mode()
    def tower():
        for pixel_values in batches:
            model.get_image_features(pixel_values=pixel_values).pooler_output
        if parameter.device.type == "cuda":
            torch.cuda.synchronize()

    def end_to_end(workers):
        def run():
            index = GalleryIndex.from_folder(
                model, processor, folder, batch_size=batch_size, num_workers=workers, progress=False
            )
            assert len(index) == count

        return run

    def tower_beside_busy_process():
        """The tower while another process spins a pure-Python loop (no memory traffic, no vector units): what any
        activity on the other core costs the tower on this machine, the ceiling of decoding beside it."""
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.2)  # started and running
            return time_it(tower)  # the busy process is not this process's child until it is reaped
        finally:
            busy.kill()
            busy.wait()

    candidates = {"tower": tower, "decode_only": decode_all}
    if args.busy_neighbour:
        candidates["tower_beside_busy_process"] = tower_beside_busy_process
    candidates.update({f"end_to_end_w{w}": end_to_end(w) for w in args.workers})
    times = {name: [] for name in candidates}
    cpu = {name: [] for name in candidates}
    for function in candidates.values():  # warm-up
        function()
    names = list(candidates)
    for repeat in range(args.repeats):
        order = names if repeat % 2 == 0 else names[::-1]  # alternate, so drifts of the machine fall on both sides
        for name in order:
            if name == "tower_beside_busy_process":  # times itself (not the busy process's start)
                wall, used = candidates[name]()
            else:
                wall, used = time_it(candidates[name])
            times[name].append(wall)
            cpu[name].append(used)
    result = {}
    for name, seconds in times.items():
        median = statistics.median(seconds)
        cpu_median = statistics.median(cpu[name])
        # cores_busy: CPU seconds / wall seconds, this process and its workers (< 1 + workers: it waited for a core)
        result[name] = {
            "images_per_s": round(count / median, 1),
            "median_s": round(median, 4),
            "seconds": [round(s, 4) for s in seconds],
            "cpu_ms_per_image": round(1000 * cpu_median / count, 3),
            "cores_busy": round(cpu_median / median, 2),
        }
    tower_rate = result["tower"]["images_per_s"]
    for name in result:
        if name.startswith("end_to_end") or name in ("decode_only", "tower_beside_busy_process"):
            result[name]["ratio_to_tower"] = round(result[name]["images_per_s"] / tower_rate, 3)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1024, help="images per gallery without its own count (1024)")
    parser.add_argument(
        "--sources",
        nargs="+",
        default=["48-48:4096", "256-512:1024"],
        help="galleries: MIN-MAX side of the source JPEGs in pixels[:image count] (default 48-48:4096 256-512:1024)",
    )
    parser.add_argument(
        "--sizes", nargs="+", default=["main"], choices=["main", "paper"], help="models (default main)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (mqirtn index's default)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads of the main process")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="num_workers values")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--busy-neighbour",
        action="store_true",
        help="also time the tower while another process spins a pure-Python loop on the other core",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model and gallery; the figures mean nothing")
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "index_speed.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.sources, args.threads, args.workers, args.repeats = ["32-64:12"], [1], [0, 2], 1
        args.batch_size = 4

    from machine_info import machine, write_json

    started, load_before = time.perf_counter(), load_average()
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/index_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_before": load_before,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "what": "images/s (wall clock, median); ratio_to_tower = images/s / tower images/s at the same torch threads",
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="index_speed_") as tmp:
        galleries = {}
        for source in args.sources:
            sides, _, count = source.partition(":")
            low, high = (int(x) for x in sides.split("-"))
            folder = Path(tmp) / f"jpeg_{sides}_{count or args.images}"
            files = write_gallery(folder, int(count or args.images), low, high)
            galleries[source] = (folder, files, sum(p.stat().st_size for p in files) / len(files))
        for size in args.sizes:
            model, processor, description = build_model(size, args.quick)
            model = model.to(args.device, getattr(torch, args.dtype))
            description += f", {args.device}, {args.dtype}"
            if args.device.startswith("cuda"):
                description += f" ({torch.cuda.get_device_name(torch.device(args.device))})"
            for source, (folder, files, mean_bytes) in galleries.items():
                for threads in args.threads:
                    result = measure(model, processor, folder, files, args, threads)
                    entry = {
                        "model": size,
                        "model_description": description,
                        "source_side_px": source.split(":")[0],
                        "images": len(files),
                        "mean_jpeg_bytes": round(mean_bytes),
                        "torch_threads": threads,
                        **result,
                    }
                    record["results"].append(entry)
                    line = ", ".join(
                        f"{name} {value['images_per_s']:.0f}/s"
                        + (f" ({value['ratio_to_tower']:.3f})" if "ratio_to_tower" in value else "")
                        for name, value in result.items()
                    )
                    print(
                        f"[{size}, {len(files)} images of {source.split(':')[0]} px, {threads} thread(s)] {line}",
                        flush=True,
                    )
    record["load_average_after"] = load_average()
    record["seconds"] = round(time.perf_counter() - started, 1)
    output = Path(args.output)
    write_json(output, record, indent=1)
    print(f"Wrote {output} ({record['seconds']} s)")
    return record


if __name__ == "__main__":
    main()
