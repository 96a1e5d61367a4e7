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

`--equivalence SIZE` (tiny, main, paper) measures instead how far compiled outputs are from eager ones, on one random
batch of 8 (benchmarks/README.md, "torch.compile", reads them):

- `rounding`: eval-mode embeddings and a train-mode step (dropout off) in float32 and float64, compiled (`--scope
  regions`: `compile_regions()`; `whole`: `torch.compile(model)`) against eager, next to eager against eager on inputs
  moved by one ulp (how much the model itself amplifies a rounding difference);
- `dropout`: train mode with dropout on (BERT's default 0.1 in the text tower, `fusion_dropout` 0.1), same seed:
  eager against eager, against eager with another seed, against compiled, and against compiled with
  `torch._inductor.config.fallback_random = True` (compiled code drawing its masks from eager's generator).

    python benchmarks/compile_step.py --equivalence main --scope regions --experiment rounding
    python benchmarks/compile_step.py --equivalence tiny --scope whole --experiment dropout
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


def main_job(batches: int):
    """train.py's default model (frozen, cached text tower) and `batches` real shapes training batches."""
    from torch.utils.data import DataLoader

    from mqirtn_train.arguments import parse_args
    from mqirtn_train.data import load_split
    from mqirtn_train.frozen_text import CachedFrozenTextModel
    from mqirtn_train.model import build_model_and_processor
    from processing.data.transforms import CIRTrainingCollator, set_training_transform

    train_args = parse_args([])
    torch.manual_seed(0)
    model, processor, _ = build_model_and_processor(train_args)
    model.text_model.requires_grad_(False)
    model.text_model = CachedFrozenTextModel(model.text_model)
    dataset = set_training_transform(load_split(train_args, "train", False), processor)
    collator = CIRTrainingCollator(processor.tokenizer, train_args.max_text_length)
    loader = DataLoader(
        dataset,
        batch_size=train_args.per_device_train_batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        collate_fn=collator,
        drop_last=True,
    )
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
    return (
        model,
        [speed.make_batch("tiny", 4, seed=i) for i in range(batches)],
        "tiny (" + speed.describe_size("tiny") + ")",
    )


# ------------------------------------------------------------------------------------------------- equivalence
def equivalence_model(size: str, dropout: bool):
    """A random-weight model of `size` (train.py's default model for `main`), dropout off unless asked."""
    from modeling_mqirtn import MQIRTNConfig, MQIRTNModel

    import speed

    torch.manual_seed(0)
    if size == "main":
        from mqirtn_train.arguments import parse_args
        from mqirtn_train.model import build_model_and_processor

        model, _, _ = build_model_and_processor(parse_args([]))
        image_size, vocab, length = model.config.vision_config.image_size, (1000, 20000), 12
    else:
        vision, text = speed.tower_configs(size)
        if not dropout:
            text.hidden_dropout_prob = text.attention_probs_dropout_prob = 0.0
        config = MQIRTNConfig(
            vision_config=vision.to_dict(),
            text_config=text.to_dict(),
            fusion_dropout=0.1 if dropout else 0.0,
            **speed.SIZES[size]["mqirtn"],
        )
        model = MQIRTNModel(config)
        image_size, vocab, length = vision.image_size, (5, text.vocab_size), speed.SIZES[size]["seq_len"]
    if not dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        for config in (model.config.text_config, model.config.vision_config):  # attention dropout (sdpa) reads it
            for name in ("attention_probs_dropout_prob", "attention_dropout"):
                if hasattr(config, name):
                    setattr(config, name, 0.0)
    generator, batch_size = torch.Generator().manual_seed(0), 8
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    attention_mask[: batch_size // 4, length // 2 :] = 0
    batch = {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "input_ids": torch.randint(*vocab, (batch_size, length), generator=generator),
        "attention_mask": attention_mask,
        "target_pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
    }
    return model, batch


def unnormalised_query(model, batch: dict) -> torch.Tensor:
    """The composed query theta before `normalize` (which casts to float32: the embeddings of a float64 model are
    float32, so they cannot show float64 differences)."""
    from modeling_mqirtn.fusion_mqirtn import masked_mean

    mask = batch["attention_mask"]
    image_tokens = model._image_tokens(batch["pixel_values"])
    text_tokens = model._text_tokens(batch["input_ids"], mask)
    image_embeds = model.image_projection(image_tokens[:, 0])
    text_embeds = model.text_projection(masked_mean(text_tokens, mask))
    return model._compose(image_tokens, text_tokens, mask, image_embeds, text_embeds)[0]


def difference(got: torch.Tensor, expected: torch.Tensor) -> dict:
    error = (got.double() - expected.double()).abs()
    return {"max_abs": error.max().item(), "rel_l2": (error.norm() / expected.double().norm()).item()}


def moved_one_ulp(value: torch.Tensor, generator) -> torch.Tensor:
    """Every element moved to its next representable neighbour, up or down at random."""
    up = torch.rand(value.shape, generator=generator) < 0.5
    return torch.nextafter(value, torch.where(up, float("inf"), -float("inf")).to(value.dtype))


def gradient_difference(got_model, expected_model) -> dict:
    """Largest gradient difference over the largest gradient of the model (some gradients are exactly zero in theory,
    e.g. attention key biases: a per-tensor relative error would compare rounding noise with rounding noise)."""
    got = {n: p.grad for n, p in got_model.named_parameters() if p.grad is not None}
    expected = {n: p.grad for n, p in expected_model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys(), got.keys() ^ expected.keys()
    scale = max(g.abs().max().item() for g in expected.values())
    return {
        "max_abs_over_largest_gradient": max((got[n] - expected[n]).abs().max().item() for n in expected) / scale,
        "gradients": len(expected),
    }


def equivalence(size: str, scope: str, experiment: str, dtypes: list[str], device: str = "cpu") -> dict:
    def compiled(model):
        copy_ = copy.deepcopy(model)
        return (copy_, copy_.compile_regions()) if scope == "regions" else (copy_, torch.compile(copy_))

    frozen_text = size == "main"  # the main job's text tower is frozen: it stays in eval mode in training
    result = {
        "size": size,
        "scope": scope,
        "experiment": experiment,
        "device": device,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if experiment == "dropout":
        model, batch = equivalence_model(size, dropout=True)
        model.to(device).train()
        batch = {k: v.to(device) for k, v in batch.items()}

        def query(function, seed):
            torch.manual_seed(seed)
            with torch.no_grad():
                return function(**batch).query_embeds

        _, function = compiled(model)
        result["eager_vs_eager_same_seed"] = difference(query(model, 0), query(model, 0))
        result["eager_vs_eager_other_seed"] = difference(query(model, 1), query(model, 0))
        result["compiled_vs_eager_same_seed"] = difference(query(function, 0), query(model, 0))
        import torch._inductor.config as inductor_config

        torch._dynamo.reset()
        inductor_config.fallback_random = True
        _, function = compiled(model)
        result["compiled_fallback_random_vs_eager_same_seed"] = difference(query(function, 0), query(model, 0))
        inductor_config.fallback_random = False
        return result
    base, batch32 = equivalence_model(size, dropout=False)
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        model = copy.deepcopy(base).to(device=device, dtype=dtype).eval()
        batch = {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in batch32.items()}
        copy_, function = compiled(model)
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(1)
        moved_batch = {
            k: moved_one_ulp(v.cpu(), generator).to(device) if v.is_floating_point() else v for k, v in batch.items()
        }
        with torch.no_grad():
            expected, got, moved = model(**batch), function(**batch), model(**moved_batch)
            theta = {"expected": unnormalised_query(model, batch), "moved": unnormalised_query(model, moved_batch)}
            if scope == "regions":  # (the whole-model scope compiles `forward` only)
                theta["got"] = unnormalised_query(copy_, batch)
        figures = {"first_call_s": round(time.perf_counter() - start, 1)}
        if "got" in theta:
            figures["query_unnormalised"] = difference(theta["got"], theta["expected"])
        figures["query_unnormalised_eager_on_inputs_moved_1ulp"] = difference(theta["moved"], theta["expected"])
        for name in ("query_embeds", "reference_embeds", "target_embeds"):  # float32 whatever the model's dtype
            figures[name] = difference(got[name], expected[name])
            figures[name + "_eager_on_inputs_moved_1ulp"] = difference(moved[name], expected[name])
        for m in (model, copy_):
            m.train()
            if frozen_text:
                m.text_model.eval()
        expected = model(**batch, return_loss=True)
        expected.loss.backward()
        got = function(**batch, return_loss=True)
        got.loss.backward()
        figures["train_loss"] = difference(got.loss, expected.loss)
        figures["train_query_embeds"] = difference(got.query_embeds, expected.query_embeds)
        figures["train_gradients"] = gradient_difference(copy_, model)
        result[dtype_name] = figures
        print(dtype_name, json.dumps(figures), flush=True)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=10, help="distinct batches (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over the batches (default 3)")
    parser.add_argument("--towers", action="store_true", help="also time compile_regions(towers=True)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model: a smoke test")
    parser.add_argument("--output", default=None, help="JSON (default benchmarks/results/compile_step[_tiny].json)")
    parser.add_argument(
        "--equivalence",
        choices=["tiny", "main", "paper"],
        default=None,
        help="measure compiled vs eager outputs instead",
    )
    parser.add_argument(
        "--scope", choices=["regions", "whole"], default="regions", help="--equivalence: what is compiled"
    )
    parser.add_argument(
        "--experiment", choices=["rounding", "dropout"], default="rounding", help="--equivalence: which comparison"
    )
    parser.add_argument("--dtypes", default="float32,float64", help="--equivalence rounding: comma-separated")
    parser.add_argument("--device", default="cpu", help="--equivalence: where to run (cuda on a GPU machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    from machine_info import machine, write_json

    if args.equivalence:
        result = equivalence(args.equivalence, args.scope, args.experiment, args.dtypes.split(","), args.device)
        result.update(
            torch=torch.__version__,
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            command="python benchmarks/compile_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        )
        name = f"compile_equivalence_{args.equivalence}_{args.scope}_{args.experiment}{'' if args.device == 'cpu' else '_' + args.device}.json"
        output = Path(args.output or REPO_ROOT / "benchmarks" / "results" / name)
        write_json(output, result)
        print(json.dumps(result, indent=1))
        return result

    model, batches, what = (tiny if args.tiny else main_job)(args.batches)
    frozen = [
        name
        for name in ("vision_model", "text_model")
        if not any(p.requires_grad for p in getattr(model, name).parameters())
    ]
    variants = {"eager": model, "regions": copy.deepcopy(model).compile_regions()}
    if args.towers:
        variants["regions+towers"] = copy.deepcopy(model).compile_regions(towers=True)
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
        for name, m in variants.items()
    }

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
        result["variants"][name] = {
            "warmup_wall_s": round(sum(walls), 2),
            "first_loss": losses[0],
            "cpu_s": [],
            "wall_s": [],
        }
        print(
            f"{name}: warm-up pass {sum(walls):.1f} s wall (compilation included), first loss {losses[0]:.6f}",
            flush=True,
        )
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
            figures["ratio_wall_vs_eager"] = statistics.median(
                c / e for c, e in zip(figures["wall_s"], eager["wall_s"])
            )
            figures["first_loss_minus_eager"] = figures["first_loss"] - eager["first_loss"]
    result.update(
        machine=machine(),
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command="python benchmarks/compile_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    for name, figures in result["variants"].items():
        ratio = (
            ""
            if name == "eager"
            else (
                f"; compiled / eager: CPU time {figures['ratio_cpu_vs_eager']:.3f}, wall {figures['ratio_wall_vs_eager']:.3f}, "
                f"first loss differs by {figures['first_loss_minus_eager']:.2g}"
            )
        )
        print(f"{name:>15}: step {figures['median_step_cpu_s']:.3f} s CPU{ratio}")
    output = Path(
        args.output or REPO_ROOT / "benchmarks" / "results" / f"compile_step{'_tiny' if args.tiny else ''}.json"
    )
    write_json(output, result)
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main()
