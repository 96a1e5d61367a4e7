"""Deep-metric-learning losses: equal to straightforward references, duplicates masked, vectorised soft triplet."""

import math

import pytest
import torch
from torch.nn import functional as F

from modeling_mqirtn.losses_mqirtn import (
    MQIRTNBatchClassificationLoss,
    MQIRTNSoftTripletLoss,
    build_metric_loss,
    gather_with_grad,
    image_fingerprints,
)


def unit(batch_size, dim=16, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch_size, dim, generator=generator, dtype=dtype), dim=-1)


def soft_triplet_loop(queries, targets, scale, skip=frozenset()):
    """TIRG's soft triplet loss written out: mean over (query i, negative j != i) of
    log(1 + exp(||s q_i - s t_i||^2 - ||s q_i - s t_j||^2)); pairs in `skip` are not negatives. `s` is TIRG's
    normalisation scale, which multiplies query and target: the package's logit scale is `s**2`."""
    total, count = 0.0, 0
    for i in range(len(queries)):
        positive = sum((scale * a - scale * b) ** 2 for a, b in zip(queries[i].tolist(), targets[i].tolist()))
        for j in range(len(targets)):
            if j == i or (i, j) in skip:
                continue
            negative = sum((scale * a - scale * b) ** 2 for a, b in zip(queries[i].tolist(), targets[j].tolist()))
            total += math.log1p(math.exp(positive - negative))
            count += 1
    return total / count


@pytest.mark.parametrize("batch_size, scale", [(2, 1.0), (8, 4.0), (13, 10.0)])
def test_soft_triplet_equals_loop_reference(batch_size, scale):
    queries, targets = unit(batch_size, seed=1), unit(batch_size, seed=2)
    loss = MQIRTNSoftTripletLoss()(queries, targets, torch.tensor(scale**2))
    assert loss.item() == pytest.approx(soft_triplet_loop(queries, targets, scale), abs=1e-5, rel=1e-5)


def test_soft_triplet_gradient_matches_autograd_of_explicit_distances():
    """Same gradients as autograd through explicit squared distances, for embeddings normalised as in the model
    (the logit form drops the constant ||q||^2 + ||t||^2, whose gradient is radial and removed by the normalisation)."""
    generator = torch.Generator().manual_seed(3)
    raw_queries = torch.randn(6, 16, generator=generator, requires_grad=True)
    raw_targets = torch.randn(6, 16, generator=generator, requires_grad=True)
    scale = torch.tensor(9.0, requires_grad=True)  # the logit scale: TIRG's normalisation scale squared
    MQIRTNSoftTripletLoss()(F.normalize(raw_queries, dim=-1), F.normalize(raw_targets, dim=-1), scale).backward()
    got = (raw_queries.grad.clone(), raw_targets.grad.clone(), scale.grad.clone())
    for tensor in (raw_queries, raw_targets, scale):
        tensor.grad = None
    queries, targets = F.normalize(raw_queries, dim=-1), F.normalize(raw_targets, dim=-1)
    tirg_scale = scale.sqrt()
    distances = ((tirg_scale * queries[:, None, :] - tirg_scale * targets[None, :, :]) ** 2).sum(-1)
    margins = F.softplus(distances.diag()[:, None] - distances)
    margins[~torch.eye(6, dtype=torch.bool)].mean().backward()
    for mine, reference in zip(got, (raw_queries.grad, raw_targets.grad, scale.grad)):
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batch_size, scale", [(1, 4.0), (5, 4.0), (9, 20.0)])
def test_batch_classification_equals_cross_entropy(batch_size, scale):
    queries, targets = unit(batch_size, seed=7), unit(batch_size, seed=8)
    loss = MQIRTNBatchClassificationLoss()(queries, targets, torch.tensor(scale))
    reference = F.cross_entropy(scale * queries @ targets.T, torch.arange(batch_size))
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-6)


def _with_duplicate_target(batch_size=6, first=1, second=4):
    images = torch.rand(batch_size, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    images[second] = images[first]
    return images


def test_fingerprints_identify_identical_images():
    images = _with_duplicate_target()
    ids = image_fingerprints(images)
    assert ids.dtype == torch.int64 and ids.shape == (6,)
    assert ids[1] == ids[4]
    assert len(set(ids.tolist())) == 5
    assert torch.equal(image_fingerprints(images.clone()), ids)  # deterministic
    shifted = images.clone()
    shifted[0, 0, 0, 0] += 0.25
    assert image_fingerprints(shifted)[0] != ids[0]


def test_batch_classification_masks_duplicate_targets():
    """With two identical target images, the loss equals the loss with the duplicate column removed (per row)."""
    ids = image_fingerprints(_with_duplicate_target())
    queries, targets = unit(6, seed=10), unit(6, seed=11)
    targets[4] = targets[1]  # identical images embed identically
    loss = MQIRTNBatchClassificationLoss()(queries, targets, torch.tensor(5.0), ids)
    logits = 5.0 * queries @ targets.T
    per_row = []
    for row in range(6):
        keep = [col for col in range(6) if {row, col} != {1, 4}]
        per_row.append(F.cross_entropy(logits[row, keep][None], torch.tensor([keep.index(row)])))
    torch.testing.assert_close(loss, torch.stack(per_row).mean(), atol=1e-6, rtol=1e-6)
    unmasked = MQIRTNBatchClassificationLoss()(queries, targets, torch.tensor(5.0))
    assert unmasked.item() > loss.item() + 1e-3  # the duplicate is a hard "negative" when not masked


def test_soft_triplet_masks_duplicate_targets():
    ids = image_fingerprints(_with_duplicate_target())
    queries, targets = unit(6, seed=12), unit(6, seed=13)
    targets[4] = targets[1]
    loss = MQIRTNSoftTripletLoss()(queries, targets, torch.tensor(16.0), ids)
    reference = soft_triplet_loop(queries, targets, 4.0, skip={(1, 4), (4, 1)})
    assert loss.item() == pytest.approx(reference, abs=1e-5, rel=1e-5)


def test_explicit_ids_equal_fingerprints():
    queries, targets = unit(6, seed=14), unit(6, seed=15)
    from_pixels = MQIRTNBatchClassificationLoss()(
        queries, targets, torch.tensor(4.0), image_fingerprints(_with_duplicate_target())
    )
    from_ids = MQIRTNBatchClassificationLoss()(queries, targets, torch.tensor(4.0), torch.tensor([0, 7, 2, 3, 7, 5]))
    torch.testing.assert_close(from_pixels, from_ids)


def test_loss_factory_and_errors():
    assert type(build_metric_loss("batch_based_classification")) is MQIRTNBatchClassificationLoss
    assert type(build_metric_loss("soft_triplet")) is MQIRTNSoftTripletLoss
    with pytest.raises(ValueError, match=r"`loss_type` must be one of .*got 'hinge'"):
        build_metric_loss("hinge")
    with pytest.raises(ValueError, match=r"must have the same shape, got \(4, 16\) and \(3, 16\)"):
        MQIRTNSoftTripletLoss()(unit(4), unit(3), torch.tensor(4.0))


def test_scale_receives_gradient():
    for loss_fn in (MQIRTNBatchClassificationLoss(), MQIRTNSoftTripletLoss()):
        scale = torch.tensor(4.0, requires_grad=True)
        loss_fn(unit(5, seed=16), unit(5, seed=17), scale).backward()
        assert scale.grad is not None and scale.grad.item() != 0.0


def test_single_process_gather_is_identity():
    tensor = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(tensor) is tensor
