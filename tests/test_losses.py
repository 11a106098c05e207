"""The paper's losses on small hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kitspipe.losses import (
    DualResolutionLoss,
    DualTargets,
    SegmentationLoss,
    format1_from_labels,
    regions_from_labels,
    soft_dice_loss,
    top_k_mean,
    weighted_bce,
)
from kitspipe.networks.dual_resolution import DualOutput


def _mask(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, -1)


def test_dice_of_identical_masks_is_zero_and_of_disjoint_masks_is_one() -> None:
    a = _mask(1, 1, 0, 0, 1, 0)
    assert soft_dice_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_dice_loss(a, 1 - a).item() == pytest.approx(1.0, abs=1e-5)
    # Half overlap: Dice = 2·1 / (2 + 2) = 0.5.
    assert soft_dice_loss(_mask(1, 1, 0, 0), _mask(0, 1, 1, 0)).item() == pytest.approx(0.5, abs=1e-5)


def test_dice_is_pooled_over_the_batch_and_averaged_over_channels() -> None:
    # Sample 0 has tumour, sample 1 none; channel 1 is predicted perfectly.
    probabilities = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    targets = torch.tensor([[[1.0, 1.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    # Channel 0: 2·1 / (1 + 2) = 2/3 over the batch; channel 1: 1.
    expected = 1 - (2 / 3 + 1) / 2
    assert soft_dice_loss(probabilities, targets).item() == pytest.approx(expected, abs=1e-5)
    empty = torch.zeros(2, 1, 4)
    assert soft_dice_loss(empty, empty).item() == pytest.approx(0.0, abs=1e-6)


def test_top_k_keeps_exactly_the_hardest_seventy_percent() -> None:
    losses = torch.arange(1.0, 11.0)[torch.randperm(10)]
    assert top_k_mean(losses, 0.7).item() == pytest.approx(7.0)  # mean of 4..10
    assert top_k_mean(losses, 1.0).item() == pytest.approx(5.5)
    assert top_k_mean(losses, 0.05).item() == pytest.approx(10.0)  # ceil(0.5) = 1
    # Over the whole batch, not per sample: the easy sample gives up its share.
    batch = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [9.0, 9.0, 9.0, 9.0, 9.0]])
    assert top_k_mean(batch, 0.6).item() == pytest.approx((5 * 9 + 1) / 6)  # per sample: 5
    with pytest.raises(ValueError):
        top_k_mean(losses, 0.0)


def test_top_k_gradient_reaches_only_the_kept_voxels() -> None:
    losses = torch.arange(1.0, 11.0, requires_grad=True)
    top_k_mean(losses, 0.7).backward()
    expected = torch.tensor([0.0] * 3 + [1 / 7] * 7)
    assert torch.allclose(losses.grad, expected)


def test_weighting_multiplies_the_bce_of_positive_voxels_only() -> None:
    logits = torch.tensor([[[0.3, -1.2]], [[2.0, 0.5]]]).reshape(1, 2, 2)
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).reshape(1, 2, 2)
    plain = weighted_bce(logits, targets, (1.0, 1.0))
    weighted = weighted_bce(logits, targets, (3.0, 5.0))
    assert weighted.shape == logits.shape
    assert torch.allclose(weighted[0, :, 0], plain[0, :, 0] * torch.tensor([3.0, 5.0]))
    assert torch.allclose(weighted[0, :, 1], plain[0, :, 1])
    assert plain[0, 0, 0].item() == pytest.approx(-math.log(torch.sigmoid(torch.tensor(0.3)).item()))
    with pytest.raises(ValueError, match="3 positive weights for 2 channels"):
        weighted_bce(logits, targets, (1.0, 1.0, 1.0))


def test_label_formats() -> None:
    labels = torch.tensor([[[0, 1], [2, 1]]])
    assert format1_from_labels(labels).tolist() == [[[[0, 1], [1, 1]]]]
    regions = regions_from_labels(labels)
    assert regions.shape == (1, 2, 2, 2)
    assert regions[0, 0].tolist() == [[0, 1], [1, 1]]
    assert regions[0, 1].tolist() == [[0, 0], [1, 0]]


def _random_output_and_targets(with_classification: bool = True) -> tuple[DualOutput, DualTargets]:
    torch.manual_seed(1)
    output = DualOutput(
        low_logits=torch.randn(2, 1, 4, 4, 4),
        high_logits=torch.randn(2, 2, 4, 4, 4),
        tumour_logit=torch.randn(2, 1) if with_classification else None,
        mask=torch.rand(2, 1, 8, 8, 8),
    )
    labels = torch.randint(0, 3, (2, 4, 4, 4))
    targets = DualTargets(
        low=format1_from_labels(torch.randint(0, 3, (2, 4, 4, 4))),
        high=regions_from_labels(labels),
        tumour_present=torch.tensor([[1.0], [0.0]]),
    )
    return output, targets


def test_dual_loss_is_the_papers_weighted_sum_of_its_terms() -> None:
    output, targets = _random_output_and_targets()
    loss = DualResolutionLoss(high_positive_weights=(2.0, 4.0), low_positive_weight=3.0)
    terms = loss(output, targets)
    assert torch.equal(terms.total, 2 * terms.high + 2 * terms.classification + 1 * terms.low)

    high_bce = weighted_bce(output.high_logits, targets.high, (2.0, 4.0)).mean(dim=1)
    high = 0.2 * soft_dice_loss(torch.sigmoid(output.high_logits), targets.high) + 0.8 * top_k_mean(high_bce, 0.7)
    low_bce = weighted_bce(output.low_logits, targets.low, (3.0,)).mean(dim=1)
    classification = F.mse_loss(torch.sigmoid(output.tumour_logit), targets.tumour_present)
    assert terms.high.item() == pytest.approx(high.item(), rel=1e-6)
    assert terms.low.item() == pytest.approx(top_k_mean(low_bce, 0.7).item(), rel=1e-6)
    assert terms.classification.item() == pytest.approx(classification.item(), rel=1e-6)


def test_absent_classification_counts_zero() -> None:
    output, targets = _random_output_and_targets(with_classification=False)
    terms = DualResolutionLoss()(output, targets)
    assert terms.classification.item() == 0.0
    assert terms.total.item() == pytest.approx(2 * terms.high.item() + terms.low.item(), rel=1e-6)
    output, targets = _random_output_and_targets()
    terms = DualResolutionLoss()(output, targets._replace(tumour_present=None))
    assert terms.classification.item() == 0.0


def test_segmentation_loss_is_zero_point_two_dice_plus_zero_point_eight_top_k_bce() -> None:
    output, targets = _random_output_and_targets()
    value = SegmentationLoss(positive_weights=(1.0, 2.0))(output.high_logits, targets.high)
    bce = top_k_mean(weighted_bce(output.high_logits, targets.high, (1.0, 2.0)).mean(dim=1), 0.7)
    dice = soft_dice_loss(torch.sigmoid(output.high_logits), targets.high)
    assert value.item() == pytest.approx(0.2 * dice.item() + 0.8 * bce.item(), rel=1e-6)
    # A confident, correct prediction has a loss near zero.
    confident = (targets.high * 2 - 1) * 20
    assert SegmentationLoss()(confident, targets.high).item() < 1e-3
