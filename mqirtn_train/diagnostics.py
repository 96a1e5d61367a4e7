"""What MQIRTN's composition does during training, logged and written to `eval_results.json`:

- `composition_step_stats` / `composition_diagnostics`: what MQIRTN's composition does (rotation angles, the norm
  shares of the query's terms, what the conjugate changes in the symmetric constraint, each loss term's share of the
  gradient), logged during training and written to `eval_results.json`.
"""

from __future__ import annotations

import copy
import math

import torch
from torch.utils.data import DataLoader


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
    shared = [
        p
        for n, p in probe.named_parameters()
        if p.requires_grad and not n.startswith(("image_decoder.", "text_decoder."))
    ]
    sums: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        for batch in batches:
            outputs = probe(**batch, return_loss=True, output_composition=True)
            values = {k: v.item() for k, v in composition_step_stats(outputs).items()}
            values.update({f"loss_{k}": v.item() for k, v in outputs.loss_terms.items()})
            if outputs.symmetric_diagnostics is not None:
                for control in ("same_rotation", "zero_rotation", "shuffled_rotation"):
                    values[f"loss_symmetric_{control}"] = outputs.symmetric_diagnostics[f"loss_{control}"].item()
                values["back_query_cosine_conjugate_vs_same"] = (
                    outputs.symmetric_diagnostics["back_query_cosine"].mean().item()
                )
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


__all__ = ["composition_diagnostics", "composition_step_stats", "diagnostic_batches"]
