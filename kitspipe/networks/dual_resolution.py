"""The paper's single cascade network: a 4 mm U-Net that masks the input of a 1 mm U-Net.

Section 2.3.1: the low-resolution U-Net segments kidney ∪ tumour on a large
4 mm patch. Its probability is upsampled to 1 mm, zero-padded around the
common centre to the size of the 1 mm patch and multiplied with the 1 mm image.
The masked image feeds a branch of convolutions whose features join the skip
connection of the high-resolution U-Net. Nothing is detached, so the 1 mm loss
trains the 4 mm network too: that is the paper's point against two-stage
cascades.

With the paper's sizes (both inputs 108³, depth 3)::

    4 mm image 108³ ─ low U-Net ─ 20³ logits (kidney ∪ tumour)
                        sigmoid, ×4 upsampling: 80³ at 1 mm, zero-padded to 108³
    1 mm image 108³ ── × mask ── branch (two valid convs) ─┐
          └────────── high U-Net (skip at level 0 joined) ─┴─ 20³ logits, 2 channels
                      bottleneck 6³ + tumour fraction ─ head ─ tumour logit

All outputs are logits; apply ``torch.sigmoid`` for probabilities.
"""

from __future__ import annotations

import contextlib

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kitspipe.networks.blocks import ConvBlock, center_crop, center_pad_or_crop
from kitspipe.networks.classification_head import TumourPresenceHead
from kitspipe.networks.sizes import VALID, UNetBorders, trace_sizes
from kitspipe.networks.unet3d import UNet3D

MASK_JOINS = ("first_skip", "all_skips", "input")
MASK_UPSAMPLINGS = ("trilinear", "nearest")
# Channels of the 1 mm output, independent sigmoid regions ("format 3", our reading).
KIDNEY_AND_TUMOUR_CHANNEL = 0
TUMOUR_CHANNEL = 1


class HighOutput(NamedTuple):
    """What :meth:`DualResolutionUNet.high_forward` returns.

    Args:
        logits: ``(B, 2, *out)`` region logits: kidney ∪ tumour, tumour.
        tumour_logit: ``(B, 1)`` tumour-presence logit, or None without a head.
    """

    logits: torch.Tensor
    tumour_logit: torch.Tensor | None


class DualOutput(NamedTuple):
    """What :meth:`DualResolutionUNet.forward` returns (all logits).

    Args:
        low_logits: ``(B, 1, *low_out)`` kidney ∪ tumour at 4 mm.
        high_logits: ``(B, 2, *high_out)`` regions at 1 mm.
        tumour_logit: ``(B, 1)`` tumour-presence logit, or None without a head.
        mask: ``(B, 1, *high_in)`` the probability mask that multiplied the 1 mm image.
    """

    low_logits: torch.Tensor
    high_logits: torch.Tensor
    tumour_logit: torch.Tensor | None
    mask: torch.Tensor


