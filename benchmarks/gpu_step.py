"""bf16 training throughput of MQIRTN against plain dual-encoder contrastive steps, in one run.

Paper size (ViT-B/16 224 px + BERT-base, 32 tokens, projection_dim 512), random weights, bf16 autocast, AdamW, SDPA
attention, activation checkpointing off unless asked. Three steps are timed in alternating rounds:

- `mqirtn`: `MQIRTNModel(..., return_loss=True)` with all four loss terms (base, symmetric, two reconstructions);
- `dual_encoder`: `transformers.VisionTextDualEncoderModel` with the same tower configs, `return_loss=True`
  (CLIP loss between B images and their B texts);
- `towers_contrastive`: MQIRTN's own inputs (reference image, text, target image) through the same towers +
  projections + in-batch InfoNCE, nothing else (`benchmarks/speed.py`'s baseline).

A "sample" is one training example: a (reference, text, target) triplet for `mqirtn` and `towers_contrastive`, an
(image, text) pair for `dual_encoder`, so MQIRTN runs the vision tower twice per sample where the dual encoder runs
it once. FLOPs of one step are counted with `torch.utils.flop_counter.FlopCounterMode`; model FLOPs utilisation
(MFU) = achieved FLOP/s / the device's dense bf16 peak (table below, or `--peak-tflops`).

Run from the repository root (only torch + transformers needed; no downloads):

    python benchmarks/gpu_step.py --batch-size 64          # GPU, ~1-2 minutes
    python benchmarks/gpu_step.py --tiny                   # CPU, tiny towers, seconds (smoke test)
    python benchmarks/gpu_step.py --batch-size 64 --torch-compile             # MQIRTN's fusion + composition compiled
    python benchmarks/gpu_step.py --batch-size 64 --torch-compile --compile-towers --compile-mode reduce-overhead

`--torch-compile` compiles MQIRTN's own regions (`MQIRTNModel.compile_regions`: fusion layers, composition, image
residual, decoders), the towers stay eager in all three models, so MQIRTN / towers-only still compares equal towers.
`--compile-towers` also compiles the towers' layers, in all three models alike. After the eager warm-up and the FLOP
count (FlopCounterMode cannot see inside fused kernels), `--warmup` more steps (at least 2) compile; `compile_warmup_s`
in the JSON says how long that took.

Writes `benchmarks/results/speed_gpu.json` (`speed_gpu_tiny.json` with `--tiny`) and prints a compact summary.
"""

import argparse
import contextlib
import datetime
import importlib.util
import statistics
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel  # noqa: E402

from machine_info import write_json  # noqa: E402


