"""Speed ratios of the MQIRTN model, every figure against a baseline measured in the same process.

Random weights, CPU, one torch thread. Baseline and candidate repeats alternate (B C, C B, B C, ...) and the ratios
use the medians; the clock is this process's CPU time (`--timer wall` for wall time; both are recorded), so time
spent descheduled by other users' processes on a shared machine counts for neither side. Items:

1. composed-query overhead: `get_query_features` time / (vision tower forward + text tower forward), paper size.
2. gallery embedding: `get_image_features` throughput / bare vision tower throughput, paper size.
3. training step (forward + backward + AdamW step, all four MQIRTN loss terms) / the same step with only the towers,
   the projections and a plain in-batch contrastive loss on the same triplets, at a small config; plus a
   torch.profiler breakdown grouped by module (towers, fusion, composition, symmetric pass, loss, optimizer).
4. soft-triplet loss: `MQIRTNSoftTripletLoss` (vectorised) vs a straightforward Python-loop reference, batch 32,
   forward + backward.
5. search at 1M x 512: measured by `benchmarks/search_speed.py`, not here.
6. peak memory of a training step (MQIRTN / towers-only baseline) and of holding and searching a 100k x 512
   `GalleryIndex`. torch's CPU allocator is invisible to tracemalloc, so the headline figures are peak live tensor
   bytes from torch.profiler's memory timeline (`profile_memory=True`); as a cross-check each measurement also runs
   in a fresh subprocess where peak = `VmHWM` (reset just before) after the work - resident set size before it (this includes what
   the C allocator keeps mapped and Python objects such as the index's ids).

Run from the repository root:

    nice -n 10 python benchmarks/speed.py            # paper-size items; ~5-10 minutes on 2 cores
    python benchmarks/speed.py --quick               # tiny sizes, seconds (smoke test)

Writes `benchmarks/results/speed.json` (`speed_quick.json` with `--quick`) and prints a compact table.
"""

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from transformers import BertConfig, ViTConfig  # noqa: E402
from transformers.utils import ModelOutput  # noqa: E402

from modeling_mqirtn import MQIRTNConfig, MQIRTNModel  # noqa: E402
from modeling_mqirtn.fusion_mqirtn import masked_mean  # noqa: E402
from modeling_mqirtn.losses_mqirtn import MQIRTNSoftTripletLoss  # noqa: E402
from modeling_mqirtn.modeling_mqirtn import tower_from_config  # noqa: E402

from machine_info import machine as machine_info  # noqa: E402
from machine_info import write_json  # noqa: E402


# ------------------------------------------------------------------------------------------------------ sizes
# paper: ViT-B/16 224 px + BERT-base, 32 tokens, projection_dim 512 (the paper setting, random weights).
# small: a ViT-Tiny-like 64 px / patch 8 tower (65 tokens) and a 12-layer, 192-wide BERT; projection_dim 128 keeps the
#        paper's fusion-width : tower-width ratio (2/3) and its 2 fusion layers against 12 tower layers.
# tiny: the test-suite towers (32 px, patch 8, hidden 32, 2 layers).
SIZES = {
    "paper": {
        "vision": {},
        "text": {},
        "mqirtn": {"projection_dim": 512, "fusion_num_heads": 8},
        "seq_len": 32,
    },
    "small": {
        "vision": {
            "image_size": 64,
            "patch_size": 8,
            "hidden_size": 192,
            "num_hidden_layers": 12,
            "num_attention_heads": 3,
            "intermediate_size": 768,
        },
        "text": {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768},
        "mqirtn": {"projection_dim": 128, "fusion_num_heads": 4},
        "seq_len": 32,
    },
    "tiny": {
        "vision": {
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
        "text": {
            "vocab_size": 100,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
        "mqirtn": {"projection_dim": 32, "fusion_num_heads": 4},
        "seq_len": 8,
    },
}


def tower_configs(size: str, attn_implementation: str = "sdpa") -> tuple[ViTConfig, BertConfig]:
    """The vision and text tower configs of `size` (one of `SIZES`)."""
    if size not in SIZES:
        raise ValueError(f"`size` must be one of {sorted(SIZES)}, got {size!r}")
    vision = ViTConfig(**SIZES[size]["vision"])
    text = BertConfig(**SIZES[size]["text"])
    for config in (vision, text):
        config._attn_implementation = attn_implementation
    return vision, text


def describe_size(size: str) -> str:
    vision, text = tower_configs(size)
    return (
        f"ViT {vision.image_size}px/patch {vision.patch_size} hidden {vision.hidden_size} x{vision.num_hidden_layers}"
        f" + BERT hidden {text.hidden_size} x{text.num_hidden_layers}, {SIZES[size]['seq_len']} tokens, "
        f"projection_dim {SIZES[size]['mqirtn']['projection_dim']}"
    )


def build_mqirtn(size: str, attn_implementation: str = "sdpa", **config_kwargs) -> MQIRTNModel:
    vision, text = tower_configs(size, attn_implementation)
    kwargs = {**SIZES[size]["mqirtn"], **config_kwargs}
    return MQIRTNModel(MQIRTNConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), **kwargs))


