"""Size arithmetic of the 3D U-Net (Çiçek et al. 2016), valid or same-padded.

The original 3D U-Net uses unpadded ("valid") 3×3×3 convolutions, so every
convolution removes one voxel on each side. Per resolution level it runs two
convolutions, then max-pools by 2 on the way down; on the way up it doubles the
size with a 2×2×2 transposed convolution, concatenates the centre-cropped skip
connection and runs two more convolutions. The output is therefore smaller than
the input by a fixed margin, and only some input sizes are usable: every size
that is max-pooled must be even, or the pooling grid would drop a voxel and the
output would no longer be centred on the input.

With three poolings (the paper's network) the input edge must be ``8k + 4`` and
the output edge is the input edge minus 88::

    >>> output_size(108, depth=3)
    20
    >>> margin(3)
    44

A U-Net may instead pad every convolution ("same" padding, as nnU-Net does):
then no convolution shrinks the map, an input edge only has to be divisible by
``2^depth``, and the output may be cropped by ``output_crop`` voxels per side to
drop the voxels that saw the most zero padding. :class:`UNetBorders` carries
these two choices; every function here takes it (default: valid, no crop)::

    >>> output_size(64, depth=2, borders=UNetBorders("same", output_crop=4))
    56

These functions act on one axis at a time; a 3D patch is valid when each of its
edges is. They are pure integer arithmetic so the planner and the tiler can use
them without building a network.
"""

from __future__ import annotations

from dataclasses import dataclass

PADDINGS = ("valid", "same")
# Every valid convolution removes this many voxels along an axis (one per side).
_SHRINK_PER_CONV = 2
# Kernel volumes that enter the operation count.
_CONV_KERNEL_VOLUME = 27
_UP_KERNEL_VOLUME = 8


@dataclass(frozen=True)
class UNetBorders:
    """How a U-Net treats the borders of its input.

    Args:
        padding: ``"valid"`` (the paper: unpadded convolutions, each removes a
            voxel per side) or ``"same"`` (zero-padded convolutions keep the size).
        output_crop: voxels removed from each side of the last decoder map
            before the 1×1×1 head; with ``"same"`` padding these are the voxels
            whose receptive field reached furthest into the zero padding.
    """

    padding: str = "valid"
    output_crop: int = 0

    def __post_init__(self) -> None:
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        if self.output_crop < 0:
            raise ValueError(f"output_crop must be >= 0, got {self.output_crop}")

    @property
    def shrink_per_conv(self) -> int:
        """Voxels a 3×3×3 convolution removes along an axis."""
        return _SHRINK_PER_CONV if self.padding == "valid" else 0

    @property
    def conv_padding(self) -> int:
        """The ``padding`` argument of ``nn.Conv3d``."""
        return 0 if self.padding == "valid" else 1


VALID = UNetBorders()


@dataclass(frozen=True)
class SizeTrace:
    """Edge lengths of the feature maps along one axis, level by level.

    All lists are indexed by resolution level ``l = 0 .. depth - 1`` (0 is the
    finest level), so ``skips[l]`` and ``upsampled[l]`` meet in the same decoder
    block.

    Args:
        level_inputs: size entering each encoder level (level 0: the input).
        skips: size after the convolutions of each encoder level; this map is
            both the skip connection and the input of the max-pooling.
        bottleneck: size after the convolutions of the lowest level.
        upsampled: size after the transposed convolution arriving at each level.
        decoder: size after the convolutions of each decoder level.
        output: size of the network output (``decoder[0]`` less the output crop).
    """

    level_inputs: list[int]
    skips: list[int]
    bottleneck: int
    upsampled: list[int]
    decoder: list[int]
    output: int


def _check_depth(depth: int, convs_per_level: int) -> None:
    if depth < 1:
        raise ValueError(f"U-Net depth must be at least 1 (number of poolings), got {depth}")
    if convs_per_level < 1:
        raise ValueError(f"convs_per_level must be at least 1, got {convs_per_level}")


