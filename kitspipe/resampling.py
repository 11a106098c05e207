"""Resampling between a case's own grid and the plan's isotropic grids.

Both plan grids (e.g. 1 mm and 4 mm) are laid over the same physical box, the body's
bounding box rounded up to whole low-resolution voxels, starting at the same corner. One
low-resolution voxel then covers exactly ``scale``³ high-resolution voxels, so a patch
centre in mm maps to integer voxel positions on both grids and the two inputs of the dual
network share their centre exactly (paper 2.3).

Images use cubic B-spline interpolation and labels nearest neighbour (paper 2.2);
probabilities go back to the original grid with linear interpolation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from kitspipe.geometry import CanonicalGeometry

AIR_HU = -1000.0


@dataclass(frozen=True)
class Box:
    """A box of a canonical grid in voxel indices, ``start`` inclusive, ``stop`` exclusive."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    def to_json(self) -> dict:
        return {"start": list(self.start), "stop": list(self.stop)}

    @classmethod
    def from_json(cls, data: dict) -> "Box":
        return cls(tuple(int(v) for v in data["start"]), tuple(int(v) for v in data["stop"]))


def world_position(grid: CanonicalGeometry, index_zyx: np.ndarray) -> np.ndarray:
    """LPS (x, y, z) world position of a (possibly fractional) canonical (z, y, x) index."""
    direction = np.asarray(grid.direction).reshape(3, 3)
    offsets = (np.asarray(index_zyx, dtype=float) * np.asarray(grid.spacing))[::-1]
    return np.asarray(grid.origin) + direction @ offsets


def sub_grid(grid: CanonicalGeometry, box: Box) -> CanonicalGeometry:
    """The grid of ``array[box.slices()]``."""
    origin = world_position(grid, np.asarray(box.start))
    return CanonicalGeometry(box.shape, grid.spacing, tuple(float(v) for v in origin), grid.direction)


def plan_grids(grid: CanonicalGeometry, box: Box, high_spacing: tuple[float, float, float],
               scale: int) -> tuple[CanonicalGeometry, CanonicalGeometry]:
    """High- and low-resolution grids over the physical extent of ``box`` in ``grid``.

    The extent is rounded up to whole low-resolution voxels; both grids start at the box's
    outer corner (half a source voxel before the first voxel centre).
    """
    shapes_low, shapes_high, starts_high, starts_low = [], [], [], []
    for axis in range(3):
        source_spacing = grid.spacing[axis]
        low_spacing = high_spacing[axis] * scale
        extent = box.shape[axis] * source_spacing
        n_low = max(1, math.ceil(extent / low_spacing - 1e-6))
        shapes_low.append(n_low)
        shapes_high.append(n_low * scale)
        corner = box.start[axis] - 0.5  # in source voxel units
        starts_high.append(corner + 0.5 * high_spacing[axis] / source_spacing)
        starts_low.append(corner + 0.5 * low_spacing / source_spacing)
    high_origin = world_position(grid, np.asarray(starts_high))
    low_origin = world_position(grid, np.asarray(starts_low))
    high = CanonicalGeometry(tuple(shapes_high), tuple(float(s) for s in high_spacing),
                             tuple(float(v) for v in high_origin), grid.direction)
    low = CanonicalGeometry(tuple(shapes_low), tuple(float(s) * scale for s in high_spacing),
                            tuple(float(v) for v in low_origin), grid.direction)
    return high, low


def _reference(grid: CanonicalGeometry) -> sitk.Image:
    reference = sitk.Image([int(v) for v in grid.shape[::-1]], sitk.sitkUInt8)
    reference.SetSpacing(tuple(float(s) for s in grid.spacing[::-1]))
    reference.SetOrigin(grid.origin)
    reference.SetDirection(grid.direction)
    return reference


def resample(array: np.ndarray, source: CanonicalGeometry, target: CanonicalGeometry, interpolation: str,
             default: float = 0.0, dtype: np.dtype = np.float32) -> np.ndarray:
    """Resample a canonical array from ``source`` onto ``target``.

    Args:
        interpolation: ``cubic`` (B-spline, images), ``linear`` (probabilities) or ``nearest`` (labels).
        default: value outside the source volume (air for CT, 0 for labels and probabilities).
    """
    return sitk.GetArrayFromImage(_resampled_image(array, source, target, interpolation, default)).astype(
        dtype, copy=False)