@dataclass
class ContrastiveOutput(ModelOutput):
    loss: torch.FloatTensor | None = None


class TowersContrastiveBaseline(nn.Module):
    """The towers-only baseline of a composed-retrieval training step.

    The same triplets through the same towers (reference and target images through the vision tower, the text through
    the text tower), the same projections, and a plain in-batch InfoNCE between the query
    `normalize(phi(x) + psi(t))` and the target `normalize(phi(y))`: what a VisionTextDualEncoder-like model costs on
    MQIRTN's inputs. Everything MQIRTN adds (fusion, composition, symmetric pass, decoders, loss terms) is absent.
    """

    def __init__(self, vision_config, text_config, projection_dim: int):
        super().__init__()
        self.vision_model = tower_from_config(vision_config)
        self.text_model = tower_from_config(text_config)
        self.image_projection = nn.Linear(vision_config.hidden_size, projection_dim)
        self.text_projection = nn.Linear(text_config.hidden_size, projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(4.0))

    def forward(self, pixel_values, input_ids, attention_mask, target_pixel_values, return_loss=True):
        reference = self.image_projection(self.vision_model(pixel_values=pixel_values).last_hidden_state[:, 0])
        text_states = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        text = self.text_projection(masked_mean(text_states, attention_mask))
        target = self.image_projection(self.vision_model(pixel_values=target_pixel_values).last_hidden_state[:, 0])
        query, target = F.normalize(reference + text, dim=-1), F.normalize(target, dim=-1)
        logits = self.logit_scale * query @ target.T
        return ContrastiveOutput(loss=F.cross_entropy(logits, torch.arange(len(logits), device=logits.device)))


def build_baseline(size: str, attn_implementation: str = "sdpa") -> TowersContrastiveBaseline:
    vision, text = tower_configs(size, attn_implementation)
    return TowersContrastiveBaseline(vision, text, SIZES[size]["mqirtn"]["projection_dim"])