def trace_sizes(
    input_size: int, depth: int, convs_per_level: int = 2, *, borders: UNetBorders = VALID
) -> SizeTrace:
    """Follow one axis of an input through the U-Net.

    Args:
        input_size: edge length of the input along this axis, in voxels.
        depth: number of max-pooling steps (3 in the paper).
        convs_per_level: 3×3×3 convolutions per level (2 in the paper).
        borders: padding and output crop (default: valid, no crop).

    Returns:
        The sizes of every intermediate feature map.

    Raises:
        ValueError: naming the input size, when a size to be pooled is odd or a
            feature map would become empty.

    Example:
        >>> t = trace_sizes(108, depth=3)
        >>> t.skips, t.bottleneck, t.output
        ([104, 48, 20], 6, 20)
    """
    _check_depth(depth, convs_per_level)
    shrink = borders.shrink_per_conv * convs_per_level

    def after_convs(size: int, where: str) -> int:
        result = size - shrink
        if result <= 0:
            raise ValueError(
                f"input size {input_size} is too small for a depth-{depth} U-Net: "
                f"the feature map at {where} would have size {result}"
            )
        return result

    level_inputs: list[int] = []
    skips: list[int] = []
    size = input_size
    for level in range(depth):
        level_inputs.append(size)
        size = after_convs(size, f"encoder level {level}")
        if size % 2:
            raise ValueError(
                f"input size {input_size} is invalid for a depth-{depth} U-Net: "
                f"encoder level {level} would max-pool an odd size {size}"
            )
        skips.append(size)
        size //= 2
    bottleneck = after_convs(size, "the bottleneck")

    upsampled = [0] * depth
    decoder = [0] * depth
    size = bottleneck
    for level in reversed(range(depth)):
        upsampled[level] = 2 * size
        size = after_convs(2 * size, f"decoder level {level}")
        decoder[level] = size
    output = decoder[0] - 2 * borders.output_crop
    if output <= 0:
        raise ValueError(
            f"input size {input_size} is too small for an output crop of {borders.output_crop}: "
            f"the output would have size {output}"
        )
    return SizeTrace(level_inputs, skips, bottleneck, upsampled, decoder, output=output)


def output_size(input_size: int, depth: int, convs_per_level: int = 2, *, borders: UNetBorders = VALID) -> int:
    """Output edge length of the U-Net for one input edge.

    Args:
        input_size: edge length of the input, in voxels.
        depth: number of max-pooling steps.
        convs_per_level: 3×3×3 convolutions per level.
        borders: padding and output crop.

    Raises:
        ValueError: naming the size, when it is not a valid input size.

    Example:
        >>> [output_size(s, 3) for s in (108, 116, 196, 268)]
        [20, 28, 108, 180]
        >>> output_size(64, depth=2)
        24
    """
    return trace_sizes(input_size, depth, convs_per_level, borders=borders).output


def is_valid_input_size(input_size: int, depth: int, convs_per_level: int = 2, *, borders: UNetBorders = VALID) -> bool:
    """Whether an input edge passes through the U-Net without an odd pooling or empty map.

    Args:
        input_size: edge length of the input, in voxels.
        depth: number of max-pooling steps.
        convs_per_level: 3×3×3 convolutions per level.
        borders: padding and output crop.
    """
    try:
        trace_sizes(input_size, depth, convs_per_level, borders=borders)
    except ValueError:
        return False
    return True


def margin(depth: int, convs_per_level: int = 2, *, borders: UNetBorders = VALID) -> int:
    """Voxels lost on each side of each axis: ``(input - output) / 2``.

    Each valid convolution at level ``l`` removes ``2^l`` input-resolution voxels
    per side; levels ``0 .. depth-1`` convolve twice (encoder and decoder), the
    bottleneck once, which sums to ``convs · (3 · 2^depth - 2)``. Same-padded
    convolutions remove nothing; the output crop adds to either.

    Args:
        depth: number of max-pooling steps.
        convs_per_level: 3×3×3 convolutions per level.
        borders: padding and output crop.

    Example:
        >>> margin(3), margin(2), margin(3, borders=UNetBorders("same", 8))
        (44, 20, 8)
    """
    _check_depth(depth, convs_per_level)
    per_conv = borders.shrink_per_conv // 2
    return per_conv * convs_per_level * (3 * 2**depth - 2) + borders.output_crop