def _resampled_image(array: np.ndarray, source: CanonicalGeometry, target: CanonicalGeometry, interpolation: str,
                     default: float) -> sitk.Image:
    method = {"cubic": sitk.sitkBSpline, "linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}[interpolation]
    work_dtype = np.float32 if interpolation != "nearest" else array.dtype
    image = source.to_sitk(np.ascontiguousarray(array, dtype=work_dtype))
    return sitk.Resample(image, _reference(target), sitk.Transform(), method, float(default), image.GetPixelID())


# Source rows read beyond those a target slab's interpolation kernel touches. Cubic B-spline
# coefficients come from a recursive prefilter whose reach decays as |z1|^n with
# z1 = sqrt(3) - 2 = -0.268, so a slab cut 10 rows away changes them by under 2e-6 of the
# local contrast (0.003 HU for 1500 HU): below the 0.5 HU that int16 storage rounds away.
SLAB_CONTEXT_ROWS = {"cubic": 12, "linear": 2, "nearest": 2}
# Sources up to this many voxels are resampled whole by default: their working memory is tens
# of MiB, and slabs would only add context rows (and move a rare rounding tie by 1 HU).
WHOLE_VOLUME_VOXELS = 4_000_000


def continuous_index(grid: CanonicalGeometry, world: np.ndarray) -> np.ndarray:
    """The (fractional) canonical (z, y, x) index of an LPS world position: the inverse of
    ``world_position``."""
    direction = np.asarray(grid.direction).reshape(3, 3)
    offsets = np.linalg.solve(direction, np.asarray(world, dtype=float) - np.asarray(grid.origin))
    return offsets[::-1] / np.asarray(grid.spacing)


def resample_in_slabs(array: np.ndarray, source: CanonicalGeometry, target: CanonicalGeometry,
                      interpolation: str, default: float = 0.0, dtype: np.dtype = np.float32,
                      finish: Callable[[np.ndarray], np.ndarray] | None = None,
                      slab_voxels: int | None = None) -> np.ndarray:
    """``resample`` one slab of the target grid at a time, each from the source rows it needs.

    A whole-volume resample holds a float32 copy of the source, SimpleITK's double B-spline
    coefficients of all of it and the float32 result at once: 3-5 times the source on top of
    the source itself. Slab by slab, that working memory is bounded by ``slab_voxels`` source
    voxels, and the result is written straight into an array of ``dtype``.

    Args:
        finish: applied to each slab's float result before it is stored (clip and round, say);
            the array it gets is a read-only view of SimpleITK's buffer, freed after the slab.
        slab_voxels: source voxels read per slab, context rows included (at least one row of
            target voxels is produced per slab, whatever this says). Default: whole below
            ``WHOLE_VOLUME_VOXELS``, else an eighth of the source, but no fewer than four times
            the context rows, so that they cost at most as much again as the rows a slab needs.

    The slabs run along the source axis with the most rows, where the context rows cost least.
    Grids with different directions, and by default sources of at most ``WHOLE_VOLUME_VOXELS``,
    are resampled whole.
    """
    out = np.empty(target.shape, dtype=dtype)
    work_dtype = array.dtype if interpolation == "nearest" else np.float32
    small = slab_voxels is None and array.size <= WHOLE_VOLUME_VOXELS
    if small or not np.allclose(source.direction, target.direction, atol=1e-9):
        values = resample(array, source, target, interpolation, default, dtype=work_dtype)
        out[...] = finish(values) if finish else values
        return out
    axis = int(np.argmax(array.shape))
    first = continuous_index(source, world_position(target, np.zeros(3)))[axis]
    step = target.spacing[axis] / source.spacing[axis]
    context = SLAB_CONTEXT_ROWS[interpolation]
    row_voxels = math.prod(n for a, n in enumerate(array.shape) if a != axis)
    if slab_voxels is None:
        source_rows = max(4 * context, array.shape[axis] // 8)
    else:
        source_rows = slab_voxels / row_voxels
    rows = max(1, int((source_rows - 2 * context) / max(step, 1e-9)))
    for t0 in range(0, target.shape[axis], rows):
        t1 = min(t0 + rows, target.shape[axis])
        s0 = max(0, math.floor(first + t0 * step) - context)
        s1 = min(array.shape[axis], math.ceil(first + (t1 - 1) * step) + context + 1)
        target_box = _along(axis, t0, t1, target.shape)
        if s1 <= s0:  # the slab lies wholly outside the source
            image, values = None, np.full(target_box.shape, default, dtype=work_dtype)
        else:
            source_box = _along(axis, s0, s1, array.shape)
            image = _resampled_image(array[source_box.slices()], sub_grid(source, source_box),
                                     sub_grid(target, target_box), interpolation, default)
            # A view of SimpleITK's buffer, valid while ``image`` lives: one copy fewer per slab.
            values = sitk.GetArrayViewFromImage(image)
        out[target_box.slices()] = finish(values) if finish else values
        del image, values
    return out


def _along(axis: int, start: int, stop: int, shape: Sequence[int]) -> Box:
    """The box of rows ``start:stop`` along ``axis`` and everything along the other axes."""
    return Box(tuple(start if a == axis else 0 for a in range(3)), tuple(stop if a == axis else n for a, n in enumerate(shape)))


def mask_bounding_box(mask: np.ndarray, margins: Sequence[int] | None = None) -> Box | None:
    """The smallest box holding every true voxel of ``mask``, widened by ``margins`` voxels per
    axis and clipped to the grid; None when the mask is empty."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    start, stop = [], []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        margin = 0 if margins is None else int(margins[axis])
        start.append(max(int(present[0]) - margin, 0))
        stop.append(min(int(present[-1]) + 1 + margin, mask.shape[axis]))
    return Box(tuple(start), tuple(stop))


def body_box(image_hu: np.ndarray, label: np.ndarray | None = None, threshold_hu: float = -500.0) -> Box:
    """Bounding box of everything denser than air (and of every labelled voxel)."""
    mask = image_hu > threshold_hu
    if label is not None:
        mask |= label > 0
    return mask_bounding_box(mask) or Box((0, 0, 0), tuple(image_hu.shape))
