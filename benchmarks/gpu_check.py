"""CUDA correctness checks for MQIRTN, run as one short script on a GPU machine (or on CPU with --device cpu).

For every composition variant: a tiny model's fp32 query/gallery embeddings on the device equal the CPU ones, a
training step in bf16 autocast gives a finite loss and finite, non-zero gradients, and activation checkpointing
gives the same gradients as without it. Needs only torch, transformers and this repository (`pip install -e .`, or
PYTHONPATH=. from its root).

    python benchmarks/gpu_check.py            # cuda when available
    python benchmarks/gpu_check.py --json out.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import BertConfig, ViTConfig

from modeling_mqirtn import COMPOSITIONS, MQIRTNConfig, MQIRTNModel


def tiny_config(composition: str) -> MQIRTNConfig:
    vision = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    text = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return MQIRTNConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        projection_dim=32,
        fusion_num_heads=4,
        composition=composition,
    )


def batch(size: int, device):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (size, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return {
        "pixel_values": torch.randn(size, 3, 32, 32, generator=generator).to(device),
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "target_pixel_values": torch.randn(size, 3, 32, 32, generator=generator).to(device),
    }


def grads(model, inputs, checkpointing: bool, autocast_dtype=None):
    model.zero_grad(set_to_none=True)
    if checkpointing:
        model.activation_checkpointing_enable()
    else:
        model.activation_checkpointing_disable()
    device_type = inputs["pixel_values"].device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = model(**inputs, return_loss=True)
    out.loss.backward()
    return out, {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def check(composition: str, device) -> dict:
    torch.manual_seed(0)
    cpu_model = MQIRTNModel(tiny_config(composition)).eval()
    model = MQIRTNModel(tiny_config(composition)).eval()
    model.load_state_dict(cpu_model.state_dict())
    model.to(device)
    cpu_inputs, inputs = batch(6, "cpu"), batch(6, device)
    with torch.no_grad():
        query_cpu = cpu_model.get_query_features(
            cpu_inputs["pixel_values"], cpu_inputs["input_ids"], cpu_inputs["attention_mask"]
        ).pooler_output
        query_dev = model.get_query_features(
            inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
        ).pooler_output
        gallery_cpu = cpu_model.get_image_features(cpu_inputs["target_pixel_values"]).pooler_output
        gallery_dev = model.get_image_features(inputs["target_pixel_values"]).pooler_output
    model.train()
    out_plain, grads_plain = grads(model, inputs, checkpointing=False)
    out_ckpt, grads_ckpt = grads(model, inputs, checkpointing=True)
    out_bf16, grads_bf16 = grads(model, inputs, checkpointing=False, autocast_dtype=torch.bfloat16)
    ckpt_diff = max((grads_plain[n] - grads_ckpt[n]).abs().max().item() for n in grads_plain)
    result = {
        "composition": composition,
        "query_max_abs_diff_vs_cpu": (query_cpu - query_dev.cpu()).abs().max().item(),
        "gallery_max_abs_diff_vs_cpu": (gallery_cpu - gallery_dev.cpu()).abs().max().item(),
        "loss_fp32": out_plain.loss.item(),
        "loss_bf16_autocast": out_bf16.loss.item(),
        "bf16_grads_finite": all(torch.isfinite(g).all().item() for g in grads_bf16.values()),
        "bf16_grads_nonzero": sum(int(g.abs().sum().item() > 0) for g in grads_bf16.values()),
        "num_grads": len(grads_bf16),
        "checkpointing_grad_max_abs_diff": ckpt_diff,
        "loss_terms": sorted(out_bf16.loss_terms),
    }
    result["ok"] = (
        result["query_max_abs_diff_vs_cpu"] < 1e-4
        and result["gallery_max_abs_diff_vs_cpu"] < 1e-4
        and torch.isfinite(out_bf16.loss).item()
        and result["bf16_grads_finite"]
        and ckpt_diff < 1e-4
    )
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="Write the results to this JSON file.")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}")
    start = time.perf_counter()
    results = [check(composition, device) for composition in COMPOSITIONS]
    for r in results:
        print(
            f"{r['composition']:>17}: ok={r['ok']} query diff {r['query_max_abs_diff_vs_cpu']:.1e} "
            f"gallery diff {r['gallery_max_abs_diff_vs_cpu']:.1e} loss fp32 {r['loss_fp32']:.4f} "
            f"bf16 {r['loss_bf16_autocast']:.4f} nonzero grads {r['bf16_grads_nonzero']}/{r['num_grads']} "
            f"ckpt diff {r['checkpointing_grad_max_abs_diff']:.1e}"
        )
    summary = {"device": name, "torch": torch.__version__, "seconds": time.perf_counter() - start, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if not all(r["ok"] for r in results):
        print("FAILED: at least one composition did not match", file=sys.stderr)
        return 1
    print(f"all {len(results)} compositions ok in {summary['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