def _load_speed_module():
    """`benchmarks/speed.py` (sizes, baseline, training step), loaded by path: `benchmarks/` is not a package."""
    spec = importlib.util.spec_from_file_location("mqirtn_speed_benchmark", Path(__file__).with_name("speed.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


speed = _load_speed_module()

# Dense (no sparsity) bf16 tensor-core peaks from the vendor data sheets, TFLOP/s. Checked in order: first match wins.
PEAK_BF16_TFLOPS = [
    ("H200", 989.4),  # H200 SXM / GH200: same compute as H100 SXM
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
]
MODELS = ("mqirtn", "dual_encoder", "towers_contrastive")


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="samples per step (paper runs use 64-128; default 64, 4 with --tiny)",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny towers, few steps: a CPU smoke test")
    parser.add_argument("--device", default=None, help="default cuda when available, else cpu")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per model (default 3, 1 with --tiny)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating timed rounds (default 5, 2 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="steps per model per round (default 5, 1 with --tiny)")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute tower/fusion activations")
    parser.add_argument("--no-autocast", action="store_true", help="fp32 instead of bf16 autocast")
    parser.add_argument(
        "--torch-compile", action="store_true", help="compile MQIRTN's fusion/composition regions (towers eager)"
    )
    parser.add_argument(
        "--compile-towers", action="store_true", help="with --torch-compile: also the towers' layers, in every model"
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile mode (reduce-overhead: CUDA graphs; the shapes here are static)",
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (aot_eager: a quick CPU smoke test)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="after timing, print torch.profiler tables of one step per model"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak bf16 TFLOP/s for MFU (default: table)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/speed_gpu.json, speed_gpu_tiny.json with --tiny)",
    )
    args = parser.parse_args(argv)
    defaults = {"batch_size": (64, 4), "warmup": (3, 1), "rounds": (5, 2), "steps": (5, 1)}
    for name, (full, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
        minimum = 0 if name == "warmup" else 1
        if getattr(args, name) < minimum:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= {minimum}, got {getattr(args, name)}")
    if (args.compile_towers or args.compile_mode or args.compile_backend != "inductor") and not args.torch_compile:
        raise ValueError("`--compile-towers`, `--compile-mode` and `--compile-backend` need `--torch-compile`")
    if args.torch_compile and args.warmup < 2:
        args.warmup = 2  # compiled warm-up: the first step compiles, the second checks nothing compiles again
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ValueError(f"`--peak-tflops` must be positive, got {args.peak_tflops}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def build_models(size: str, attn_implementation: str, device) -> dict:
    vision, text = speed.tower_configs(size, attn_implementation)
    projection_dim = speed.SIZES[size]["mqirtn"]["projection_dim"]
    dual_config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=projection_dim)
    dual_config.vision_config._attn_implementation = attn_implementation
    dual_config.text_config._attn_implementation = attn_implementation
    with torch.device(device):  # initialise on the device: paper-size random init is slow on a CPU
        return {
            "mqirtn": speed.build_mqirtn(size, attn_implementation),
            "dual_encoder": VisionTextDualEncoderModel(dual_config),
            "towers_contrastive": speed.build_baseline(size, attn_implementation),
        }


def compile_models(models: dict, towers: bool, mode: str | None, backend: str = "inductor") -> None:
    """MQIRTN's own regions; with `towers`, every model's tower layers too (one graph per tower, reused by its layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    kwargs = {"backend": backend, **({} if mode in (None, "default") else {"mode": mode})}
    models["mqirtn"].compile_regions(dynamic=False, **kwargs)  # one batch shape here: static kernels
    if towers:
        for model in models.values():
            for module in model.modules():
                if isinstance(module, GradientCheckpointingLayer) and module._compiled_call_impl is None:
                    module.compile(dynamic=False, **kwargs)


def inputs_for(name: str, batch: dict) -> dict:
    if name == "dual_encoder":
        return {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    return batch


def enable_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable()
    else:  # the towers-only baseline is a plain nn.Module around two PreTrainedModels
        model.vision_model.activation_checkpointing_enable()
        model.text_model.activation_checkpointing_enable()


def set_up(name, model, optimizers, batch, args, device, autocast) -> dict:
    """Warm-up steps (which also create the optimizer state), then one step under FlopCounterMode."""
    model.train()
    if args.activation_checkpointing:
        enable_checkpointing(model)
    optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    inputs = inputs_for(name, batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        speed.training_step(model, optimizers[name], inputs, autocast)
    with FlopCounterMode(display=False) as counter:
        loss = speed.training_step(model, optimizers[name], inputs, autocast)
    synchronize(device)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_step": counter.get_total_flops(),
        "loss": float(loss),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "compile_warmup_s": None,
        "attn_implementation": sorted(
            {
                m.config._attn_implementation
                for m in model.modules()
                if isinstance(m, transformers.PreTrainedModel) and m is not model
            }
        ),
        "step_s": [],
    }


def profile_steps(models, optimizers, batch, autocast, device) -> None:
    """Where a step's time goes: top operators by self device time (CUDA) or self CPU time, one step per model."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name in ("mqirtn", "towers_contrastive"):
        if name not in models:
            continue
        inputs = inputs_for(name, batch)
        synchronize(device)
        with profile(activities=activities) as prof:
            speed.training_step(models[name], optimizers[name], inputs, autocast)
            synchronize(device)
        events = prof.key_averages()
        kernels = sum(
            e.count
            for e in events
            if getattr(e, "device_type", None) is not None and "cuda" in str(e.device_type).lower()
        )
        print(f"--- profile: {name} (one step; {len(events)} distinct ops, {kernels} device kernel launches)")
        print(events.table(sort_by=sort_by, row_limit=15, max_name_column_width=60))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    if device.type == "cpu":
        # On shared cores a descheduled OpenMP thread stalls every op; one thread keeps a CPU run's ratios sane.
        torch.set_num_threads(1)
    size = "tiny" if args.tiny else "paper"
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    )
    peak = args.peak_tflops or (peak_tflops(device_name) if device.type == "cuda" else None)
    dtype = None if args.no_autocast else torch.bfloat16
    print(
        f"device: {device_name}; peak bf16 {peak or 'unknown'} TFLOP/s; torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print(
        f"size: {speed.describe_size(size)}; batch {args.batch_size}; "
        f"{'bf16 autocast' if dtype else 'fp32'}; attention {args.attn_implementation}; "
        f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}; "
        f"torch.compile {'off' if not args.torch_compile else ('regions + towers' if args.compile_towers else 'regions') + ' ' + (args.compile_mode or 'default')}; "
        f"warmup {args.warmup}, {args.rounds} rounds x {args.steps} steps",
        flush=True,
    )

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    torch.manual_seed(0)
    models = build_models(size, args.attn_implementation, device)
    batch = speed.make_batch(size, args.batch_size, device=device)
    results, optimizers = {}, {}
    failed = {}
    for name, model in list(models.items()):
        try:
            results[name] = set_up(name, model, optimizers, batch, args, device, autocast)
        except torch.OutOfMemoryError as error:  # report the others rather than lose the whole (one) GPU run
            failed[name] = f"out of memory: {str(error).splitlines()[0]}"
            print(f"{name}: {failed[name]} (try a smaller --batch-size or --activation-checkpointing)", flush=True)
            del models[name]
            optimizers.pop(name, None)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if (
        args.torch_compile
    ):  # after the eager warm-up and FLOP count (FlopCounterMode does not see inside fused kernels)
        compile_models(models, args.compile_towers, args.compile_mode, args.compile_backend)
        for name, model in models.items():
            start = time.perf_counter()
            for _ in range(args.warmup):
                speed.training_step(model, optimizers[name], inputs_for(name, batch), autocast)
            synchronize(device)
            results[name]["compile_warmup_s"] = time.perf_counter() - start
            print(
                f"{name}: {args.warmup} compiled warm-up steps in {results[name]['compile_warmup_s']:.1f} s",
                flush=True,
            )

    names = list(models)
    for round_index in range(args.rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            inputs = inputs_for(name, batch)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                speed.training_step(models[name], optimizers[name], inputs, autocast)
            synchronize(device)
            results[name]["step_s"].append((time.perf_counter() - start) / args.steps)

    for name, result in results.items():
        step_s = statistics.median(result["step_s"])
        result["median_step_s"] = step_s
        result["samples_per_s"] = args.batch_size / step_s
        result["flops_per_sample"] = result["flops_per_step"] / args.batch_size
        result["achieved_tflops"] = result["flops_per_step"] / step_s / 1e12
        result["mfu"] = result["achieved_tflops"] / peak if peak else None

    if args.profile:
        profile_steps(models, optimizers, batch, autocast, device)

    def ratio_of(a, b, key="samples_per_s"):
        return results[a][key] / results[b][key] if a in results and b in results else None

    ratio = ratio_of("mqirtn", "dual_encoder")
    flops_ratio = ratio_of("mqirtn", "dual_encoder", "flops_per_sample")
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/gpu_step.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": device_name,
        "peak_bf16_tflops": peak,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "size": size,
        "sizes": speed.describe_size(size),
        "batch_size": args.batch_size,
        "autocast": "bf16" if dtype else None,
        "attn_implementation": args.attn_implementation,
        "activation_checkpointing": args.activation_checkpointing,
        "torch_compile": args.torch_compile,
        "compile_towers": args.compile_towers,
        "compile_mode": args.compile_mode,
        "compile_backend": args.compile_backend if args.torch_compile else None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),  # "high"/"medium": TF32 in float32 matmuls
        "warmup": args.warmup,
        "rounds": args.rounds,
        "steps": args.steps,
        "ratio_vs_dual_encoder": ratio,
        "target": ">= 0.8",
        "met": None if ratio is None else ratio >= 0.8,
        "ratio_vs_towers_contrastive": ratio_of("mqirtn", "towers_contrastive"),
        "flops_ratio_vs_dual_encoder": flops_ratio,
        "models": results,
        "failed": failed,
    }
    print(
        f"{'model':<20}{'samples/s':>11}{'step ms':>10}{'GFLOP/sample':>14}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}"
    )
    for name, r in results.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        print(
            f"{name:<20}{r['samples_per_s']:>11.1f}{r['median_step_s'] * 1e3:>10.1f}{r['flops_per_sample'] / 1e9:>14.1f}"
            f"{r['achieved_tflops']:>10.2f}{mfu:>8}{memory:>10}"
        )

    def show(value):
        return "n/a" if value is None else f"{value:.3f}"

    verdict = "n/a" if ratio is None else ("met" if ratio >= 0.8 else "MISSED")
    print(
        f"MQIRTN / dual encoder samples/s: {show(ratio)} (target >= 0.8: {verdict}); "
        f"FLOPs per sample {show(flops_ratio)}x; "
        f"MQIRTN / towers-only on the same triplets: {show(report['ratio_vs_towers_contrastive'])}"
    )
    output = args.output or REPO_ROOT / "benchmarks" / "results" / (
        "speed_gpu_tiny.json" if args.tiny else "speed_gpu.json"
    )
    write_json(output, report)
    print(f"wrote {output}")
    return report


if __name__ == "__main__":
    main()
