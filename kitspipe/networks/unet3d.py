"""The original 3D U-Net (Çiçek et al. 2016), with valid convolutions by default.

Both sub-networks of the paper are this network: the 4 mm net with 16 base
filters, the 1 mm net with 32. The output is smaller than the input by
:func:`kitspipe.networks.sizes.margin` voxels on every side; use
:mod:`kitspipe.networks.sizes` to pick input sizes. A plan may choose
same-padded convolutions instead (:class:`~kitspipe.networks.sizes.UNetBorders`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from kitspipe.networks.blocks import ConvBlock, UpBlock, center_crop
from kitspipe.networks.sizes import VALID, UNetBorders, trace_sizes


class UNetOutput(NamedTuple):
    """What :class:`UNet3D` returns.

    Args:
        logits: ``(B, num_classes, *output_spatial)``, before any activation.
        bottleneck: features at the lowest level, ``(B, base·2^(depth+1), *b)``,
            used by the dual network's classification head.
    """

    logits: torch.Tensor
    bottleneck: torch.Tensor


class UNet3D(nn.Module):
    """3D U-Net with batch (default) or instance norm, valid (default) or same-padded convolutions.

    Channel widths follow the original paper. With ``base_filters=32`` and
    ``depth=3`` the encoder levels produce 32/64, 64/128 and 128/256 channels,
    the bottleneck 256/512; each decoder level upsamples (keeping channels),
    concatenates the centre-cropped skip and convolves to 256, 128 and 64
    channels; a 1×1×1 convolution gives the logits.

    Extra skip features can be injected per encoder level, which is how the
    dual-resolution network joins its masked-image branch to this one.

    Args:
        in_channels: image channels.
        num_classes: output channels (logits; the caller chooses the activation).
        base_filters: filters of the first convolution.
        depth: number of max-pooling steps.
        extra_skip_channels: ``{level: channels}`` of feature maps that
            :meth:`forward` will receive in ``extra_skips`` and concatenate to
            that level's skip connection.
        borders: convolution padding and the crop of the last decoder map.
        normalisation: ``"batch"`` (default) or ``"instance"`` after every convolution.

    Example:
        >>> net = UNet3D(in_channels=1, num_classes=2, base_filters=4, depth=2)
        >>> out = net(torch.zeros(1, 1, 64, 64, 64))
        >>> out.logits.shape, out.bottleneck.shape
        (torch.Size([1, 2, 24, 24, 24]), torch.Size([1, 32, 9, 9, 9]))
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_filters: int = 32,
        depth: int = 3,
        extra_skip_channels: dict[int, int] | None = None,
        borders: UNetBorders = VALID,
        normalisation: str = "batch",
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"UNet3D depth must be at least 1, got {depth}")
        extra = dict(extra_skip_channels or {})
        unknown = sorted(level for level in extra if not 0 <= level < depth)
        if unknown:
            raise ValueError(
                f"extra_skip_channels names levels {unknown}; "
                f"a depth-{depth} U-Net has levels 0..{depth - 1}"
            )
        self.depth = depth
        self.extra_skip_channels = extra
        self.borders = borders
        padding = borders.conv_padding

        self.encoder = nn.ModuleList()
        channels = in_channels
        for level in range(depth):
            block = ConvBlock(channels, base_filters * 2**level, base_filters * 2 ** (level + 1), padding, normalisation)
            self.encoder.append(block)
            channels = block.out_channels
        self.pool = nn.MaxPool3d(kernel_size=2, stride=2)
        self.bottom = ConvBlock(channels, base_filters * 2**depth, base_filters * 2 ** (depth + 1), padding, normalisation)
        self.bottleneck_channels = self.bottom.out_channels

        # Built deepest level first, the order in which forward() runs them.
        self.decoder = nn.ModuleList()
        channels = self.bottleneck_channels
        for level in reversed(range(depth)):
            skip = self.encoder[level].out_channels + extra.get(level, 0)
            block = UpBlock(channels, skip, base_filters * 2 ** (level + 1), padding, normalisation)
            self.decoder.append(block)
            channels = block.out_channels
        self.head = nn.Conv3d(channels, num_classes, kernel_size=1)

    def blocks(self) -> list[nn.Module]:
        """The network's blocks from input to output.

        Encoder levels, bottleneck, decoder levels (deepest first), head:
        ``2·depth + 2`` modules. A trainer freezes all but the last ``n`` of them
        (paper section 3 keeps the last three trainable: for depth 3 the two
        finest decoder levels and the head).
        """
        return [*self.encoder, self.bottom, *self.decoder, self.head]

    def forward(self, x: torch.Tensor, extra_skips: dict[int, torch.Tensor] | None = None) -> UNetOutput:
        """Segment one batch.

        Args:
            x: image batch ``(B, in_channels, z, y, x)``, each edge a valid input
                size (see :func:`kitspipe.networks.sizes.is_valid_input_size`).
            extra_skips: ``{level: (B, C_level, ...)}`` feature maps for exactly the
                levels declared in ``extra_skip_channels``; each must be at least
                as large as the decoder map it meets and is centre-cropped to it.

        Returns:
            :class:`UNetOutput` with logits and bottleneck features.
        """
        for edge in x.shape[2:]:
            # Raises with the offending size; max-pooling would silently drop a voxel.
            trace_sizes(int(edge), self.depth, borders=self.borders)
        extra_skips = extra_skips or {}
        if set(extra_skips) != set(self.extra_skip_channels):
            raise ValueError(
                f"extra_skips given for levels {sorted(extra_skips)}, "
                f"network was built for levels {sorted(self.extra_skip_channels)}"
            )
        skips: list[torch.Tensor] = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        bottleneck = self.bottom(x)
        x = bottleneck
        for level, block in zip(reversed(range(self.depth)), self.decoder):
            level_skips = [skips[level]]
            if level in extra_skips:
                level_skips.append(extra_skips[level])
            x = block(x, level_skips)
        crop = self.borders.output_crop
        if crop:
            x = center_crop(x, [n - 2 * crop for n in x.shape[2:]])
        return UNetOutput(logits=self.head(x), bottleneck=bottleneck)