def make_batch(size: str, batch_size: int, seq_len: int | None = None, device="cpu", seed: int = 0) -> dict:
    """Random triplets: pixel_values, input_ids, attention_mask (last quarter of the rows padded), target_pixel_values."""
    vision, text = tower_configs(size)
    seq_len = seq_len or SIZES[size]["seq_len"]
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, 3, vision.image_size, vision.image_size)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    attention_mask[: batch_size // 4, seq_len // 2 :] = 0
    batch = {
        "pixel_values": torch.randn(shape, generator=generator),
        "input_ids": torch.randint(0, text.vocab_size, (batch_size, seq_len), generator=generator),
        "attention_mask": attention_mask,
        "target_pixel_values": torch.randn(shape, generator=generator),
    }
    return {k: v.to(device) for k, v in batch.items()}


def training_step(model, optimizer, inputs: dict, autocast=None) -> torch.Tensor:
    """Forward (`return_loss=True`) + backward + optimizer step; returns the detached loss.

    `autocast`: a callable returning the context the forward pass runs in (e.g. bf16 autocast), or None.
    """
    with autocast() if autocast is not None else contextlib.nullcontext():
        loss = model(**inputs, return_loss=True).loss
    loss.backward()
    with torch.profiler.record_function("grp::optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# ------------------------------------------------------------------------------------------------------ timing
TIMERS = {"cpu": time.process_time, "wall": time.perf_counter}
TIMER = "cpu"  # set by main() from --timer


def interleaved(baseline, candidate, repeats: int, warmup: int = 1, inner: tuple[int, int] = (1, 1)) -> dict:
    """Times `baseline()` and `candidate()` alternately (B C, C B, ...); seconds per call, medians over repeats.

    Both this process's CPU time and wall time are recorded; `baseline_s`/`candidate_s` use `TIMER`. With one torch
    thread, CPU time leaves out the time other users' processes hold the core, which wall time on a shared machine
    cannot. `inner` calls per timed repeat of (baseline, candidate), for functions far shorter than a timer tick.
    """
    for _ in range(warmup):
        baseline()
        candidate()
    times = {(name, timer): [] for name in ("baseline", "candidate") for timer in TIMERS}
    for repeat in range(repeats):
        order = [("baseline", baseline, inner[0]), ("candidate", candidate, inner[1])]
        for name, fn, calls in order if repeat % 2 == 0 else order[::-1]:
            start = {timer: clock() for timer, clock in TIMERS.items()}
            for _ in range(calls):
                fn()
            for timer, clock in TIMERS.items():
                times[name, timer].append((clock() - start[timer]) / calls)
    result = {"timer": TIMER, "repeats": repeats}
    for timer in TIMERS:
        base, cand = times["baseline", timer], times["candidate", timer]
        suffix = "" if timer == TIMER else f"_{timer}"
        result.update(
            {
                f"baseline_s{suffix}": statistics.median(base),
                f"candidate_s{suffix}": statistics.median(cand),
                f"paired_ratio_median{suffix}": statistics.median(c / b for b, c in zip(base, cand)),
                f"min_ratio{suffix}": min(cand) / min(base),
                f"baseline_samples_s_{timer}": base,
                f"candidate_samples_s_{timer}": cand,
            }
        )
    return result


def _verdict(ratio: float, target: str) -> bool:
    op, value = target.split()
    return ratio <= float(value) if op == "<=" else ratio >= float(value)


# ------------------------------------------------------------------------------------------------------ 1, 2
def bench_query_overhead(model, size: str, batch_size: int, repeats: int) -> dict:
    inputs = make_batch(size, batch_size)

    def towers():
        model.vision_model(pixel_values=inputs["pixel_values"])
        model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])

    def query():
        model.get_query_features(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])

    with torch.inference_mode():
        timing = interleaved(towers, query, repeats)
    ratio = timing["candidate_s"] / timing["baseline_s"]
    target = "<= 1.15"
    return {
        "ratio": ratio,
        "target": target,
        "met": _verdict(ratio, target),
        "batch_size": batch_size,
        "sizes": describe_size(size),
        "what": "get_query_features time / (vision tower + text tower forward)",
        **timing,
    }


def bench_gallery_throughput(model, size: str, batch_size: int, repeats: int) -> dict:
    pixel_values = make_batch(size, batch_size)["pixel_values"]
    with torch.inference_mode():
        timing = interleaved(
            lambda: model.vision_model(pixel_values=pixel_values),
            lambda: model.get_image_features(pixel_values),
            repeats,
        )
    ratio = timing["baseline_s"] / timing["candidate_s"]  # throughput ratio
    target = ">= 0.95"
    return {
        "ratio": ratio,
        "target": target,
        "met": _verdict(ratio, target),
        "batch_size": batch_size,
        "sizes": describe_size(size),
        "what": "get_image_features images/s / bare vision tower images/s",
        "images_per_s": batch_size / timing["candidate_s"],
        **timing,
    }


# ------------------------------------------------------------------------------------------------------ 3
class _Labels:
    """Opens `grp::<label>` profiler ranges around modules and methods, for the per-module profile summary."""

    def __init__(self):
        self.handles, self.patched = [], []

    def module(self, module, label: str):
        stack = []

        def enter(*_):
            stack.append(torch.profiler.record_function(f"grp::{label}"))
            stack[-1].__enter__()

        def leave(*_):
            stack.pop().__exit__(None, None, None)

        self.handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def method(self, obj, name: str, choose_label):
        original = getattr(obj, name)

        def wrapped(*args, **kwargs):
            label = choose_label(*args, **kwargs)
            if label is None:
                return original(*args, **kwargs)
            with torch.profiler.record_function(f"grp::{label}"):
                return original(*args, **kwargs)

        setattr(obj, name, wrapped)
        self.patched.append((obj, name))

    def remove(self):
        for handle in self.handles:
            handle.remove()
        for obj, name in self.patched:
            delattr(obj, name)


