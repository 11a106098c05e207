"""Losses of the paper (section 2.3.4) on sigmoid region channels.

* 1 mm output: ``0.2 · soft Dice + 0.8 · weighted cross-entropy``;
* 4 mm output: cross-entropy;
* tumour presence: mean squared error of the sigmoid probability;
* total: ``2 · high + 2 · classification + 1 · low``;
* "70 % Top-k is applied to the loss": the cross-entropy terms average only
  the 70 % hardest voxels (online hard-voxel mining). Dice is a global ratio,
  not a per-voxel loss, so Top-k does not apply to it; MSE on one number per
  patch has nothing to mine either.

Every output channel is an independent sigmoid region, so the cross-entropy is
binary cross-entropy per channel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kitspipe.networks.dual_resolution import DualOutput

# KiTS19 label value of tumour (kidney is 1, background 0).
TUMOUR_LABEL = 2


def format1_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """Kidney ∪ tumour region (the paper's format 1) as a float channel.

    Args:
        labels: ``(B, *spatial)`` integer labels 0 background, 1 kidney, 2 tumour.

    Returns:
        ``(B, 1, *spatial)`` float 0/1.

    Example:
        >>> format1_from_labels(torch.tensor([[0, 1, 2]]))
        tensor([[[0., 1., 1.]]])
    """
    return (labels > 0).unsqueeze(1).float()


def regions_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """Region targets of the 1 mm output (format 3, our reading): kidney ∪ tumour, tumour.

    Args:
        labels: ``(B, *spatial)`` integer labels 0 background, 1 kidney, 2 tumour.

    Returns:
        ``(B, 2, *spatial)`` float 0/1; channel 0 kidney ∪ tumour, channel 1 tumour.

    Example:
        >>> regions_from_labels(torch.tensor([[0, 1, 2]]))
        tensor([[[0., 1., 1.],
                 [0., 0., 1.]]])
    """
    # Channel order as KIDNEY_AND_TUMOUR_CHANNEL and TUMOUR_CHANNEL in networks.dual_resolution.
    return torch.stack([labels > 0, labels == TUMOUR_LABEL], dim=1).float()


def soft_dice_loss(probabilities: torch.Tensor, targets: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """One minus the mean soft Dice over channels, each pooled over the whole batch.

    Pooling the sums over the batch (rather than averaging per-sample Dice)
    means a patch without any tumour does not contribute a 0/0 Dice of its own;
    ``eps`` only guards a channel that is empty in the whole batch, where
    prediction and target agree and the loss is 0.

    Args:
        probabilities: ``(B, C, *spatial)`` sigmoid probabilities.
        targets: ``(B, C, *spatial)`` 0/1 region targets.
        eps: smoothing added to numerator and denominator.

    Returns:
        Scalar loss in [0, 1].

    Example:
        >>> t = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]])
        >>> round(soft_dice_loss(t, t).item(), 6), round(soft_dice_loss(t, 1 - t).item(), 4)
        (0.0, 1.0)
    """
    dims = [0, *range(2, probabilities.dim())]
    intersection = (probabilities * targets).sum(dims)
    total = probabilities.sum(dims) + targets.sum(dims)
    dice = (2 * intersection + eps) / (total + eps)
    return 1 - dice.mean()


def weighted_bce(
    logits: torch.Tensor, targets: torch.Tensor, positive_weights: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Per-voxel binary cross-entropy with the positive term of each channel weighted.

    ``-(w_c · t · log σ(x) + (1 - t) · log(1 - σ(x)))``, the paper's "weighted
    cross-entropy" for sigmoid regions; the plan derives ``w_c`` from how rare
    each region is.

    Args:
        logits: ``(B, C, *spatial)``.
        targets: ``(B, C, *spatial)`` 0/1 region targets.
        positive_weights: one weight per channel.

    Returns:
        Unreduced loss, same shape as ``logits``.
    """
    weights = torch.as_tensor(positive_weights, dtype=logits.dtype, device=logits.device)
    if weights.numel() != logits.shape[1]:
        raise ValueError(f"{weights.numel()} positive weights for {logits.shape[1]} channels")
    weights = weights.reshape(-1, *([1] * (logits.dim() - 2)))
    return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weights, reduction="none")


