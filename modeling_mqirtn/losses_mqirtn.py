"""Deep-metric-learning losses between composed queries and target images (MQIRTN section 1.6).

One base class (`get_logits`, `get_labels`, `forward`); the variants override `compute`. In-batch negatives are
gathered from every process with a differentiable all-gather when `torch.distributed` runs more than one process.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates `tensor` (B, ...) from every process along dim 0, keeping the autograd graph.

    `accelerator.gather` passes no gradient back to the other processes' embeddings; this does (its backward is a
    reduce-scatter), so one step on N processes equals one step on the concatenated batch. Batches must be the
    same size on every process (Accelerate's `even_batches=True`, the default).
    """
    _, world_size = _world()
    if world_size == 1:
        return tensor
    from torch.distributed import _functional_collectives as collectives

    # torch >= 2.10 names it `all_gather_single_autograd`; the older name still works but warns.
    all_gather = getattr(collectives, "all_gather_single_autograd", None) or collectives.all_gather_tensor_autograd
    return all_gather(tensor.contiguous(), gather_dim=0, group=dist.group.WORLD)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates `tensor` (B, ...) from every process along dim 0 (no gradient: for ids and fingerprints)."""
    _, world_size = _world()
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def image_fingerprints(pixel_values: torch.Tensor) -> torch.Tensor:
    """An int64 hash per image (B,): equal for identical images, so duplicates can be masked out of the negatives.

    Integer arithmetic wraps the same way whatever the summation order, so identical inputs hash identically on
    every device and process.
    """
    flat = (pixel_values.detach().flatten(1).float() * 1024).round().to(torch.int64)
    return (flat * _fingerprint_weights(flat.shape[1], flat.device)).sum(dim=1)


_FINGERPRINT_WEIGHTS: dict = {}


def _fingerprint_weights(size: int, device: torch.device) -> torch.Tensor:
    """Fixed pseudo-random int64 weights, made once per (size, device): no host-to-device copy on every step."""
    key = (size, str(device))
    if key not in _FINGERPRINT_WEIGHTS:
        generator = torch.Generator().manual_seed(0x5EED)
        weights = torch.randint(1, 2**31 - 1, (size,), generator=generator, dtype=torch.int64)
        _FINGERPRINT_WEIGHTS[key] = weights.to(device)
    return _FINGERPRINT_WEIGHTS[key]


class MQIRTNMetricLoss(nn.Module):
    """Base class: local queries (B, d) against the targets of every process (W*B, d), both L2-normalised.

    `forward(query_embeds, target_embeds, scale, target_ids=None)` returns a scalar. `target_ids` (B,) int64 marks
    identical targets: a copy of a query's own target is neither a positive nor a negative for it.
    """

    def get_logits(self, query_embeds, target_embeds, scale):
        all_targets = gather_with_grad(target_embeds)
        return scale * query_embeds @ all_targets.T

    def get_labels(self, batch_size: int, device) -> torch.Tensor:
        rank, _ = _world()
        return torch.arange(batch_size, device=device) + rank * batch_size

    def get_duplicate_mask(self, labels, target_ids):
        """(B, W*B) bool: True where column j shows the same image as the query's own target but is not it."""
        if target_ids is None:
            return None
        all_ids = gather_no_grad(target_ids)
        same = target_ids[:, None] == all_ids[None, :]
        same[torch.arange(len(labels), device=labels.device), labels] = False
        return same

    def forward(self, query_embeds, target_embeds, scale, target_ids=None):
        if query_embeds.shape != target_embeds.shape:
            raise ValueError(
                f"`query_embeds` and `target_embeds` must have the same shape, got {tuple(query_embeds.shape)} "
                f"and {tuple(target_embeds.shape)}"
            )
        logits = self.get_logits(query_embeds, target_embeds, scale)
        labels = self.get_labels(query_embeds.shape[0], query_embeds.device)
        duplicates = self.get_duplicate_mask(labels, target_ids)
        return self.compute(logits, labels, duplicates, scale)

    def compute(self, logits, labels, duplicates, scale):
        """Loss from the logits (B, W*B), the positive column of each row (B,) and the duplicate mask (B, W*B)."""
        raise NotImplementedError


class MQIRTNBatchClassificationLoss(MQIRTNMetricLoss):
    """TIRG/ComposeAE's batch-based classification: softmax cross-entropy of each query over the batch's targets."""

    def compute(self, logits, labels, duplicates, scale):
        if duplicates is not None:
            logits = logits.masked_fill(duplicates, torch.finfo(logits.dtype).min)
        return F.cross_entropy(logits, labels)


class MQIRTNSoftTripletLoss(MQIRTNMetricLoss):
    """TIRG's soft triplet loss, vectorised: mean over (query i, negative j) of `softplus(D_ii - D_ij)`.

    TIRG's `D` is the squared distance of embeddings normalised to norm `s_tirg`: `D_ii - D_ij = 2 s_tirg^2 (cos_ij -
    cos_ii)`. This package's one scale `s` plays the role of `s_tirg^2` (logits `l = s cos`; see
    `MQIRTNConfig.logit_scale_init_value`), so the margin is `2 (l_ij - l_ii)`: 32 * (cos_ij - cos_ii) at TIRG's init
    (s_tirg = 4), 40 * (...) at this package's init s = 20.
    """

    def compute(self, logits, labels, duplicates, scale):
        rows = torch.arange(len(labels), device=logits.device)
        positive = logits[rows, labels][:, None]
        margins = F.softplus(2 * (logits - positive))
        negatives = torch.ones_like(margins, dtype=torch.bool)
        negatives[rows, labels] = False
        if duplicates is not None:
            negatives &= ~duplicates
        count = negatives.sum().clamp(min=1)
        return (margins * negatives).sum() / count


def build_metric_loss(loss_type: str) -> MQIRTNMetricLoss:
    """The loss named by `config.loss_type`."""
    if loss_type == "batch_based_classification":
        return MQIRTNBatchClassificationLoss()
    if loss_type == "soft_triplet":
        return MQIRTNSoftTripletLoss()
    raise ValueError(f"`loss_type` must be one of ['batch_based_classification', 'soft_triplet'], got {loss_type!r}")