def _label_model(model) -> _Labels:
    labels = _Labels()
    for name, label in [
        ("vision_model", "towers"),
        ("text_model", "towers"),
        ("image_projection", "projections"),
        ("text_projection", "projections"),
        ("fusion", "fusion"),
        ("composition", "composition"),
        ("image_residual", "composition"),
        ("image_decoder", "loss"),
        ("text_decoder", "loss"),
        ("metric_loss", "loss"),
    ]:
        if getattr(model, name, None) is not None:
            labels.module(getattr(model, name), label)
    if isinstance(model, MQIRTNModel):
        # The symmetric pass is the second `_compose` call (conjugate rotation, sign -1) made from `_loss`.
        labels.method(
            model,
            "_compose",
            lambda *a, **k: "symmetric pass" if (a[5] if len(a) > 5 else k.get("sign", 1.0)) < 0 else None,
        )
        labels.method(model, "_loss", lambda *a, **k: "loss")
    return labels


def profile_groups(model, optimizer, inputs) -> dict:
    """Milliseconds per module group of one profiled training step, forward and backward separately.

    Every profiler event's self time goes to the nearest enclosing `grp::` range (the symmetric pass wins over the
    fusion/composition ranges nested in it); backward ops go to the group of the forward op that made their autograd
    node (matched by sequence number). Profiling inflates small ops, so read shares, not absolute times.
    """
    labels = _label_model(model)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            training_step(model, optimizer, inputs)
    finally:
        labels.remove()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)

    def classify(event):
        labels_seen, node = [], event
        while node is not None:
            if node.name.startswith("autograd::engine::evaluate_function"):
                return "backward", node.sequence_nr
            if node.name.startswith("grp::"):
                labels_seen.append(node.name[5:])
            node = node.cpu_parent
        if "symmetric pass" in labels_seen:
            return "forward", "symmetric pass"
        return "forward", labels_seen[0] if labels_seen else "other"

    classified = [(event, *classify(event)) for event in events]
    forward_group_of_seq = {}
    for event, kind, group in classified:
        if kind == "forward" and event.sequence_nr >= 0:
            forward_group_of_seq.setdefault(event.sequence_nr, group)
    totals = defaultdict(lambda: {"forward_ms": 0.0, "backward_ms": 0.0})
    for event, kind, group in classified:
        if kind == "backward":
            totals[forward_group_of_seq.get(group, "other")]["backward_ms"] += event.self_cpu_time_total / 1e3
        elif group == "optimizer":
            totals["optimizer"]["forward_ms"] += event.self_cpu_time_total / 1e3
        else:
            totals[group]["forward_ms"] += event.self_cpu_time_total / 1e3
    step_ms = sum(v["forward_ms"] + v["backward_ms"] for v in totals.values())
    return {
        group: {
            **{k: round(v, 2) for k, v in ms.items()},
            "share": round((ms["forward_ms"] + ms["backward_ms"]) / step_ms, 4),
        }
        for group, ms in sorted(totals.items(), key=lambda kv: -(kv[1]["forward_ms"] + kv[1]["backward_ms"]))
    }


def _profile_total_ms(groups: dict) -> float:
    return sum(v["forward_ms"] + v["backward_ms"] for v in groups.values())


