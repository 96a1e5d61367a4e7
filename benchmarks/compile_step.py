#!/usr/bin/env python
"""Main-job training step with `MQIRTNModel.compile_regions` (train.py's `--torch_compile`) against the same step
eager, in one process, on CPU.

The model, data, batches and optimiser are train.py's default shapes run (48 px ViT 192x4 from scratch, frozen
all-MiniLM-L6-v2 behind the frozen-tower cache, fusion and composition at width 256, batch 64). All variants start from
the same weights and see the same real shapes batches. Every variant first runs every batch once (untimed: it compiles
the graphs, including the recompile for a new text length, after which the length is dynamic); then timed rounds over
the batches, the variants alternating at every step, one torch thread, this process's CPU time (other load on the
machine does not enter the ratio). Variants:

- `eager`: no compilation;
- `regions`: `compile_regions()`: fusion layers, composition, image residual and decoders under inductor;
- `regions+towers` (`--towers`): also the towers' layers, one by one (only the vision tower runs: the text tower is
  frozen and cached).

    python benchmarks/compile_step.py                   # writes benchmarks/results/compile_step.json
    python benchmarks/compile_step.py --tiny            # tiny random model and batches: a smoke test, figures mean nothing
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))


def main_job(batches: int):
    """train.py's default model (frozen, cached text tower) and `batches` real shapes training batches."""
    import train
    from torch.utils.data import DataLoader

    train_args = train.parse_args([])
    torch.manual_seed(0)
    model, processor, _ = train.build_model_and_processor(train_args)
    model.text_model.requires_grad_(False)
    train.FrozenTowerCache(model.text_model)
    dataset = train.set_training_transform(train.load_split(train_args, "train", False), processor)
    collator = train.CIRTrainingCollator(processor.tokenizer, train_args.max_text_length)
    loader = DataLoader(dataset, batch_size=train_args.per_device_train_batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0), collate_fn=collator, drop_last=True)
    data = []
    for batch in loader:
        data.append(batch)
        if len(data) == batches:
            break
    return model, data, "main job (train.py defaults, shapes, batch 64)"


def tiny(batches: int):
    import speed

    torch.manual_seed(0)
    model = speed.build_mqirtn("tiny")
    for module in model.modules():  # BertConfig's default dropout: compiled code draws other masks than eager
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model, [speed.make_batch("tiny", 4, seed=i) for i in range(batches)], "tiny (" + speed.describe_size("tiny") + ")"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=10, help="distinct batches (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over the batches (default 3)")
    parser.add_argument("--towers", action="store_true", help="also time compile_regions(towers=True)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model: a smoke test")
    parser.add_argument("--output", default=None, help="JSON (default benchmarks/results/compile_step[_tiny].json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    from machine_info import machine

    model, batches, what = (tiny if args.tiny else main_job)(args.batches)
    frozen = [name for name in ("vision_model", "text_model") if not any(p.requires_grad for p in getattr(model, name).parameters())]
    variants = {"eager": model, "regions": copy.deepcopy(model).compile_regions()}
    if args.towers:
        variants["regions+towers"] = copy.deepcopy(model).compile_regions(towers=True)
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for name, m in variants.items()}

    def step(name, batch) -> tuple[float, float, float]:
        model = variants[name]
        model.train()
        for tower in frozen:
            getattr(model, tower).eval()
        start, wall = time.process_time(), time.perf_counter()
        loss = model(**batch, return_loss=True).loss
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return time.process_time() - start, time.perf_counter() - wall, loss.item()

    result = {"what": what, "batches": len(batches), "rounds": args.rounds, "variants": {}}
    for name in variants:  # warm-up: compile every graph the batches need
        _, walls, losses = zip(*(step(name, batch) for batch in batches))
        result["variants"][name] = {"warmup_wall_s": round(sum(walls), 2), "first_loss": losses[0], "cpu_s": [], "wall_s": []}
        print(f"{name}: warm-up pass {sum(walls):.1f} s wall (compilation included), first loss {losses[0]:.6f}", flush=True)
    names = list(variants)
    for round_index in range(args.rounds):
        for index, batch in enumerate(batches):
            for name in names if (round_index * len(batches) + index) % 2 == 0 else names[::-1]:
                cpu, wall, _ = step(name, batch)
                result["variants"][name]["cpu_s"].append(cpu)
                result["variants"][name]["wall_s"].append(wall)
    eager = result["variants"]["eager"]
    for name, figures in result["variants"].items():
        figures["median_step_cpu_s"] = statistics.median(figures["cpu_s"])
        figures["median_step_wall_s"] = statistics.median(figures["wall_s"])
        if name != "eager":
            figures["ratio_cpu_vs_eager"] = statistics.median(c / e for c, e in zip(figures["cpu_s"], eager["cpu_s"]))
            figures["ratio_wall_vs_eager"] = statistics.median(c / e for c, e in zip(figures["wall_s"], eager["wall_s"]))
            figures["first_loss_minus_eager"] = figures["first_loss"] - eager["first_loss"]
    result.update(machine=machine(), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  command="python benchmarks/compile_step.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    for name, figures in result["variants"].items():
        ratio = "" if name == "eager" else (
            f"; compiled / eager: CPU time {figures['ratio_cpu_vs_eager']:.3f}, wall {figures['ratio_wall_vs_eager']:.3f}, "
            f"first loss differs by {figures['first_loss_minus_eager']:.2g}")
        print(f"{name:>15}: step {figures['median_step_cpu_s']:.3f} s CPU{ratio}")
    output = Path(args.output or REPO_ROOT / "benchmarks" / "results" / f"compile_step{'_tiny' if args.tiny else ''}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main()
