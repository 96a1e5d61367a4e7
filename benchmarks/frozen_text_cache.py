#!/usr/bin/env python
"""Main-job training step with the frozen text tower computed once per distinct text (train.py's
`CachedFrozenTextModel`, on by default with --freeze_text) against the same step without it, in one process.

The model, data, batches and optimiser are train.py's default shapes run (48 px ViT 192x4 from scratch, frozen
all-MiniLM-L6-v2, batch 64). Both models start from the same weights and see the same real shapes training batches;
candidate and baseline steps alternate, one torch thread. Two figures:

- warm: the cache already holds the batches' texts (every epoch after the first, and most of the first: shapes
  texts repeat), the steady state of the main job;
- first pass: the cache starts empty and fills as the batches come (the main job's first steps).

    python benchmarks/frozen_text_cache.py              # 40 batches; writes benchmarks/results/frozen_text_cache.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "frozen_text_cache.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from torch.utils.data import DataLoader

    from mqirtn_train.arguments import parse_args
    from mqirtn_train.data import load_split
    from mqirtn_train.frozen_text import CachedFrozenTextModel
    from mqirtn_train.model import build_model_and_processor
    from processing.data.transforms import CIRTrainingCollator, set_training_transform

    from machine_info import machine, write_json

    train_args = parse_args([])
    torch.manual_seed(0)
    baseline, processor, _ = build_model_and_processor(train_args)
    baseline.text_model.requires_grad_(False)
    candidate = copy.deepcopy(baseline)
    candidate.text_model = cache = CachedFrozenTextModel(candidate.text_model)
    dataset = set_training_transform(load_split(train_args, "train", False), processor)
    collator = CIRTrainingCollator(processor.tokenizer, train_args.max_text_length)
    loader = DataLoader(
        dataset,
        batch_size=train_args.per_device_train_batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        collate_fn=collator,
    )
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == args.batches:
            break
    optimizers = {
        name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        for name, model in (("baseline", baseline), ("candidate", candidate))
    }

    def step(name, model, batch) -> float:
        model.train()
        model.text_model.eval()
        start = time.process_time()
        outputs = model(**batch, return_loss=True)
        outputs.loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return time.process_time() - start

    def measure() -> dict:
        times = {"baseline": [], "candidate": []}
        for index, batch in enumerate(batches):
            order = [("baseline", baseline), ("candidate", candidate)]
            for name, model in order if index % 2 == 0 else order[::-1]:
                times[name].append(step(name, model, batch))
        ratios = [c / b for b, c in zip(times["baseline"], times["candidate"])]
        return {
            "baseline_step_s_median": statistics.median(times["baseline"]),
            "cached_step_s_median": statistics.median(times["candidate"]),
            "ratio_median": statistics.median(ratios),
            "speedup": statistics.median(times["baseline"]) / statistics.median(times["candidate"]),
        }

    step("baseline", baseline, batches[0])  # warm-up of both code paths (allocations, first-call overheads)
    first_pass = measure()
    first_hits, first_misses = cache.hits, cache.misses
    warm = measure()
    result = {
        "what": "main-job training step (default shapes run, batch 64), frozen text tower cached / not cached, CPU time",
        "batches": len(batches),
        "first_pass": {**first_pass, "cache_hits": first_hits, "cache_misses": first_misses},
        "warm": {**warm, "cache_hits": cache.hits - first_hits, "cache_misses": cache.misses - first_misses},
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/frozen_text_cache.py " + " ".join(argv or sys.argv[1:]),
    }
    write_json(args.output, result)
    for phase in ("first_pass", "warm"):
        figures = result[phase]
        print(
            f"{phase:>10}: step {figures['baseline_step_s_median']:.3f} s -> {figures['cached_step_s_median']:.3f} s with the cache "
            f"(cached / uncached {figures['ratio_median']:.3f}, {figures['speedup']:.2f}x; "
            f"{figures['cache_hits']} hits, {figures['cache_misses']} misses)"
        )
    return result


if __name__ == "__main__":
    main()