def bench_train_step(size: str, batch_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    mqirtn, baseline = build_mqirtn(size).train(), build_baseline(size).train()
    inputs = make_batch(size, batch_size)
    optimizers = {
        name: torch.optim.AdamW(model.parameters(), lr=1e-4)
        for name, model in [("mqirtn", mqirtn), ("baseline", baseline)]
    }
    timing = interleaved(
        lambda: training_step(baseline, optimizers["baseline"], inputs),
        lambda: training_step(mqirtn, optimizers["mqirtn"], inputs),
        repeats,
    )
    # Profile each step twice, alternately, and keep the faster one (the one less disturbed by other processes).
    profiles = {"mqirtn": [], "baseline": []}
    for _ in range(2):
        for name, model in (("mqirtn", mqirtn), ("baseline", baseline)):
            profiles[name].append(profile_groups(model, optimizers[name], inputs))
    profile = {name: min(runs, key=_profile_total_ms) for name, runs in profiles.items()}
    ratio = timing["candidate_s"] / timing["baseline_s"]
    target = "<= 1.30"
    extra = {}
    for group in set(profile["mqirtn"]) | set(profile["baseline"]):
        ms = [sum(v for k, v in profile[m].get(group, {}).items() if k != "share") for m in ("mqirtn", "baseline")]
        extra[group] = round(ms[0] - ms[1], 2)
    return {
        "ratio": ratio,
        "target": target,
        "met": _verdict(ratio, target),
        "batch_size": batch_size,
        "sizes": describe_size(size),
        "what": "MQIRTN step (4 loss terms) / towers + projections + InfoNCE step on the same triplets",
        "parameters": {
            "mqirtn": sum(p.numel() for p in mqirtn.parameters()),
            "baseline": sum(p.numel() for p in baseline.parameters()),
        },
        "profile_ms": profile,
        "extra_ms_over_baseline": dict(sorted(extra.items(), key=lambda kv: -kv[1])),
        **timing,
    }


# ------------------------------------------------------------------------------------------------------ 4
def soft_triplet_loop(query_embeds, target_embeds, scale):
    """Straightforward reference, TIRG's form: mean over (i, j != i) of softplus(||r q_i - r t_i||^2 - ||r q_i - r t_j||^2)
    with TIRG's per-vector scale r = sqrt(s) (the package's one logit scale s plays the role of r^2)."""
    root = scale.sqrt() if isinstance(scale, torch.Tensor) else scale**0.5
    total, count = 0.0, 0
    for i in range(len(query_embeds)):
        anchor = root * query_embeds[i]
        positive = ((anchor - root * target_embeds[i]) ** 2).sum()
        for j in range(len(target_embeds)):
            if j == i:
                continue
            negative = ((anchor - root * target_embeds[j]) ** 2).sum()
            total = total + F.softplus(positive - negative)
            count += 1
    return total / count


def bench_soft_triplet(batch_size: int, dim: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(batch_size, dim, generator=generator), dim=-1).requires_grad_()
    target = F.normalize(torch.randn(batch_size, dim, generator=generator), dim=-1).requires_grad_()
    scale = torch.tensor(4.0, requires_grad=True)
    loss_fn = MQIRTNSoftTripletLoss()
    vectorised_value = loss_fn(query, target, scale).item()
    loop_value = soft_triplet_loop(query, target, scale).item()

    def run(fn):
        def step():
            fn(query, target, scale).backward()
            query.grad = target.grad = scale.grad = None

        return step

    # The vectorised call takes well under a millisecond: 100 calls per timed repeat.
    timing = interleaved(run(soft_triplet_loop), run(loss_fn), 2 * repeats, inner=(1, 100))
    speedup = timing["baseline_s"] / timing["candidate_s"]
    target_text = ">= 100"
    return {
        "ratio": speedup,
        "target": target_text,
        "met": _verdict(speedup, target_text),
        "batch_size": batch_size,
        "sizes": f"embeddings {batch_size} x {dim}, forward + backward",
        "what": "Python-loop reference time / MQIRTNSoftTripletLoss time",
        "same_value": abs(vectorised_value - loop_value) < 1e-4 * max(1.0, abs(loop_value)),
        "vectorised_value": vectorised_value,
        "loop_value": loop_value,
        **timing,
    }


# ------------------------------------------------------------------------------------------------------ 6
def _current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """Peak resident set size of this process's address space (`VmHWM`).

    Not `ru_maxrss`: Linux carries that over from the parent across fork + exec, so a child of a large process
    reports the parent's size.
    """
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def _reset_peak_rss() -> None:
    """Resets `VmHWM` to the current RSS, so the peak measured next belongs to the work that follows."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:  # not permitted here: the peak then also covers the set-up, an upper bound
        pass


GALLERY_QUERIES, GALLERY_TOP_K = 1000, 10


def build_gallery_index(gallery_size: int, dim: int):
    """The package's own index (`GalleryIndex`, exact backend) over random L2-normalised embeddings, one id each."""
    from mqirtn_app.index import GalleryIndex

    embeddings = F.normalize(torch.randn(gallery_size, dim), dim=-1)
    return GalleryIndex(embeddings, [f"image-{i}" for i in range(gallery_size)], backend="exact")


def memory_child(mode: str, size: str, batch_size: int, gallery_size: int, dim: int) -> dict:
    """Runs in a fresh process: bytes of resident memory the work adds at its peak (see the module docstring)."""
    torch.manual_seed(0)
    if mode == "gallery":
        queries = F.normalize(torch.randn(GALLERY_QUERIES, dim), dim=-1)
        # A first search on a tiny index maps the kernels' code pages, which would otherwise count as the search's.
        build_gallery_index(100, dim).search(queries[:10], top_k=GALLERY_TOP_K)
        gc.collect()
        before = _current_rss()
        _reset_peak_rss()
        index = build_gallery_index(gallery_size, dim)
        held = _current_rss() - before
        index.search(queries, top_k=GALLERY_TOP_K)
        return {
            "raw_bytes": gallery_size * dim * 4,
            "held_bytes": held,
            "search_peak_bytes": _peak_rss() - before,
            "queries": GALLERY_QUERIES,
            "k": GALLERY_TOP_K,
        }
    build = build_mqirtn if mode == "train-mqirtn" else build_baseline
    # One step of the tiny model first maps the kernels' code pages (hundreds of MiB of RSS that are not the step's).
    tiny = build("tiny").train()
    training_step(tiny, torch.optim.AdamW(tiny.parameters(), lr=1e-4), make_batch("tiny", 2))
    del tiny
    model = build(size).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = make_batch(size, batch_size)
    gc.collect()
    before = _current_rss()
    _reset_peak_rss()
    for _ in range(2):  # the first step also allocates the AdamW state
        training_step(model, optimizer, inputs)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"step_peak_bytes": _peak_rss() - before, "parameter_bytes": parameter_bytes}