class DualResolutionUNet(nn.Module):
    """Low-resolution U-Net whose output masks the input of a high-resolution U-Net.

    The forward pass is split into the three steps an inference tiler needs:
    :meth:`low_forward` (run once over a whole 4 mm volume),
    :meth:`upsample_probability` / :meth:`mask_from_low` (bring its probability
    to the 1 mm grid) and :meth:`high_forward` (run per 1 mm tile with the
    matching crop of the mask). :meth:`forward` composes them for training.

    Args:
        low_base_filters: base filters of the 4 mm U-Net (16 in the paper).
        high_base_filters: base filters of the 1 mm U-Net (32 in the paper).
        low_depth: poolings of the 4 mm U-Net.
        high_depth: poolings of the 1 mm U-Net.
        scale: ratio of the two voxel spacings (4 mm / 1 mm = 4).
        high_input_size: training patch of the 1 mm net; sizes the head's
            convolutions and is checked for validity.
        low_input_size: training patch of the 4 mm net; checked for validity.
        mask_join: where the masked image enters the 1 mm net:
            ``"first_skip"`` (default) a branch of two valid convolutions whose
            features are concatenated to the level-0 skip connection;
            ``"all_skips"`` the same branch, max-pooled down and concatenated to
            every level's skip; ``"input"`` no branch, the masked image is a
            second input channel of the 1 mm net.
        mask_upsampling: ``"trilinear"`` (default, a smooth mask edge) or
            ``"nearest"`` (each 4 mm voxel becomes a block of ``scale³``); with
            either, a 4 mm voxel covers the same 1 mm voxels.
        mask_branch_filters: width of the branch; default ``high_base_filters``.
        classification: whether to build the tumour-presence head.
        head_conv_filters: see :class:`TumourPresenceHead`.
        head_fc_widths: see :class:`TumourPresenceHead`.
        head_joint_widths: see :class:`TumourPresenceHead`.
        image_channels: channels of each input image.
        high_borders: padding and output crop of the 1 mm U-Net and its mask branch.
        low_borders: padding and output crop of the 4 mm U-Net.
        normalisation: ``"batch"`` or ``"instance"`` in both U-Nets and the mask branch
            (the classification head keeps batch norm: its maps are a few voxels wide).

    Example:
        >>> net = DualResolutionUNet(4, 4, 2, 2, high_input_size=(52,) * 3, low_input_size=(44,) * 3)
        >>> out = net(torch.zeros(1, 1, 52, 52, 52), torch.zeros(1, 1, 44, 44, 44))
        >>> out.low_logits.shape, out.high_logits.shape, out.tumour_logit.shape
        (torch.Size([1, 1, 4, 4, 4]), torch.Size([1, 2, 12, 12, 12]), torch.Size([1, 1]))
    """

    def __init__(
        self,
        low_base_filters: int = 16,
        high_base_filters: int = 32,
        low_depth: int = 3,
        high_depth: int = 3,
        scale: int = 4,
        high_input_size: Sequence[int] = (108, 108, 108),
        low_input_size: Sequence[int] = (108, 108, 108),
        mask_join: str = "first_skip",
        mask_upsampling: str = "trilinear",
        mask_branch_filters: int | None = None,
        classification: bool = True,
        head_conv_filters: Sequence[int] = (32, 16),
        head_fc_widths: Sequence[int] = (1024, 256, 128),
        head_joint_widths: Sequence[int] = (64, 32),
        image_channels: int = 1,
        high_borders: UNetBorders = VALID,
        low_borders: UNetBorders = VALID,
        normalisation: str = "batch",
    ):
        super().__init__()
        if mask_join not in MASK_JOINS:
            raise ValueError(f"mask_join must be one of {MASK_JOINS}, got {mask_join!r}")
        if mask_upsampling not in MASK_UPSAMPLINGS:
            raise ValueError(f"mask_upsampling must be one of {MASK_UPSAMPLINGS}, got {mask_upsampling!r}")
        if scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        # Fail at construction, naming the size, rather than deep inside a forward pass.
        high_traces = [trace_sizes(s, high_depth, borders=high_borders) for s in high_input_size]
        low_traces = [trace_sizes(s, low_depth, borders=low_borders) for s in low_input_size]
        self.high_input_size = tuple(high_input_size)
        self.low_input_size = tuple(low_input_size)
        self.high_output_size = tuple(t.output for t in high_traces)
        self.low_output_size = tuple(t.output for t in low_traces)
        self.scale = scale
        self.mask_join = mask_join
        self.mask_upsampling = mask_upsampling

        self.low = UNet3D(image_channels, 1, low_base_filters, low_depth, borders=low_borders,
                          normalisation=normalisation)
        branch_filters = mask_branch_filters or high_base_filters
        if mask_join == "input":
            self.mask_branch: ConvBlock | None = None
            self.high = UNet3D(2 * image_channels, 2, high_base_filters, high_depth, borders=high_borders,
                               normalisation=normalisation)
        else:
            self.mask_branch = ConvBlock(image_channels, branch_filters, branch_filters, high_borders.conv_padding,
                                         normalisation)
            levels = [0] if mask_join == "first_skip" else list(range(high_depth))
            self.high = UNet3D(
                image_channels, 2, high_base_filters, high_depth,
                extra_skip_channels={level: branch_filters for level in levels}, borders=high_borders,
                normalisation=normalisation,
            )
        self.branch_pool = nn.MaxPool3d(kernel_size=2, stride=2)

        self.head: TumourPresenceHead | None = None
        if classification:
            bottleneck = [t.bottleneck for t in high_traces]
            self.head = TumourPresenceHead(
                self.high.bottleneck_channels,
                conv_filters=head_conv_filters,
                fc_widths=head_fc_widths,
                joint_widths=head_joint_widths,
                conv_padding=TumourPresenceHead.conv_padding_for(bottleneck, len(head_conv_filters)),
            )

    def low_forward(self, low_image: torch.Tensor) -> torch.Tensor:
        """Kidney ∪ tumour logits of the 4 mm U-Net.

        Args:
            low_image: ``(B, C, *low_in)`` 4 mm image.

        Returns:
            ``(B, 1, *low_out)`` logits.
        """
        return self.low(low_image).logits

    def upsample_probability(self, low_probability: torch.Tensor) -> torch.Tensor:
        """Bring a 4 mm probability map to the 1 mm grid (×``scale`` along each axis).

        ``align_corners=False`` places each 4 mm voxel's value at the centre of
        its ``scale³`` block of 1 mm voxels, the same geometry as nearest
        upsampling, so both options cover the same region.

        Args:
            low_probability: ``(B, 1, *n)`` sigmoid of :meth:`low_forward`.

        Returns:
            ``(B, 1, *(scale·n))``.
        """
        if self.mask_upsampling == "nearest":
            return F.interpolate(low_probability, scale_factor=self.scale, mode="nearest")
        return F.interpolate(low_probability, scale_factor=self.scale, mode="trilinear", align_corners=False)

    def mask_from_low(self, low_probability: torch.Tensor, high_spatial_shape: Sequence[int]) -> torch.Tensor:
        """The 1 mm mask for a 1 mm patch that shares its centre with the 4 mm patch.

        The upsampled probability is zero-padded around the centre where it is
        smaller than the 1 mm patch (paper: 20³ → 80³ → padded to 108³) and
        centre-cropped where it is larger (e.g. a 116³ 4 mm input: 28³ → 112³).

        Args:
            low_probability: ``(B, 1, *n)`` sigmoid of :meth:`low_forward`.
            high_spatial_shape: spatial shape of the 1 mm input.

        Returns:
            ``(B, 1, *high_spatial_shape)``.
        """
        return center_pad_or_crop(self.upsample_probability(low_probability), high_spatial_shape)

    def _branch_skips(self, features: torch.Tensor, spatial: Sequence[int]) -> dict[int, torch.Tensor]:
        """Branch features for each skip level that ``mask_join`` feeds."""
        skips = {0: features}
        if self.mask_join == "all_skips":
            traces = [trace_sizes(int(s), self.high.depth, borders=self.high.borders) for s in spatial]
            for level in range(1, self.high.depth):
                # Crop to the encoder's pre-pooling size first, so the branch is
                # pooled on exactly the encoder's 2×2×2 grid at every depth.
                encoder_size = [t.skips[level - 1] for t in traces]
                features = self.branch_pool(center_crop(features, encoder_size))
                skips[level] = features
        return skips

    def high_forward(
        self, high_image: torch.Tensor, mask: torch.Tensor, classify: bool = True
    ) -> HighOutput:
        """Region logits of the 1 mm U-Net given the mask on its input grid.

        Args:
            high_image: ``(B, C, *high_in)`` 1 mm image.
            mask: ``(B, 1, *high_in)`` probability mask, e.g. from :meth:`mask_from_low`
                or a crop of :meth:`upsample_probability` over a whole volume.
            classify: run the tumour-presence head (skip it at inference).

        Returns:
            :class:`HighOutput`.
        """
        if mask.shape[2:] != high_image.shape[2:]:
            raise ValueError(
                f"mask shape {tuple(mask.shape[2:])} differs from image shape {tuple(high_image.shape[2:])}"
            )
        masked = high_image * mask
        if self.mask_branch is None:
            out = self.high(torch.cat([high_image, masked], dim=1))
        else:
            features = self.mask_branch(masked)
            out = self.high(high_image, self._branch_skips(features, high_image.shape[2:]))
        tumour_logit = None
        if self.head is not None and classify:
            tumour_probability = torch.sigmoid(out.logits[:, TUMOUR_CHANNEL])
            tumour_logit = self.head(out.bottleneck, tumour_probability)
        return HighOutput(out.logits, tumour_logit)

    def forward(self, high_image: torch.Tensor | None, low_image: torch.Tensor, low_only: bool = False,
                frozen_low: bool = False) -> DualOutput | torch.Tensor:
        """Run both networks on a pair of patches that share their centre.

        The trainers' variants (low-resolution pre-training, the two-stage cascade) are options
        here rather than calls of ``low_forward`` / ``high_forward`` from outside, because
        DistributedDataParallel synchronises the gradients of what ran through its forward.

        Args:
            high_image: ``(B, C, *high_in)`` 1 mm patch, e.g. 108³; unused with ``low_only``.
            low_image: ``(B, C, *low_in)`` 4 mm patch, e.g. 108³.
            low_only: return only the 4 mm logits (pre-training the low-resolution net).
            frozen_low: compute the 4 mm branch without gradient (a fixed first stage).

        Returns:
            :class:`DualOutput`; with the paper's sizes low and high logits are 20³. With
            ``low_only`` the ``(B, 1, *low_out)`` logits alone.
        """
        if low_only:
            return self.low_forward(low_image)
        with torch.no_grad() if frozen_low else contextlib.nullcontext():
            low_logits = self.low_forward(low_image)
        mask = self.mask_from_low(torch.sigmoid(low_logits), high_image.shape[2:])
        high = self.high_forward(high_image, mask)
        return DualOutput(low_logits, high.logits, high.tumour_logit, mask)
