"""Cutting a volume into tiles for a valid-convolution network, and stitching the results.

A valid-convolution network maps an input tile of edge ``in`` to a centred output tile of
edge ``out = in - 2 * margin`` (the paper's U-Net: 108 -> 20, margin 44). To predict a whole
volume, the volume is covered by non-overlapping output tiles; each is computed from the
input tile around it, read from the volume and padded with a constant where it reaches out.

Layout rule, per axis: output tiles start at 0, out, 2*out, ... and the last one is clipped
at the volume end (its input is padded past the volume). The last tile is *not* shifted back
to end at the border, since that would overlap the tile before it; clipping keeps the rule
"every voxel is written exactly once" without any bookkeeping. Nothing is lost by not
shifting: for a network whose result at a voxel depends only on the (2*margin + 1)
neighbourhood of that voxel (any valid-convolution network in eval mode), a written voxel
sees the same padded neighbourhood whichever tile computes it.

Example, one axis, volume 50, out 20, in 108 (margin 44)::

    output written  [0, 20)     [20, 40)    [40, 50)    <- the last one clipped to 10 voxels
    network input   [-44, 64)   [-24, 84)   [-4, 104)   <- padded outside [0, 50)

This module is pure numpy; the network is a callback, so torch is not imported here.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from kitspipe.networks.sizes import VALID, UNetBorders, is_valid_input_size, output_size
from kitspipe.resampling import Box

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class Tile:
    """One output tile and the network input it is computed from, in volume voxels (z, y, x).

    Args:
        output_start: first voxel of the tile's output in the volume.
        output_size: voxels written to the volume per axis; smaller than the network's output
            tile only for the last tile along an axis, which is clipped at the volume end.
        input_start: first voxel of the network input, ``output_start - margin``; negative,
            or reaching past the volume end, where the input has to be padded.
    """

    output_start: Triple
    output_size: Triple
    input_start: Triple

    @property
    def output_slices(self) -> tuple[slice, slice, slice]:
        """The region of the volume this tile writes."""
        return tuple(slice(s, s + n) for s, n in zip(self.output_start, self.output_size))

    def margin(self) -> Triple:
        """Voxels between the input start and the output start, per axis."""
        return tuple(o - i for o, i in zip(self.output_start, self.input_start))


def _triple(value: int | Sequence[int], name: str) -> Triple:
    values = (value,) * 3 if isinstance(value, (int, np.integer)) else tuple(value)
    if len(values) != 3 or any(int(v) != v for v in values):
        raise ValueError(f"{name} must be an int or three ints, got {value!r}")
    return tuple(int(v) for v in values)


def tile_margin(output_tile: int | Sequence[int], input_tile: int | Sequence[int]) -> Triple:
    """Per-axis margin ``(in - out) / 2`` of a valid-convolution network.

    Raises:
        ValueError: if a size is not positive, ``in < out``, or ``in - out`` is odd (the
            output would not be centred on the input).
    """
    out, inp = _triple(output_tile, "output_tile"), _triple(input_tile, "input_tile")
    if min(out) < 1 or any(i < o or (i - o) % 2 for i, o in zip(inp, out)):
        raise ValueError(f"input tile {inp} cannot give a centred output tile {out}")
    return tuple((i - o) // 2 for i, o in zip(inp, out))


def plan_tiles(
    volume_shape: Sequence[int],
    output_tile: int | Sequence[int],
    input_tile: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
) -> list[Tile]:
    """Non-overlapping written regions covering every voxel of the volume exactly once.

    Tiles are listed in C order (z slowest). A volume smaller than one tile gets a single,
    clipped tile per axis. With ``stride`` smaller than the output tile, each tile writes only
    its first ``stride`` output voxels: a U-Net with max-pooling gives a voxel the same value
    in every tile only if all tile inputs start on the same pooling grid, i.e. at offsets that
    are multiples of 2^depth (``pooling_aligned_stride``).

    Args:
        volume_shape: spatial shape (z, y, x) of the volume.
        output_tile: network output edge(s).
        input_tile: network input edge(s); ``input_tile - output_tile`` must be even.
        stride: distance between tile starts (default: the output tile, no recomputation).

    Example::

        plan_tiles((50, 20, 20), 20, 108)
        # -> output starts z = 0, 20, 40 (the last with output_size 10), input starts z - 44
    """
    shape = _triple(volume_shape, "volume_shape")
    if min(shape) < 1:
        raise ValueError(f"volume_shape must be positive, got {shape}")
    out = _triple(output_tile, "output_tile")
    step = out if stride is None else _triple(stride, "stride")
    if any(st < 1 or st > o for st, o in zip(step, out)):
        raise ValueError(f"stride {step} must lie within 1..output tile {out}")
    margin = tile_margin(out, input_tile)
    per_axis = [_axis_layout(n, o, st) for n, o, st in zip(shape, out, step)]
    tiles = []
    for parts in itertools.product(*per_axis):
        start = tuple(p[0] for p in parts)
        size = tuple(p[1] for p in parts)
        tiles.append(Tile(start, size, tuple(s - m for s, m in zip(start, margin))))
    return tiles


def _axis_layout(n: int, out: int, stride: int) -> list[tuple[int, int]]:
    """(start, written size) along one axis: starts on the stride grid, and the tile whose
    output reaches the end of the axis writes all of it, so no tile is added just to fill
    the gap between a rounded-down stride and the output size."""
    layout = []
    start = 0
    while True:
        if start + out >= n:
            layout.append((start, n - start))
            return layout
        layout.append((start, stride))
        start += stride


def pooling_aligned_stride(output_tile: int | Sequence[int], depth: int) -> Triple:
    """The largest multiple of 2^depth not above the output tile, per axis (at least 2^depth
    would exceed a tiny output, so then the output itself)."""
    period = 2**depth
    return tuple(o // period * period if o >= period else o for o in _triple(output_tile, "output_tile"))


def extract_input(
    volume: np.ndarray,
    tile: Tile,
    input_tile: int | Sequence[int],
    pad_value: float | Sequence[float] = 0.0,
) -> np.ndarray:
    """The network input of one tile, padded with ``pad_value`` outside the volume.

    Args:
        volume: array whose last three axes are spatial (z, y, x); leading axes (channels)
            are carried along.
        tile: the tile whose input is wanted.
        input_tile: network input edge(s).
        pad_value: a scalar, or one value per leading index (e.g. per channel), broadcast
            over the spatial axes.

    Returns:
        a new array of shape ``volume.shape[:-3] + input_tile`` and the volume's dtype.
    """
    inp = _triple(input_tile, "input_tile")
    spatial = volume.shape[-3:]
    patch = np.empty(volume.shape[:-3] + inp, dtype=volume.dtype)
    pad = np.asarray(pad_value, dtype=volume.dtype)
    patch[...] = pad.reshape(pad.shape + (1, 1, 1))
    source, target = [], []
    for start, n, size in zip(tile.input_start, inp, spatial):
        low = max(start, 0)
        high = max(min(start + n, size), low)
        source.append(slice(low, high))
        target.append(slice(low - start, high - start))
    patch[(Ellipsis, *target)] = volume[(Ellipsis, *source)]
    return patch


class TileStitcher:
    """Accumulates tile outputs into one (K, z, y, x) array and checks each voxel is written once.

    Args:
        volume_shape: spatial shape (z, y, x) of the full volume.
        n_channels: K, the number of network output channels.
        dtype: dtype of the stitched array.
    """

    def __init__(self, volume_shape: Sequence[int], n_channels: int, dtype: np.dtype | type = np.float32):
        self.volume_shape = _triple(volume_shape, "volume_shape")
        self.array = np.zeros((n_channels, *self.volume_shape), dtype=dtype)
        # One flag per voxel: cheap next to the K-channel float array, and it turns a wrong
        # tile plan into an error instead of a silently half-filled prediction.
        self._written = np.zeros(self.volume_shape, dtype=bool)

    def add(self, tile: Tile, output: np.ndarray) -> None:
        """Write the first ``tile.output_size`` voxels of ``output`` (K, *output_tile) in place."""
        if output.ndim != 4 or output.shape[0] != self.array.shape[0]:
            raise ValueError(f"tile output must be (K={self.array.shape[0]}, z, y, x), got {output.shape}")
        if any(o < n for o, n in zip(output.shape[1:], tile.output_size)):
            raise ValueError(f"tile output {output.shape[1:]} is smaller than its region {tile.output_size}")
        region = tile.output_slices
        if self._written[region].any():
            raise ValueError(f"tile at {tile.output_start} overlaps a tile written before")
        crop = tuple(slice(0, n) for n in tile.output_size)
        self.array[(slice(None), *region)] = output[(slice(None), *crop)]
        self._written[region] = True

    def result(self) -> np.ndarray:
        """The stitched array; raises ValueError if some voxel was never written."""
        missing = int(self._written.size - np.count_nonzero(self._written))
        if missing:
            raise ValueError(f"{missing} voxels were not covered by any tile")
        return self.array


def stitch(
    outputs: Sequence[np.ndarray],
    tiles: Sequence[Tile],
    volume_shape: Sequence[int],
    n_channels: int,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Stitch per-tile outputs (K, *output_tile), in the order of ``tiles``, into (K, z, y, x)."""
    if len(outputs) != len(tiles):
        raise ValueError(f"{len(outputs)} outputs for {len(tiles)} tiles")
    stitcher = TileStitcher(volume_shape, n_channels, dtype)
    for tile, output in zip(tiles, outputs):
        stitcher.add(tile, output)
    return stitcher.result()


