"""Training-time tools of train.py (never shipped to the Hub): the frozen-tower cache and the composition diagnostics.

- `FrozenTowerCache`: a frozen text tower's token states computed once per distinct text and reused;
- `composition_step_stats` / `composition_diagnostics`: what MQIRTN's composition does (rotation angles, the norm
  shares of the query's terms, what the conjugate changes in the symmetric constraint, each loss term's share of the
  gradient), logged during training and written to `eval_results.json`.
"""

from __future__ import annotations

import copy
import math

import torch
from torch.utils.data import DataLoader
from transformers.modeling_outputs import BaseModelOutput


class FrozenTowerCache:
    """Token states of a frozen text tower, computed once per distinct text (its unpadded token ids) and reused.

    Installed over the tower's `forward` (the state dict and `save_pretrained` are untouched). Rows already seen are
    read from the cache; the others run through the tower as one sub-batch. Padding positions come back as zeros: every
    consumer (masked mean, the fusion's key-padding mask) ignores them, so queries equal the uncached ones up to float
    rounding. Only for a tower whose parameters are all frozen; at most `max_entries` texts are kept (oldest dropped).
    """

    def __init__(self, tower, max_entries: int = 500_000):
        if any(p.requires_grad for p in tower.parameters()):
            raise ValueError("FrozenTowerCache needs a frozen tower (its parameters must not require gradients)")
        self.tower, self.max_entries = tower, max_entries
        self.uncached_forward = tower.forward
        self.entries: dict[tuple[int, ...], torch.Tensor] = {}
        self.hits = self.misses = 0
        tower.forward = self.forward

    def __deepcopy__(self, memo):
        # A copy of the model (composition_diagnostics) shares the entries: its frozen tower gives the same states.
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.tower = copy.deepcopy(self.tower, memo)
        clone.uncached_forward = copy.deepcopy(self.uncached_forward, memo)
        clone.entries, clone.max_entries, clone.hits, clone.misses = self.entries, self.max_entries, 0, 0
        return clone

    @torch.no_grad()
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if input_ids is None or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return self.uncached_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = attention_mask.sum(dim=1).tolist()
        keys = [tuple(row[:length]) for row, length in zip(input_ids.tolist(), lengths)]
        missing = sorted({key for key in keys if key not in self.entries}, key=keys.index)
        if missing:
            width = max(len(key) for key in missing)
            ids = input_ids.new_zeros(len(missing), width)
            mask = attention_mask.new_zeros(len(missing), width)
            for row, key in enumerate(missing):
                ids[row, : len(key)] = torch.tensor(key, dtype=ids.dtype)
                mask[row, : len(key)] = 1
            states = self.uncached_forward(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state
            for row, key in enumerate(missing):
                self.entries[key] = states[row, : len(key)]
            while len(self.entries) > self.max_entries:
                self.entries.pop(next(iter(self.entries)))
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        first = self.entries[keys[0]]
        out = first.new_zeros(input_ids.shape[0], input_ids.shape[1], first.shape[-1])
        for row, key in enumerate(keys):
            out[row, : len(key)] = self.entries[key]
        return BaseModelOutput(last_hidden_state=out)


LOSS_WEIGHT_FIELDS = {
    "base": "base_loss_weight",
    "symmetric": "symmetric_loss_weight",
    "reconstruction_image": "reconstruction_image_loss_weight",
    "reconstruction_text": "reconstruction_text_loss_weight",
}


def composition_step_stats(outputs) -> dict[str, torch.Tensor]:
    """What the composition does in one batch (on the device, no host sync): the angles' rms, share of |delta| > pi/4
    and spread across the batch's texts, and the composition term's share of the two query terms' norms (composition
    vs image residual)."""
    stats = {}
    if outputs.composition_angles is not None:
        angles = outputs.composition_angles.detach().float()
        stats["angle_rms"] = angles.pow(2).mean().sqrt()
        stats["angle_share_over_quarter_pi"] = (angles.abs() > math.pi / 4).float().mean()
        # How much a dimension's angle changes from text to text: the text's information carried by the rotation. The
        # rms and the share over pi/4 are partly fixed by construction (a LayerNorm on the angles sets their rms to 1);
        # the spread and the text-dependent share of the angles' mean square (variance across the batch's texts per
        # dimension, over the mean square; the rest is a per-dimension offset every text shares) are not.
        stats["angle_spread_across_texts"] = angles.std(dim=0).mean()
        stats["angle_text_share"] = angles.var(dim=0, unbiased=False).mean() / angles.pow(2).mean().clamp(min=1e-12)
    if outputs.image_residual_norms is not None:
        composed, residual = outputs.composition_norms.detach(), outputs.image_residual_norms.detach()
        stats["composition_norm_share"] = (composed / (composed + residual).clamp(min=1e-12)).mean()
    return stats


def composition_diagnostics(model, batches: list[dict], frozen_towers: tuple[str, ...] = ()) -> dict[str, float]:
    """The paper's mechanisms measured on fixed training batches, for the logs and eval_results.json.

    On a copy of the model in training mode (the run's model, its BatchNorm statistics and the random state are left
    untouched): angle statistics and norm shares (`composition_step_stats`), the symmetric loss with the conjugate
    and with its controls (the same rotation, none, another query's conjugate; see `MQIRTNOutput.symmetric_diagnostics`)
    and the cosine between the conjugate's and the same rotation's back-queries, and each weighted loss term's share of the
    gradient norm on the parameters the terms share (the decoders, trained by reconstruction alone, left out).
    """
    probe = copy.deepcopy(model)
    probe.train()
    for name in frozen_towers:  # frozen towers stay in eval mode, as in training
        getattr(probe, name).eval()
    shared = [p for n, p in probe.named_parameters() if p.requires_grad and not n.startswith(("image_decoder.", "text_decoder."))]
    sums: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        for batch in batches:
            outputs = probe(**batch, return_loss=True, output_composition=True)
            values = {k: v.item() for k, v in composition_step_stats(outputs).items()}
            values.update({f"loss_{k}": v.item() for k, v in outputs.loss_terms.items()})
            if outputs.symmetric_diagnostics is not None:
                for control in ("same_rotation", "zero_rotation", "shuffled_rotation"):
                    values[f"loss_symmetric_{control}"] = outputs.symmetric_diagnostics[f"loss_{control}"].item()
                values["back_query_cosine_conjugate_vs_same"] = outputs.symmetric_diagnostics["back_query_cosine"].mean().item()
            norms = {}
            for name, term in outputs.loss_terms.items():
                weight = float(getattr(probe.config, LOSS_WEIGHT_FIELDS[name]))
                grads = torch.autograd.grad(weight * term, shared, retain_graph=True, allow_unused=True)
                norms[name] = math.sqrt(sum(g.float().pow(2).sum().item() for g in grads if g is not None))
            total = sum(norms.values()) or 1.0
            values.update({f"grad_share_{name}": norm / total for name, norm in norms.items()})
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
    return {key: round(value / len(batches), 6) for key, value in sums.items()}


def diagnostic_batches(dataset, collator, batch_size: int, seed: int, device, count: int = 4) -> list[dict]:
    """`count` fixed training batches (the first of a shuffle seeded with `seed`), on `device`."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collator)
    batches = []
    for batch in loader:
        if len(batches) == count:
            break
        batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    return batches


__all__ = ["FrozenTowerCache", "composition_diagnostics", "composition_step_stats", "diagnostic_batches"]
