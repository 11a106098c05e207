"""Image geometry and the canonical array orientation used inside kitspipe.

Files arrive in any orientation (KiTS19 stores I-P-L with a signed-permutation affine;
other sources use RAS, LPS or oblique directions). Inside kitspipe every volume is a numpy
array with axes (z, y, x) in the LPS world frame: the last axis runs towards the patient's
left, the middle one towards posterior, the first one towards superior. Turning a file into
that frame is a pure axis permutation plus flips, chosen from the direction matrix, so it is
exact and exactly invertible: predictions are written back on the input's own grid.
An oblique direction keeps its residual rotation in ``CanonicalGeometry.direction``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

Vector3 = tuple[float, float, float]


@dataclass(frozen=True)
class Geometry:
    """The grid of an image as stored in its file, in SimpleITK (x-fastest index) order."""

    size: tuple[int, int, int]
    spacing: Vector3
    origin: Vector3
    direction: tuple[float, ...]  # 3x3 row-major: world rows, index columns

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(
            size=tuple(int(v) for v in image.GetSize()),
            spacing=tuple(float(v) for v in image.GetSpacing()),
            origin=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def to_json(self) -> dict:
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_json(cls, data: dict) -> "Geometry":
        return cls(
            size=tuple(int(v) for v in data["size"]),
            spacing=tuple(float(v) for v in data["spacing"]),
            origin=tuple(float(v) for v in data["origin"]),
            direction=tuple(float(v) for v in data["direction"]),
        )

    def matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def differences(self, other: "Geometry", spacing_tol: float = 1e-4, origin_tol_mm: float = 1e-3,
                    direction_tol: float = 1e-4) -> list[str]:
        """Describe how ``other`` differs from this grid; an empty list means the same grid.

        Tolerances absorb float32 storage noise (0.705078125 vs 0.7050781 passes) but not a
        real shift or flip.
        """
        found = []
        if self.size != other.size:
            found.append(f"size {other.size} vs {self.size}")
        if not np.allclose(other.spacing, self.spacing, rtol=spacing_tol, atol=0):
            found.append(f"spacing {_fmt(other.spacing)} vs {_fmt(self.spacing)}")
        if not np.allclose(other.origin, self.origin, rtol=0, atol=max(origin_tol_mm, 1e-3 * min(self.spacing))):
            found.append(f"origin {_fmt(other.origin)} vs {_fmt(self.origin)}")
        if not np.allclose(other.direction, self.direction, rtol=0, atol=direction_tol):
            found.append(f"direction {_fmt(other.direction)} vs {_fmt(self.direction)}")
        return found


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v + 0.0:.6g}" for v in values) + ")"


@dataclass(frozen=True)
class Reorientation:
    """How a file's numpy array maps onto the canonical (z, y, x) array.

    ``transpose`` is applied to ``sitk.GetArrayFromImage`` output, then the canonical axes in
    ``flip`` are reversed.
    """

    transpose: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        out = np.transpose(array, self.transpose + tuple(range(3, array.ndim)))
        axes = tuple(a for a in range(3) if self.flip[a])
        return np.ascontiguousarray(np.flip(out, axes) if axes else out)

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """Inverse of ``to_canonical`` for arrays whose first three axes are spatial."""
        axes = tuple(a for a in range(3) if self.flip[a])
        out = np.flip(array, axes) if axes else array
        inverse = tuple(int(i) for i in np.argsort(self.transpose))
        return np.ascontiguousarray(np.transpose(out, inverse + tuple(range(3, array.ndim))))


@dataclass(frozen=True)
class CanonicalGeometry:
    """The grid of a canonical (z, y, x) array: spacing/origin in mm, direction columns z, y, x."""

    shape: tuple[int, int, int]
    spacing: Vector3
    origin: Vector3  # LPS world position of voxel (0, 0, 0), (x, y, z) world order
    direction: tuple[float, ...]  # 3x3 row-major, columns are the world directions of axes x, y, z

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    @classmethod
    def from_json(cls, data: dict) -> "CanonicalGeometry":
        return cls(tuple(int(v) for v in data["shape"]), tuple(float(v) for v in data["spacing"]),
                   tuple(float(v) for v in data["origin"]), tuple(float(v) for v in data["direction"]))

    def to_sitk(self, array: np.ndarray) -> sitk.Image:
        """Wrap a canonical (z, y, x) array as a SimpleITK image on this grid."""
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(float(s) for s in self.spacing[::-1]))
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def physical_extent_mm(self) -> Vector3:
        return tuple(float(n * s) for n, s in zip(self.shape, self.spacing))


def reorientation_for(geometry: Geometry) -> Reorientation:
    """Find the permutation and flips that bring a file's array into canonical (z, y, x) order."""
    matrix = geometry.matrix()
    index_axis_for_world = []
    signs = []
    for world_axis in range(3):
        column = int(np.argmax(np.abs(matrix[world_axis, :])))
        index_axis_for_world.append(column)
        signs.append(bool(matrix[world_axis, column] < 0))
    if len(set(index_axis_for_world)) != 3:
        raise ValueError(f"direction matrix {geometry.direction} does not map index axes one-to-one onto world axes")
    # numpy axis a of GetArrayFromImage is ITK index axis 2 - a; canonical axis b is world axis 2 - b.
    transpose = tuple(2 - index_axis_for_world[2 - b] for b in range(3))
    flip = tuple(signs[2 - b] for b in range(3))
    return Reorientation(transpose=transpose, flip=flip)


def canonical_geometry(geometry: Geometry, reorientation: Reorientation) -> CanonicalGeometry:
    """The grid that the canonical array of an image with ``geometry`` lives on."""
    matrix = geometry.matrix()
    spacing_index = np.asarray(geometry.spacing)
    size_index = np.asarray(geometry.size)
    first_voxel_index = np.zeros(3)
    columns = []
    spacing = []
    shape = []
    for b in range(3):  # canonical axis b = z, y, x
        index_axis = 2 - reorientation.transpose[b]
        sign = -1.0 if reorientation.flip[b] else 1.0
        if reorientation.flip[b]:
            first_voxel_index[index_axis] = size_index[index_axis] - 1
        columns.append(sign * matrix[:, index_axis])
        spacing.append(float(spacing_index[index_axis]))
        shape.append(int(size_index[index_axis]))
    origin = np.asarray(geometry.origin) + matrix @ (first_voxel_index * spacing_index)
    # SimpleITK orders direction columns by its index axes x, y, z = canonical axes 2, 1, 0.
    direction = np.stack(columns[::-1], axis=1)
    return CanonicalGeometry(tuple(shape), tuple(spacing), tuple(float(v) for v in origin),
                             tuple(float(v) for v in direction.ravel()))