def predict_tiled(
    volume_channels: np.ndarray,
    tiles: Sequence[Tile],
    input_tile: int | Sequence[int],
    run_network: Callable[[np.ndarray], np.ndarray],
    *,
    pad_value: float | Sequence[float] = 0.0,
    batch_size: int | None = None,
    progress: bool | None = None,
    dtype: np.dtype | type = np.float32,
    region: Box | None = None,
) -> np.ndarray:
    """Run a valid-convolution network tile by tile and stitch its outputs.

    Args:
        volume_channels: input volume (C, z, y, x).
        tiles: from :func:`plan_tiles` for this volume's spatial shape, or for ``region.shape``.
        input_tile: network input edge(s) used to plan ``tiles``.
        run_network: with ``batch_size=None``, called once per tile with (C, *input_tile) and
            returns (K, *output_tile); with ``batch_size=B``, called with up to B tiles stacked
            as (n, C, *input_tile) and returns (n, K, *output_tile).
        pad_value: value(s) outside the volume, scalar or one per channel.
        batch_size: see ``run_network``.
        progress: show a tqdm bar; ``None`` shows it only when stderr is a terminal.
        dtype: dtype of the stitched (K, z, y, x) result.
        region: predict only this box of the volume: ``tiles`` are planned for its shape and
            read their inputs (context included) from the whole volume at its start; the
            result has the box's shape.
    """
    if volume_channels.ndim != 4:
        raise ValueError(f"volume_channels must be (C, z, y, x), got {volume_channels.shape}")
    if not tiles:
        raise ValueError("no tiles to predict")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    inp = _triple(input_tile, "input_tile")
    offset = (0, 0, 0) if region is None else region.start
    shape = volume_channels.shape[1:] if region is None else region.shape
    step = batch_size or 1
    show = sys.stderr.isatty() if progress is None else progress
    stitcher: TileStitcher | None = None
    with tqdm(total=len(tiles), desc="tiles", unit="tile", disable=not show) as bar:
        for first in range(0, len(tiles), step):
            group = tiles[first : first + step]
            inputs = [extract_input(volume_channels, _shifted(tile, offset), inp, pad_value) for tile in group]
            if batch_size is None:
                outputs = [np.asarray(run_network(inputs[0]))]
            else:
                outputs = list(np.asarray(run_network(np.stack(inputs))))
            if len(outputs) != len(group):
                raise ValueError(f"network returned {len(outputs)} outputs for {len(group)} tiles")
            for tile, output in zip(group, outputs):
                expected = tuple(i - 2 * m for i, m in zip(inp, tile.margin()))
                if output.ndim != 4 or output.shape[1:] != expected:
                    raise ValueError(f"network output {output.shape} is not (K, {expected})")
                if stitcher is None:
                    stitcher = TileStitcher(shape, output.shape[0], dtype)
                stitcher.add(tile, output)
            bar.update(len(group))
    return stitcher.result()