def valid_input_sizes(
    depth: int, min_output: int = 1, max_input: int = 512, convs_per_level: int = 2, *, borders: UNetBorders = VALID
) -> list[int]:
    """All valid input edges up to ``max_input`` whose output is at least ``min_output``.

    Args:
        depth: number of max-pooling steps.
        min_output: smallest acceptable output edge.
        max_input: largest input edge to list.
        convs_per_level: 3×3×3 convolutions per level.
        borders: padding and output crop.

    Example:
        >>> valid_input_sizes(3, max_input=130)
        [92, 100, 108, 116, 124]
    """
    lowest = max(1, min_output + 2 * margin(depth, convs_per_level, borders=borders))
    return [s for s in range(lowest, max_input + 1) if is_valid_input_size(s, depth, convs_per_level, borders=borders)]


def input_size_for_output(output: int, depth: int, convs_per_level: int = 2, *, borders: UNetBorders = VALID) -> int:
    """Smallest valid input edge whose output edge is at least ``output``.

    Args:
        output: required output edge, in voxels (at least 1).
        depth: number of max-pooling steps.
        convs_per_level: 3×3×3 convolutions per level.
        borders: padding and output crop.

    Example:
        >>> input_size_for_output(20, 3), input_size_for_output(21, 3)
        (108, 116)
    """
    if output < 1:
        raise ValueError(f"required output size must be at least 1, got {output}")
    size = output + 2 * margin(depth, convs_per_level, borders=borders)
    # Valid sizes repeat with period 2^depth, so this loop is short.
    while not is_valid_input_size(size, depth, convs_per_level, borders=borders):
        size += 1
    return size


def _volume(sizes: tuple[int, ...]) -> int:
    result = 1
    for s in sizes:
        result *= s
    return result


def unet_forward_flops(
    input_size: tuple[int, int, int],
    in_channels: int,
    base_filters: int,
    depth: int,
    num_classes: int,
    extra_skip_channels: dict[int, int] | None = None,
    *,
    borders: UNetBorders = VALID,
) -> float:
    """Floating-point operations (2 × multiply-adds) of one forward pass of :class:`UNet3D`.

    Counts the 3×3×3 convolutions, the 2×2×2 transposed convolutions and the
    1×1×1 head for a batch of one; batch norm, ReLU, pooling and biases are
    ignored (they are a few per cent at most). Channel widths follow the
    original 3D U-Net: encoder level ``l`` goes to ``base·2^l`` then
    ``base·2^(l+1)`` channels, the bottleneck to ``base·2^depth`` then
    ``base·2^(depth+1)``, and decoder level ``l`` outputs ``base·2^(l+1)``.

    Args:
        input_size: input patch edges ``(z, y, x)``; each must be valid.
        in_channels: image channels.
        base_filters: filters of the first convolution (32 in the paper).
        depth: number of max-pooling steps.
        num_classes: output channels of the head.
        extra_skip_channels: channels concatenated to the skip of a level, as in
            :class:`UNet3D` (the dual network's masked-image branch).
        borders: padding and output crop.

    Example:
        >>> round(unet_forward_flops((108, 108, 108), 1, 32, 3, 2) / 1e9)
        262
    """
    extra = extra_skip_channels or {}
    traces = [trace_sizes(s, depth, borders=borders) for s in input_size]
    shrink = borders.shrink_per_conv

    def vol(pick) -> int:
        return _volume(tuple(pick(t) for t in traces))

    def conv(cin: int, cout: int, out_voxels: int) -> float:
        return 2.0 * cin * cout * _CONV_KERNEL_VOLUME * out_voxels

    flops = 0.0
    cin = in_channels
    for level in range(depth):
        mid, out = base_filters * 2**level, base_filters * 2 ** (level + 1)
        flops += conv(cin, mid, vol(lambda t: t.level_inputs[level] - shrink))
        flops += conv(mid, out, vol(lambda t: t.skips[level]))
        cin = out
    mid, out = base_filters * 2**depth, base_filters * 2 ** (depth + 1)
    flops += conv(cin, mid, vol(lambda t: t.bottleneck + shrink))
    flops += conv(mid, out, vol(lambda t: t.bottleneck))
    below = out
    for level in reversed(range(depth)):
        out = base_filters * 2 ** (level + 1)
        flops += 2.0 * below * below * _UP_KERNEL_VOLUME * vol(lambda t: t.upsampled[level] // 2)
        cat = below + out + extra.get(level, 0)
        flops += conv(cat, out, vol(lambda t: t.upsampled[level] - shrink))
        flops += conv(out, out, vol(lambda t: t.decoder[level]))
        below = out
    flops += 2.0 * below * num_classes * vol(lambda t: t.output)
    return flops
