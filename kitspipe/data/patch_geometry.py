"""The geometry of a training patch pair, and reading boxes of a memory-mapped case.

A training sample of the dual-resolution network (paper 2.3) is a *pair* of patches that
share their centre: a high-resolution input of ``P_h`` voxels and a low-resolution input of
``P_l`` voxels, with targets on the centred output regions of both branches (``O_h`` and
``O_l`` voxels). Both plan grids start at the same physical corner and one low voxel covers
exactly ``scale``³ high voxels, so a pair is fixed by the integer start ``s_l`` of its
low-resolution patch; per axis, the other boxes follow as

    high input start    s_h = scale·s_l + (scale·P_l − P_h) / 2
    high output start   s_h + (P_h − O_h) / 2
    low output start    s_l + (P_l − O_l) / 2

(every difference is even because valid-convolution patch sizes are even). Patch pairs are
positioned on low voxels only; that is what keeps the two resolutions exactly aligned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kitspipe.errors import PlanError
from kitspipe.plans import Plans

Triple = tuple[int, int, int]
TripleF = tuple[float, float, float]


def read_patch(array: np.ndarray, start: Sequence[int], size: Sequence[int], pad_value: float) -> np.ndarray:
    """A box of a 3D array, filled with ``pad_value`` where it reaches outside the array.

    Only the part of the box inside the array is indexed, so on a memory-mapped array the
    read touches just the pages of that slab.

    Args:
        array: a (z, y, x) array, typically a memory map.
        start: first voxel of the box per axis; may be negative.
        size: edge lengths of the box.
        pad_value: value outside the array (air for images, 0 for labels).

    Returns:
        A new array of shape ``size`` and the dtype of ``array``.
    """
    start = tuple(int(s) for s in start)
    size = tuple(int(n) for n in size)
    out = np.full(size, pad_value, dtype=array.dtype)
    source, target = [], []
    for first, length, extent in zip(start, size, array.shape):
        low, high = max(first, 0), min(first + length, extent)
        if high <= low:
            return out
        source.append(slice(low, high))
        target.append(slice(low - first, high - first))
    out[tuple(target)] = array[tuple(source)]
    return out


@dataclass(frozen=True)
class PairGeometry:
    """Patch and output sizes of both branches, and how their boxes follow from ``s_l``.

    Args:
        scale: low spacing / high spacing (an integer).
        high_input, high_output, low_input, low_output: edge lengths in voxels per axis.
        high_spacing_mm, low_spacing_mm: voxel spacing of the two grids.
    """

    scale: int
    high_input: Triple
    high_output: Triple
    low_input: Triple
    low_output: Triple
    high_spacing_mm: TripleF
    low_spacing_mm: TripleF

    def __post_init__(self) -> None:
        for axis in range(3):
            if (self.scale * self.low_input[axis] - self.high_input[axis]) % 2:
                raise ValueError(f"scale·low_input − high_input must be even to share a centre, axis {axis}")
            for name in ("high", "low"):
                inp, out = getattr(self, f"{name}_input")[axis], getattr(self, f"{name}_output")[axis]
                if out > inp or (inp - out) % 2:
                    raise ValueError(f"{name} output {out} cannot be centred in input {inp}, axis {axis}")

    @classmethod
    def from_plans(cls, plans: Plans) -> "PairGeometry":
        """The geometry of a resolved plan.

        Raises:
            PlanError: if a patch size is still null.
        """
        for branch in ("high", "low"):
            for name in ("input_patch", "output_patch"):
                if getattr(getattr(plans, branch), name) is None:
                    raise PlanError(f"{branch}.{name}: not resolved (run `kitspipe plan`)")
        return cls(plans.scale, tuple(plans.high.input_patch), tuple(plans.high.output_patch),
                   tuple(plans.low.input_patch), tuple(plans.low.output_patch),
                   tuple(plans.high.spacing_mm), tuple(plans.low.spacing_mm))

    def high_start(self, low_start: Sequence[int]) -> Triple:
        """Start of the high input that shares its centre with the low input at ``low_start``."""
        return tuple(self.scale * s + (self.scale * pl - ph) // 2
                     for s, pl, ph in zip(low_start, self.low_input, self.high_input))

    def high_output_start(self, low_start: Sequence[int]) -> Triple:
        return tuple(s + (p - o) // 2 for s, p, o in zip(self.high_start(low_start), self.high_input, self.high_output))

    def low_output_start(self, low_start: Sequence[int]) -> Triple:
        return tuple(int(s) + (p - o) // 2 for s, p, o in zip(low_start, self.low_input, self.low_output))

    def low_start_centred_on(self, high_voxel: Sequence[int]) -> Triple:
        """The low start whose pair centre is nearest to a high-resolution voxel centre."""
        # Pair centre in high voxel coordinates: scale·s_l + scale·P_l/2 − 1/2.
        return tuple(math.floor((v + 0.5 - self.scale * pl / 2) / self.scale + 0.5)
                     for v, pl in zip(high_voxel, self.low_input))


@dataclass(frozen=True, eq=False)
class Window:
    """One box to read for a patch pair, centred on the pair's common centre.

    Args:
        array: the whole-case array (memory map) the box is read from.
        start: first voxel of the box.
        size: edge lengths of the box.
        spacing_mm: voxel spacing of ``array``.
        pad_value: value outside the array.
        is_label: labels are resampled with nearest neighbour and get no intensity changes.
    """

    array: np.ndarray
    start: Triple
    size: Triple
    spacing_mm: TripleF
    pad_value: float
    is_label: bool

    def read(self) -> np.ndarray:
        """The box without any transform."""
        return read_patch(self.array, self.start, self.size, self.pad_value)

    def centre_index(self) -> np.ndarray:
        """The box centre in (fractional) voxel indices of ``array``."""
        return np.asarray(self.start, dtype=float) + (np.asarray(self.size, dtype=float) - 1.0) / 2.0