def _shifted(tile: Tile, offset: Triple) -> Tile:
    """The same tile in the coordinates of a volume in which its region starts at ``offset``."""
    return Tile(tuple(s + o for s, o in zip(tile.output_start, offset)), tile.output_size,
                tuple(s + o for s, o in zip(tile.input_start, offset)))


def _valid_output(input_size: int, depth: int, borders: UNetBorders = VALID) -> int | None:
    """Output edge of the U-Net for ``input_size``, or None if that input is not valid."""
    if input_size < 1 or not is_valid_input_size(input_size, depth, borders=borders):
        return None
    return output_size(input_size, depth, borders=borders)


def _smallest_valid_input(at_least: int, depth: int, borders: UNetBorders = VALID) -> int:
    size = max(at_least, 1)
    while _valid_output(size, depth, borders) is None:
        size += 1
    return size


def _input_for_output(output_needed: int, depth: int, at_least: int, borders: UNetBorders = VALID) -> int:
    """Smallest valid input, not below ``at_least``, whose output is at least ``output_needed``."""
    size = _smallest_valid_input(at_least, depth, borders)
    while _valid_output(size, depth, borders) < output_needed:
        size = _smallest_valid_input(size + 1, depth, borders)
    return size


def fast_input_tile(
    volume_shape: Sequence[int],
    depth: int,
    max_input_voxels: int,
    min_input: int | Sequence[int] | None = None,
    *,
    borders: UNetBorders = VALID,
) -> Triple:
    """A large valid input tile for fast whole-volume inference within a memory budget.

    Large output tiles pay the network's margin far less often (depth 3: 20^3 outputs from
    108^3 inputs repeat the work ~157 times, 180^3 from 268^3 ~3.3 times). Steps:

    1. per axis, the smallest valid input whose output covers the whole axis;
    2. while the tile has more than ``max_input_voxels`` voxels, shrink the largest edge to
       the next valid size (near-cubic tiles waste the least margin), never below
       ``min_input``; the minimum is returned even if it exceeds the budget, since the
       network's training patch is known to fit;
    3. per axis, keep the number of tiles but take the smallest input that still needs no
       more of them (a 200-voxel axis with 180-voxel outputs becomes two ~100-voxel tiles).

    Args:
        volume_shape: spatial shape (z, y, x) of the volume.
        depth: number of poolings of the U-Net.
        max_input_voxels: budget for one input tile, in voxels.
        min_input: smallest input edge(s) allowed, rounded up to a valid size; ``None`` means
            the smallest valid input.
        borders: the U-Net's padding and output crop.

    Example::

        fast_input_tile((300, 300, 300), depth=3, max_input_voxels=268**3, min_input=108)
        # -> (244, 244, 244): two 156-voxel outputs per axis cover 300
    """
    shape = _triple(volume_shape, "volume_shape")
    if max_input_voxels < 1 or depth < 0:
        raise ValueError("max_input_voxels must be positive and depth not negative")
    lowest = tuple(_smallest_valid_input(m, depth, borders) for m in _triple(min_input or 1, "min_input"))
    tile = [_input_for_output(n, depth, low, borders) for n, low in zip(shape, lowest)]
    while math.prod(tile) > max_input_voxels:
        shrinkable = [axis for axis in range(3) if tile[axis] > lowest[axis]]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda a: tile[a])
        smaller = tile[axis] - 1
        while _valid_output(smaller, depth, borders) is None:
            smaller -= 1
        tile[axis] = max(smaller, lowest[axis])
    for axis in range(3):
        n_tiles = math.ceil(shape[axis] / _valid_output(tile[axis], depth, borders))
        tile[axis] = _input_for_output(math.ceil(shape[axis] / n_tiles), depth, lowest[axis], borders)
    return tuple(tile)
