"""Building blocks of the 3D U-Net.

The paper's convolutions are unpadded ("valid"), so a block shrinks its input:
a :class:`ConvBlock` removes 2 voxels per side; with ``padding=1`` ("same") it
keeps the size. Feature maps of different sizes
meet at the skip connections; they are aligned by cropping (or padding) around
their common centre, which is what :func:`center_crop` and
:func:`center_pad_or_crop` do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _split(difference: int) -> tuple[int, int]:
    """Split a size difference into (before, after); an odd voxel goes after."""
    before = difference // 2
    return before, difference - before


def center_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop the trailing spatial dimensions of ``x`` to ``size`` around the centre.

    When a difference is odd the extra voxel is removed at the end of the axis.

    Args:
        x: tensor ``(B, C, *spatial)``.
        size: target spatial size, no larger than ``x``'s along any axis.

    Example:
        >>> center_crop(torch.zeros(1, 1, 8, 8, 8), (4, 4, 4)).shape
        torch.Size([1, 1, 4, 4, 4])
    """
    spatial = x.shape[-len(size):]
    slices = []
    for have, want in zip(spatial, size):
        if want > have:
            raise ValueError(f"cannot centre-crop size {tuple(spatial)} to larger {tuple(size)}")
        before, _ = _split(have - want)
        slices.append(slice(before, before + want))
    return x[(..., *slices)]


def center_pad_or_crop(x: torch.Tensor, size: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Bring the trailing spatial dimensions of ``x`` to ``size``, keeping the centre fixed.

    Each axis independently is zero-padded (when too small) or cropped (when
    too large); an odd extra voxel is added or removed at the end of the axis.

    Args:
        x: tensor ``(B, C, *spatial)``.
        size: target spatial size.
        value: fill value for padding.

    Example:
        >>> center_pad_or_crop(torch.ones(1, 1, 80, 80, 120), (108, 108, 108)).shape
        torch.Size([1, 1, 108, 108, 108])
    """
    spatial = x.shape[-len(size):]
    pad: list[int] = []
    # F.pad takes (before, after) pairs starting from the last axis.
    for have, want in reversed(list(zip(spatial, size))):
        before, after = _split(max(want - have, 0))
        pad += [before, after]
    if any(pad):
        x = F.pad(x, pad, value=value)
    return center_crop(x, size)


NORMALISATIONS = ("batch", "instance")


def normalisation_layer(kind: str, channels: int) -> nn.Module:
    """Batch norm, or instance norm with a learned affine map.

    Batch norm is a fixed affine map at inference, so a voxel's output does not depend on the
    tile it was computed in. Trained with batch size 1, though, its per-batch statistics are
    per-patch statistics, and the running averages used at inference differ from every one of
    them; instance norm uses per-patch statistics in training and inference alike, at the price
    of tiles of the training size at inference (docs/interpretation.md).
    """
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {kind!r}")


def conv_bn_relu(in_channels: int, out_channels: int, padding: int = 0, normalisation: str = "batch") -> nn.Sequential:
    """One 3×3×3 convolution + normalisation (batch norm by default) + ReLU.

    The convolution has no bias because the normalisation that follows has its own.

    Args:
        in_channels: input feature channels.
        out_channels: output feature channels.
        padding: 0 for the U-Net's valid convolution (shrinks each axis by 2), 1 for same.
        normalisation: ``"batch"`` or ``"instance"`` (:func:`normalisation_layer`).
    """
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=padding, bias=False),
        normalisation_layer(normalisation, out_channels),
        nn.ReLU(inplace=True),
    )


class ConvBlock(nn.Sequential):
    """Two 3×3×3 convolutions (valid by default), each followed by normalisation and ReLU.

    Batch norm by default: in eval mode it is a fixed per-channel affine map, so a
    voxel's output does not depend on which tile of a volume it was computed in,
    which lets inference use large tiles exactly.

    Args:
        in_channels: input feature channels.
        mid_channels: channels after the first convolution.
        out_channels: channels after the second convolution.
        padding: 0 (valid) or 1 (same) for both convolutions.
        normalisation: ``"batch"`` or ``"instance"``.

    Example:
        >>> ConvBlock(1, 8, 16)(torch.zeros(1, 1, 12, 12, 12)).shape
        torch.Size([1, 16, 8, 8, 8])
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, padding: int = 0,
                 normalisation: str = "batch"):
        super().__init__(
            conv_bn_relu(in_channels, mid_channels, padding, normalisation),
            conv_bn_relu(mid_channels, out_channels, padding, normalisation),
        )
        self.out_channels = out_channels


class UpBlock(nn.Module):
    """Decoder level: 2×2×2 transposed convolution, concatenated skips, :class:`ConvBlock`.

    The transposed convolution doubles the spatial size and keeps the channel
    count (as in the original 3D U-Net); the skip maps, larger because they
    went through fewer valid convolutions, are centre-cropped to its size.

    Args:
        in_channels: channels arriving from the level below.
        skip_channels: total channels of all skip maps concatenated at this level.
        out_channels: channels after both convolutions.
        padding: 0 (valid) or 1 (same) for both convolutions.
        normalisation: ``"batch"`` or ``"instance"``.

    Example:
        >>> up = UpBlock(in_channels=16, skip_channels=8, out_channels=8)
        >>> up(torch.zeros(1, 16, 6, 6, 6), [torch.zeros(1, 8, 20, 20, 20)]).shape
        torch.Size([1, 8, 8, 8, 8])
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, padding: int = 0,
                 normalisation: str = "batch"):
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        self.convs = ConvBlock(in_channels + skip_channels, out_channels, out_channels, padding, normalisation)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.up(x)
        size = x.shape[2:]
        x = torch.cat([*(center_crop(s, size) for s in skips), x], dim=1)
        return self.convs(x)