def run_memory_children(modes, size: str, batch_size: int, gallery_size: int, dim: int) -> list[dict]:
    """One fresh subprocess per mode, run side by side (each measures only its own resident memory)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    children = [
        subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--memory-child",
                mode,
                "--memory-size",
                size,
                "--memory-batch-size",
                str(batch_size),
                "--gallery-size",
                str(gallery_size),
                "--gallery-dim",
                str(dim),
                "--threads",
                str(torch.get_num_threads()),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for mode in modes
    ]
    results = []
    for mode, child in zip(modes, children):
        stdout, stderr = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"memory measurement {mode!r} failed:\n{stderr[-3000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


# Categories of torch.profiler's memory timeline, in its export order (after a leading unused slot).
MEMORY_CATEGORIES = (
    "parameter",
    "optimizer_state",
    "input",
    "temporary",
    "activation",
    "gradient",
    "autograd_detail",
    "unknown",
)


def tensor_memory_peak(fn) -> dict:
    """Peak bytes of live CPU tensors while `fn()` runs, by category, from torch.profiler's memory timeline.

    Counts every tensor the profiled ops touch (parameters and other pre-existing tensors included), independent of
    what the C allocator keeps mapped; this is what a GPU would have to hold, minus its allocator's caching.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(
        activities=activities, profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of a CUDA-only API
        path = Path(folder) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    totals = [sum(row) for row in sizes]
    peak = max(range(len(totals)), key=totals.__getitem__)
    return {"peak_bytes": totals[peak], "by_category_bytes": dict(zip(MEMORY_CATEGORIES, sizes[peak][1:]))}


