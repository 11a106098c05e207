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
    method = {"cubic": sitk.sitkBSpline, "linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}[interpolation]
    work_dtype = np.float32 if interpolation != "nearest" else array.dtype
    image = source.to_sitk(np.ascontiguousarray(array, dtype=work_dtype))
    resampled = sitk.Resample(image, _reference(target), sitk.Transform(), method, float(default),
                              image.GetPixelID())
    return sitk.GetArrayFromImage(resampled).astype(dtype, copy=False)


def body_box(image_hu: np.ndarray, label: np.ndarray | None = None, threshold_hu: float = -500.0) -> Box:
    """Bounding box of everything denser than air (and of every labelled voxel)."""
    mask = image_hu > threshold_hu
    if label is not None:
        mask |= label > 0
    if not mask.any():
        return Box((0, 0, 0), tuple(image_hu.shape))
    start, stop = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        start.append(int(present[0]))
        stop.append(int(present[-1]) + 1)
    return Box(tuple(start), tuple(stop))
