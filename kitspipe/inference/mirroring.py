"""Test-time mirroring: the prediction averaged over mirrored copies of the case.

A network's errors on one view of a case are partly independent of its errors on the mirrored
view, so the mean of the two is a better estimate than either (nnU-Net averages over all eight
mirrorings of the three axes). kitspipe mirrors only along the axes a plan lists in
``inference.mirror_axes``, named in the canonical frame (``geometry.py``): ``z`` superior-
inferior, ``y`` anterior-posterior, ``x`` left-right. An axis belongs there only where a
mirrored abdomen still looks like something the network was trained on: left-right the two
kidneys mirror each other, while anterior-posterior puts the spine in front of the kidneys.
docs/results.md has the measurements behind the ``cpu`` preset's choice.

Every subset of the listed axes is one view (two axes: four views), and each view is a full
prediction, so the cost grows as 2^len(mirror_axes). The high- and low-resolution grids cover
the same extent (``resampling.plan_grids`` makes the fine grid exactly ``scale`` times the
coarse one), so one mirror maps both grids onto each other.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from kitspipe.resampling import Box

AXIS_INDEX = {"z": 0, "y": 1, "x": 2}

Mirroring = tuple[int, ...]


def mirrorings(axes: Sequence[str]) -> list[Mirroring]:
    """Every subset of the named axes as canonical array axes, the unmirrored view first."""
    indices = sorted(AXIS_INDEX[name] for name in axes)
    return [combo for count in range(len(indices) + 1) for combo in itertools.combinations(indices, count)]


def mirror(array: np.ndarray, mirroring: Mirroring, channels: int = 0, copy: bool = True) -> np.ndarray:
    """``array`` mirrored along the spatial axes of ``mirroring``, after ``channels`` leading
    non-spatial axes. Mirroring twice gives the array back. ``copy=False`` returns a view
    (enough to add it to another array)."""
    if not mirroring:
        return array
    flipped = np.flip(array, tuple(axis + channels for axis in mirroring))
    return np.ascontiguousarray(flipped) if copy else flipped


def mirror_box(box: Box, shape: Sequence[int], mirroring: Mirroring, alignment: int = 1) -> Box:
    """The same voxels as ``box`` of a grid of ``shape``, in the mirrored grid, its start along
    the mirrored axes rounded down to a multiple of ``alignment`` (the fine U-Net's pooling
    grid, on which a box gives the voxels a whole-grid pass gives)."""
    start, stop = list(box.start), list(box.stop)
    for axis in mirroring:
        start[axis], stop[axis] = shape[axis] - box.stop[axis], shape[axis] - box.start[axis]
        start[axis] -= start[axis] % alignment
    return Box(tuple(start), tuple(stop))