def bench_memory(size: str, batch_size: int, gallery_size: int, dim: int, rss: bool = True) -> dict:
    mib = 2**20
    rss_mqirtn = rss_baseline = rss_gallery = None
    if rss:  # allocator-level cross-check in fresh subprocesses (side by side, while this process idles)
        rss_mqirtn, rss_baseline, rss_gallery = run_memory_children(
            ["train-mqirtn", "train-baseline", "gallery"], size, batch_size, gallery_size, dim
        )
    peaks = {}
    for name, build in (("mqirtn", build_mqirtn), ("baseline", build_baseline)):
        torch.manual_seed(0)
        model = build(size).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        inputs = make_batch(size, batch_size)
        training_step(model, optimizer, inputs)  # creates the AdamW state, which the profiled step then holds
        peaks[name] = tensor_memory_peak(
            lambda model=model, optimizer=optimizer: training_step(model, optimizer, inputs)
        )
        del model, optimizer
        gc.collect()
    index = build_gallery_index(gallery_size, dim)
    queries = F.normalize(torch.randn(GALLERY_QUERIES, dim), dim=-1)
    search = tensor_memory_peak(lambda: index.search(queries, top_k=GALLERY_TOP_K))
    raw = index.embeddings.numel() * index.embeddings.element_size()
    result = {
        "train_step": {
            "ratio": peaks["mqirtn"]["peak_bytes"] / peaks["baseline"]["peak_bytes"],
            "what": "peak live tensor bytes of an AdamW step after a first one (parameters + optimizer state + "
            "activations + gradients): MQIRTN / towers-only baseline, from torch.profiler's memory timeline",
            "batch_size": batch_size,
            "sizes": describe_size(size),
            "mqirtn_peak_mib": peaks["mqirtn"]["peak_bytes"] / mib,
            "baseline_peak_mib": peaks["baseline"]["peak_bytes"] / mib,
            "mqirtn_at_peak_mib": {k: round(v / mib, 1) for k, v in peaks["mqirtn"]["by_category_bytes"].items()},
            "baseline_at_peak_mib": {k: round(v / mib, 1) for k, v in peaks["baseline"]["by_category_bytes"].items()},
        },
        "gallery": {
            "search_ratio": search["peak_bytes"] / raw,
            "what": f"peak live tensor bytes while searching a GalleryIndex (exact backend: {GALLERY_QUERIES} queries, "
            f"top-{GALLERY_TOP_K}, 1024 queries x 65536 rows of scores at a time) / raw float32 gallery bytes",
            "sizes": f"{gallery_size} x {dim} float32",
            "raw_mib": raw / mib,
            "search_peak_mib": search["peak_bytes"] / mib,
        },
    }
    if rss:
        result["train_step"].update(
            {
                "rss_ratio": rss_mqirtn["step_peak_bytes"] / rss_baseline["step_peak_bytes"],
                "rss_what": "peak RSS (VmHWM) minus RSS before 2 steps, fresh subprocess each: includes what glibc "
                "malloc keeps mapped, so noisier than the tensor figures",
                "mqirtn_rss_step_peak_mib": rss_mqirtn["step_peak_bytes"] / mib,
                "baseline_rss_step_peak_mib": rss_baseline["step_peak_bytes"] / mib,
            }
        )
        result["gallery"].update(
            {
                "held_rss_ratio": rss_gallery["held_bytes"] / rss_gallery["raw_bytes"],
                "held_rss_mib": rss_gallery["held_bytes"] / mib,
                "search_rss_peak_mib": rss_gallery["search_peak_bytes"] / mib,
                "search_rss_ratio": rss_gallery["search_peak_bytes"] / rss_gallery["raw_bytes"],
            }
        )
    return result


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (smoke test, seconds)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per side (default 7; 2 with --quick)")
    parser.add_argument("--query-batch-size", type=int, default=8)
    parser.add_argument("--train-batch-size", type=int, default=16)
    parser.add_argument("--triplet-batch-size", type=int, default=32)
    parser.add_argument("--gallery-size", type=int, default=None, help="default 100000 (1000 with --quick)")
    parser.add_argument("--items", default="1,2,3,4,6", help="comma-separated items to run (of 1,2,3,4,6)")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/speed.json, speed_quick.json with --quick)",
    )
    parser.add_argument("--no-nice", action="store_true", help="do not lower this process's priority")
    parser.add_argument(
        "--timer",
        choices=sorted(TIMERS),
        default="cpu",
        help="clock of the headline ratios: this process's CPU time (default; immune to time spent "
        "descheduled on a shared machine) or wall time (both are recorded)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on shared cores a descheduled OpenMP thread stalls every "
        "parallel op, which makes multi-threaded timings far noisier than single-threaded ones)",
    )
    # Internal: one memory measurement in a fresh process.
    parser.add_argument(
        "--memory-child", choices=["train-mqirtn", "train-baseline", "gallery"], help=argparse.SUPPRESS
    )
    parser.add_argument("--memory-size", default="small", help=argparse.SUPPRESS)
    parser.add_argument("--memory-batch-size", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--gallery-dim", type=int, default=512, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    if args.gallery_size is None:
        args.gallery_size = 1000 if args.quick else 100_000
    for name in ("threads", "repeats", "query_batch_size", "train_batch_size", "triplet_batch_size", "gallery_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be a positive integer, got {getattr(args, name)}")
    items = {item.strip() for item in args.items.split(",") if item.strip()}
    if not items or not items <= {"1", "2", "3", "4", "6"}:
        raise ValueError(f"`--items` must be a comma-separated subset of 1,2,3,4,6, got {args.items!r}")
    args.items = items
    return args


def machine() -> dict:
    return {**machine_info(), "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    global TIMER
    TIMER = args.timer
    if args.memory_child:
        print(
            json.dumps(
                memory_child(
                    args.memory_child, args.memory_size, args.memory_batch_size, args.gallery_size, args.gallery_dim
                )
            )
        )
        return None
    if not args.no_nice and os.nice(0) < 10:
        os.nice(10 - os.nice(0))  # niceness 10, whether or not the command line already said `nice`
    transformers.logging.set_verbosity_error()
    paper, small = ("tiny", "tiny") if args.quick else ("paper", "small")
    triplet_batch = 8 if args.quick else args.triplet_batch_size
    gallery_dim = SIZES[paper]["mqirtn"]["projection_dim"] if args.quick else 512
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "machine": machine(),
        "results": {},
    }
    results = report["results"]
    started = time.perf_counter()
    report["timer"] = args.timer
    print(
        f"machine: {report['machine']['cpu']}, {report['machine']['torch_threads']} torch threads; "
        f"repeats {args.repeats} per side, alternating; {args.timer} time"
    )

    def show(key, label):
        r = results[key]
        print(
            f"[{key}] {label}: ratio {r['ratio']:.3f} (target {r['target']}: {'met' if r['met'] else 'MISSED'}); "
            f"batch {r['batch_size']}; {r['sizes']}; baseline {r['baseline_s'] * 1e3:.1f} ms, "
            f"candidate {r['candidate_s'] * 1e3:.2f} ms  [{time.perf_counter() - started:.0f} s]",
            flush=True,
        )

    if {"1", "2"} & args.items:
        torch.manual_seed(0)
        model = build_mqirtn(paper).eval()
        if "1" in args.items:
            results["query_overhead"] = bench_query_overhead(model, paper, args.query_batch_size, args.repeats)
            show("query_overhead", "1. composed query / towers")
        if "2" in args.items:
            results["gallery_throughput"] = bench_gallery_throughput(model, paper, args.query_batch_size, args.repeats)
            show("gallery_throughput", "2. gallery embedding / vision tower throughput")
        del model
        gc.collect()
    if "3" in args.items:
        results["train_step"] = bench_train_step(small, args.train_batch_size if not args.quick else 4, args.repeats)
        show("train_step", "3. MQIRTN training step / towers-only contrastive step")
        print(
            "   profile (ms, forward+backward) MQIRTN: "
            + ", ".join(
                f"{g} {v['forward_ms'] + v['backward_ms']:.0f} ({v['share']:.0%})"
                for g, v in results["train_step"]["profile_ms"]["mqirtn"].items()
            )
        )
        print(
            "   profile (ms, forward+backward) baseline: "
            + ", ".join(
                f"{g} {v['forward_ms'] + v['backward_ms']:.0f} ({v['share']:.0%})"
                for g, v in results["train_step"]["profile_ms"]["baseline"].items()
            )
        )
        print(
            "   extra over baseline (ms): "
            + ", ".join(f"{g} {v:+.0f}" for g, v in results["train_step"]["extra_ms_over_baseline"].items())
        )
    if "4" in args.items:
        results["soft_triplet"] = bench_soft_triplet(triplet_batch, gallery_dim, args.repeats)
        show("soft_triplet", "4. soft-triplet loss speed-up over a Python loop")
    results["search_1m"] = {"see": "benchmarks/search_speed.py"}
    if "6" in args.items:
        memory = bench_memory(
            small, args.train_batch_size if not args.quick else 4, args.gallery_size, gallery_dim, rss=not args.quick
        )
        results["memory"] = memory
        m, g = memory["train_step"], memory["gallery"]
        rss = (
            f" (RSS: {m['mqirtn_rss_step_peak_mib']:.0f} / {m['baseline_rss_step_peak_mib']:.0f} MiB = "
            f"{m['rss_ratio']:.2f})"
            if "rss_ratio" in m
            else ""
        )
        print(
            f"[memory] 6. training step peak tensors: MQIRTN {m['mqirtn_peak_mib']:.0f} MiB / baseline "
            f"{m['baseline_peak_mib']:.0f} MiB = {m['ratio']:.2f}{rss}; batch {m['batch_size']}; {m['sizes']}"
        )
        rss = (
            f"; RSS held {g['held_rss_ratio']:.2f}x, search {g['search_rss_ratio']:.2f}x raw"
            if "held_rss_ratio" in g
            else ""
        )
        print(
            f"[memory] 6. gallery {g['sizes']} ({g['raw_mib']:.1f} MiB): search peak tensors "
            f"{g['search_peak_mib']:.1f} MiB = {g['search_ratio']:.2f}x raw{rss}"
        )
    report["total_s"] = time.perf_counter() - started
    output = args.output or REPO_ROOT / "benchmarks" / "results" / ("speed_quick.json" if args.quick else "speed.json")
    write_json(output, report)
    print(f"wrote {output} in {report['total_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
