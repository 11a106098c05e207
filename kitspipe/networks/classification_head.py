"""The paper's extra task: does the patch contain kidney tumour? (section 2.3.2).

The head reads the bottleneck features of the 1 mm U-Net and, as a second
input, the predicted tumour volume of the same patch, so that the
classification is tied to the segmentation it accompanies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kitspipe.networks.blocks import conv_bn_relu

# Each valid 3×3×3 convolution removes one voxel per side.
_VALID_SHRINK = 2


def _mlp(widths: Sequence[int], in_features: int) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
        in_features = width
    return nn.Sequential(*layers), in_features


class TumourPresenceHead(nn.Module):
    """Classifies whether a patch contains tumour, from bottleneck features and tumour volume.

    Layout (defaults as the paper)::

        bottleneck ─ conv 3³ 32 ─ conv 3³ 16 ─ avg-pool to 2³ ─ flatten (128)
          ─ FC 1024 ─ FC 256 ─ FC 128 ─┬─ concat (129) ─ FC 64 ─ FC 32 ─ FC 1 → logit
        tumour probability map ─ mean ─┘

    Choices the paper leaves open:

    * Flatten size. The paper's 108³ input gives a 6³ bottleneck, 4³ and then
      2³ after the two valid convolutions, so 16·2³ = 128 features. An
      adaptive average pooling to ``pooled_size³`` (default 2) fixes the flatten
      size whatever the bottleneck size: it is the identity for the paper's
      patch, and larger inference tiles still run through the head.
    * Small bottlenecks. CPU configurations can have bottlenecks too small for
      two valid convolutions (a 4³ bottleneck would become empty). Then the
      convolutions are zero-padded ("same"); see :meth:`conv_padding_for`. This
      keeps the paper's two 3×3×3 layers and their receptive field, and
      batch norm still sees at least ``pooled_size³`` values per channel.
    * Tumour volume. The paper sums the tumour-channel probabilities. We use
      the mean instead (the sum divided by the number of output voxels): a
      fraction in [0, 1] whatever the patch size, so it sits on the same scale
      as the other 128 features and training is stable. Gradients flow through
      it into the segmentation output.
    * "129 neurons". We read the third fully connected layer as 128 wide
      (128 + 1 = 129), not the 256 the text lists.

    Args:
        in_channels: channels of the bottleneck features.
        conv_filters: filters of the 3×3×3 convolutions.
        fc_widths: fully connected layers before the tumour volume joins.
        joint_widths: fully connected layers after it joins (a final 1-unit
            layer always follows).
        pooled_size: edge of the adaptive pooling grid before flattening.
        conv_padding: 0 for valid convolutions (the paper), 1 for "same".

    Example:
        >>> head = TumourPresenceHead(in_channels=512)
        >>> head(torch.zeros(2, 512, 6, 6, 6), torch.zeros(2, 20, 20, 20)).shape
        torch.Size([2, 1])
    """

    def __init__(
        self,
        in_channels: int,
        conv_filters: Sequence[int] = (32, 16),
        fc_widths: Sequence[int] = (1024, 256, 128),
        joint_widths: Sequence[int] = (64, 32),
        pooled_size: int = 2,
        conv_padding: int = 0,
    ):
        super().__init__()
        if conv_padding not in (0, 1):
            raise ValueError(f"conv_padding must be 0 (valid) or 1 (same), got {conv_padding}")
        convs: list[nn.Module] = []
        channels = in_channels
        for filters in conv_filters:
            convs.append(conv_bn_relu(channels, filters, padding=conv_padding))
            channels = filters
        self.convs = nn.Sequential(*convs)
        self.pool = nn.AdaptiveAvgPool3d(pooled_size)
        self.features, width = _mlp(fc_widths, channels * pooled_size**3)
        # The +1 is the tumour fraction concatenated to the image features.
        self.joint, width = _mlp(joint_widths, width + 1)
        self.out = nn.Linear(width, 1)

    @staticmethod
    def conv_padding_for(
        bottleneck_size: Sequence[int], num_convs: int = 2, pooled_size: int = 2
    ) -> int:
        """Padding for the head's convolutions given the training bottleneck size.

        Valid convolutions (0) when they leave at least ``pooled_size`` voxels
        along every axis, as with the paper's 6³ bottleneck; otherwise "same" (1).

        Args:
            bottleneck_size: spatial size of the bottleneck features.
            num_convs: number of 3×3×3 convolutions in the head.
            pooled_size: edge of the pooling grid.

        Example:
            >>> TumourPresenceHead.conv_padding_for((6, 6, 6)), TumourPresenceHead.conv_padding_for((4, 4, 4))
            (0, 1)
        """
        smallest = min(bottleneck_size) - _VALID_SHRINK * num_convs
        return 0 if smallest >= pooled_size else 1

    def forward(self, bottleneck: torch.Tensor, tumour_probability: torch.Tensor) -> torch.Tensor:
        """Tumour-presence logit.

        Args:
            bottleneck: ``(B, in_channels, *b)`` features of the 1 mm U-Net.
            tumour_probability: ``(B, *spatial)`` or ``(B, 1, *spatial)`` sigmoid
                probability of the tumour channel of the 1 mm output.

        Returns:
            ``(B, 1)`` logit; ``torch.sigmoid`` gives the probability.
        """
        image_features = self.features(torch.flatten(self.pool(self.convs(bottleneck)), 1))
        tumour_fraction = tumour_probability.flatten(1).mean(dim=1, keepdim=True)
        joint = torch.cat([image_features, tumour_fraction.to(image_features.dtype)], dim=1)
        return self.out(self.joint(joint))