def top_k_mean(per_voxel_loss: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the ``ceil(fraction · N)`` largest of all N values (hard-voxel mining).

    The selection runs over the whole batch, as nnU-Net's TopK loss does: a
    patch that is mostly easy background gives up its share to harder patches
    instead of being averaged on its own.

    Args:
        per_voxel_loss: unreduced loss of any shape.
        fraction: share of values kept, in (0, 1]; 1 is the plain mean.

    Example:
        >>> top_k_mean(torch.arange(1.0, 11.0), 0.7)  # mean of 4..10
        tensor(7.)
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
    values = per_voxel_loss.flatten()
    # Rounding first keeps e.g. 0.7 · 10 from becoming 7.000000001 and ceiling to 8.
    k = max(1, math.ceil(round(fraction * values.numel(), 6)))
    if k >= values.numel():
        return values.mean()
    return torch.topk(values, k, sorted=False).values.mean()


def _voxel_bce(logits: torch.Tensor, targets: torch.Tensor, positive_weights: torch.Tensor) -> torch.Tensor:
    # Mining selects voxels, so the channels of one voxel are averaged first.
    return weighted_bce(logits, targets, positive_weights).mean(dim=1)


class DualTargets(NamedTuple):
    """Targets of one dual-resolution batch.

    Args:
        low: ``(B, 1, *low_out)`` kidney ∪ tumour at 4 mm (:func:`format1_from_labels`).
        high: ``(B, 2, *high_out)`` regions at 1 mm (:func:`regions_from_labels`).
        tumour_present: ``(B, 1)`` 1.0 where the 1 mm output region contains tumour,
            or None to skip the classification term.
    """

    low: torch.Tensor
    high: torch.Tensor
    tumour_present: torch.Tensor | None = None


class LossTerms(NamedTuple):
    """The total loss and its unweighted parts (absent parts are 0).

    Args:
        total: ``high_weight·high + classification_weight·classification + low_weight·low``.
        high: 1 mm segmentation loss.
        low: 4 mm segmentation loss.
        classification: tumour-presence MSE.
    """

    total: torch.Tensor
    high: torch.Tensor
    low: torch.Tensor
    classification: torch.Tensor


class SegmentationLoss(nn.Module):
    """``dice_weight · soft Dice + ce_weight · top-k weighted BCE`` on region logits.

    The 1 mm term of the dual network, and the whole loss of the single U-Net baseline.

    Args:
        dice_weight: weight of the soft Dice loss (0.2 in the paper).
        ce_weight: weight of the cross-entropy (0.8 in the paper).
        topk_fraction: share of hardest voxels averaged in the cross-entropy.
        positive_weights: per-channel weight of positive voxels in the cross-entropy.
    """

    def __init__(
        self,
        dice_weight: float = 0.2,
        ce_weight: float = 0.8,
        topk_fraction: float = 0.7,
        positive_weights: Sequence[float] = (1.0, 1.0),
    ):
        super().__init__()
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.topk_fraction = topk_fraction
        self.register_buffer("positive_weights", torch.as_tensor(positive_weights, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Scalar loss.

        Args:
            logits: ``(B, C, *spatial)``.
            targets: ``(B, C, *spatial)`` 0/1 regions.
        """
        # Under bf16 autocast the logits arrive in bf16; the sigmoid, the Dice sums over every
        # voxel and the top-k mean are computed in float32 (no-op for float32 logits).
        logits = logits.float()
        dice = soft_dice_loss(torch.sigmoid(logits), targets)
        bce = top_k_mean(_voxel_bce(logits, targets, self.positive_weights), self.topk_fraction)
        return self.dice_weight * dice + self.ce_weight * bce


class DualResolutionLoss(nn.Module):
    """The paper's loss: ``2 · high + 2 · classification + 1 · low``.

    * high: :class:`SegmentationLoss` (0.2 Dice + 0.8 top-k weighted BCE);
    * low: top-k BCE on kidney ∪ tumour, positives weighted by ``low_positive_weight``;
    * classification: MSE between ``sigmoid(tumour_logit)`` and ``tumour_present``.

    Args:
        high_weight: weight of the 1 mm term.
        classification_weight: weight of the classification term.
        low_weight: weight of the 4 mm term.
        dice_weight: Dice share of the 1 mm term.
        ce_weight: cross-entropy share of the 1 mm term.
        topk_fraction: share of hardest voxels averaged in both cross-entropies.
        high_positive_weights: per-channel positive weights at 1 mm.
        low_positive_weight: positive weight at 4 mm.
    """

    def __init__(
        self,
        high_weight: float = 2.0,
        classification_weight: float = 2.0,
        low_weight: float = 1.0,
        dice_weight: float = 0.2,
        ce_weight: float = 0.8,
        topk_fraction: float = 0.7,
        high_positive_weights: Sequence[float] = (1.0, 1.0),
        low_positive_weight: float = 1.0,
    ):
        super().__init__()
        self.high_weight = high_weight
        self.classification_weight = classification_weight
        self.low_weight = low_weight
        self.topk_fraction = topk_fraction
        self.high_loss = SegmentationLoss(dice_weight, ce_weight, topk_fraction, high_positive_weights)
        self.register_buffer("low_positive_weight", torch.tensor([float(low_positive_weight)]))

    def low_term(self, low_logits: torch.Tensor, low_targets: torch.Tensor) -> torch.Tensor:
        """4 mm loss alone, e.g. to pre-train the low-resolution net (paper section 3)."""
        low_logits = low_logits.float()  # float32 loss under bf16 autocast, as in SegmentationLoss
        return top_k_mean(_voxel_bce(low_logits, low_targets, self.low_positive_weight), self.topk_fraction)

    @staticmethod
    def classification_term(tumour_logit: torch.Tensor, tumour_present: torch.Tensor) -> torch.Tensor:
        """MSE of the sigmoid tumour-presence probability."""
        tumour_logit = tumour_logit.float()  # float32 loss under bf16 autocast
        return F.mse_loss(torch.sigmoid(tumour_logit), tumour_present.to(tumour_logit.dtype))

    def forward(self, output: DualOutput, targets: DualTargets) -> LossTerms:
        """Weighted total and its parts.

        Args:
            output: the network's :class:`DualOutput`.
            targets: matching :class:`DualTargets`.
        """
        high = self.high_loss(output.high_logits, targets.high)
        low = self.low_term(output.low_logits, targets.low)
        if output.tumour_logit is None or targets.tumour_present is None:
            classification = high.new_zeros(())
        else:
            classification = self.classification_term(output.tumour_logit, targets.tumour_present)
        total = self.high_weight * high + self.classification_weight * classification + self.low_weight * low
        return LossTerms(total=total, high=high, low=low, classification=classification)
