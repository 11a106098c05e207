"""Data augmentation of a patch pair (paper 2.4), one physical transform for both resolutions.

The paper lists elastic deformation on a 10×10×10 grid with B-spline interpolation, 3D
scaling ±5 %, 3D rotation ±5°, Gaussian noise and an HU variation of ±50. The two inputs of
the dual network must keep showing the same anatomy about the same centre, because the
low-resolution output masks the high-resolution input. So every parameter that moves
anatomy or changes the scan as a whole is drawn **once per pair** (:meth:`Augmenter.sample_parameters`)
and then applied to each grid (:meth:`Augmenter.apply`), the split of batchgenerators v2's
``get_parameters`` / ``apply``.

Where each part comes from:

* Gaussian noise: batchgenerators' ``augment_gaussian_noise``. The noise is independent per
  voxel, so drawing it separately for each resolution is correct. That function draws from
  numpy's and Python's global generators; they are seeded from the pair's parameters for the
  call and restored afterwards, so a sample still depends only on its own seed.
* Everything spatial (rotation, scaling, elastic deformation, mirroring): written here.
  batchgenerators' ``augment_spatial`` / ``SpatialTransform`` draw their rotation, scale and
  deformation inside each call and work in the voxel units of one array, so the 1 mm and
  4 mm patches would get different transforms. Here the transform is a map in mm about the
  common patch centre, ``x = s·R·(p + d(p))``, evaluated at each grid's own voxel positions.
* HU shift: one uniform value per pair, added here, before the HU window is applied by the
  sampler, identically to both resolutions (they are the same scan).

The elastic displacement ``d`` is a cubic B-spline (free-form deformation) whose
``elastic_grid_points``³ control points span the high-resolution input, with Gaussian
coefficients scaled so that the RMS displacement per axis inside the grid equals
``elastic_magnitude_mm``. Beyond the grid the coefficients are zero, so the deformation
fades out smoothly within two control spacings and the far low-resolution context is only
rotated and scaled.

Resampling reads, for each box, the source region its sampling positions reach (padded
outside the case like an unaugmented read) and interpolates: images linearly with
``torch.nn.functional.grid_sample`` (:func:`trilinear`), labels by nearest neighbour with
``scipy.ndimage.map_coordinates``. Linear, not cubic, by measurement: for a 68³ patch (the
cpu preset's until session 4) cubic takes ≈ 0.23 s against ≈ 0.024 s (spline prefilter plus 64-point stencils), and on a smoothed
phantom rotated by 5° and scaled by 3 % the two differ by 0.5 HU on average (2.7 HU at the
99th percentile), far below the 10 HU noise and ±50 HU shift applied anyway. Labels are resampled only on the
output regions, the only place targets are needed. Mirroring flips the x (left-right) axis
of every box after resampling, which is exact and consistent because all boxes share their
centre. With identity spatial parameters nothing is resampled at all.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from batchgenerators.augmentations.noise_augmentations import augment_gaussian_noise
from scipy import ndimage

from kitspipe.data.patch_geometry import Window, read_patch
from kitspipe.errors import PlanError
from kitspipe.plans import AugmentationPlan, Plans

TripleF = tuple[float, float, float]

# Mean over space of Σ_j β³(t − j)² is ∫β³(t)² dt = β⁷(0) = 151/315 per axis, so unit
# coefficients give an RMS displacement of (151/315)^(3/2) ≈ 0.33 per axis inside the grid.
_BSPLINE_RMS_GAIN = (151.0 / 315.0) ** 1.5
# The x axis (last, patient left-right) is the one mirrored.
_LEFT_RIGHT_AXIS = 2


def cubic_bspline(t: np.ndarray) -> np.ndarray:
    """The centred cubic B-spline basis function β³, supported on (−2, 2)."""
    t = np.abs(t)
    return np.where(t < 1, 2.0 / 3.0 - t**2 + t**3 / 2.0, np.where(t < 2, (2.0 - t) ** 3 / 6.0, 0.0))


def rotation_matrix(angles_rad: TripleF) -> np.ndarray:
    """``R_z·R_y·R_x`` for angles about the z, y and x axes, acting on (z, y, x) vectors."""
    matrices = []
    for axis, angle in enumerate(angles_rad):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        matrices.append(m)
    return matrices[0] @ matrices[1] @ matrices[2]


@dataclass(frozen=True, eq=False)
class AugmentationParameters:
    """Everything random about one augmented pair.

    Args:
        rotation_rad: rotation angles about the z, y and x axes.
        scale: isotropic scale factor of the sampling positions (> 1 shows more anatomy).
        elastic_mm: B-spline coefficients (3, G, G, G) of the displacement in mm, or ``None``.
        mirror: whether the x (left-right) axis is flipped.
        hu_shift: HU added to both images.
        noise_std_hu: standard deviation of the Gaussian noise in HU (0: no noise).
        noise_seed: seed of the noise of this pair.
    """

    rotation_rad: TripleF = (0.0, 0.0, 0.0)
    scale: float = 1.0
    elastic_mm: np.ndarray | None = None
    mirror: bool = False
    hu_shift: float = 0.0
    noise_std_hu: float = 0.0
    noise_seed: int = 0

    @property
    def spatial_is_identity(self) -> bool:
        """True when no resampling is needed (mirroring is an exact flip, not a resampling)."""
        return all(a == 0 for a in self.rotation_rad) and self.scale == 1.0 and self.elastic_mm is None

    def matrix(self) -> np.ndarray:
        """The linear part ``s·R`` of the map from output to source positions."""
        return self.scale * rotation_matrix(self.rotation_rad)


@contextmanager
def _seeded_global_generators(seed: int) -> Iterator[None]:
    """Seed numpy's and Python's global generators for a block, then put their states back."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


class Augmenter:
    """Draws augmentation parameters for a pair and applies them to its boxes.

    Args:
        plan: the plan's augmentation settings.
        elastic_extent_mm: physical edge lengths the elastic control grid spans (the
            high-resolution input patch).
    """

    def __init__(self, plan: AugmentationPlan, elastic_extent_mm: TripleF) -> None:
        if plan.elastic_grid_points < 2:
            raise PlanError(f"augmentation.elastic_grid_points: must be >= 2, got {plan.elastic_grid_points}")
        self.plan = plan
        self.elastic_extent_mm = tuple(float(e) for e in elastic_extent_mm)

    @classmethod
    def from_plans(cls, plans: Plans) -> "Augmenter":
        """The augmenter of a resolved plan, its elastic grid spanning the high-resolution input."""
        if plans.high.input_patch is None:
            raise PlanError("high.input_patch: not resolved (run `kitspipe plan`)")
        extent = tuple(n * s for n, s in zip(plans.high.input_patch, plans.high.spacing_mm))
        return cls(plans.augmentation, extent)

    def sample_parameters(self, rng: np.random.Generator) -> AugmentationParameters:
        """Draw the parameters of one pair.

        Rotation and scaling are drawn uniformly within the plan's ranges for every pair; the
        elastic deformation, the noise and the mirror each with their own probability.
        """
        plan = self.plan
        angles = np.deg2rad(rng.uniform(-plan.rotation_degrees, plan.rotation_degrees, size=3))
        scale = float(rng.uniform(1.0 - plan.scale_range, 1.0 + plan.scale_range))
        elastic = None
        if plan.elastic_magnitude_mm > 0 and rng.random() < plan.elastic_probability:
            points = plan.elastic_grid_points
            elastic = rng.normal(0.0, plan.elastic_magnitude_mm / _BSPLINE_RMS_GAIN, size=(3, points, points, points))
        mirror = bool(plan.mirror_left_right and rng.random() < 0.5)
        hu_shift = float(rng.uniform(-plan.hu_shift_range, plan.hu_shift_range))
        noise = float(plan.noise_std_hu) if rng.random() < plan.noise_probability else 0.0
        return AugmentationParameters(
            rotation_rad=tuple(float(a) for a in angles), scale=scale, elastic_mm=elastic, mirror=mirror,
            hu_shift=hu_shift, noise_std_hu=noise, noise_seed=int(rng.integers(2**31)))

    def apply(self, params: AugmentationParameters, windows: Mapping[str, Window]) -> dict[str, np.ndarray]:
        """Augment every box of a pair with the same parameters.

        Args:
            params: from :meth:`sample_parameters`.
            windows: the pair's boxes by name, all centred on the common centre.

        Returns:
            Per name: images as float32 HU (shift and noise added, not yet clipped), labels
            in the dtype of their array.
        """
        out = {}
        for number, name in enumerate(sorted(windows)):
            window = windows[name]
            patch = window.read() if params.spatial_is_identity else self.warp(params, window)
            if params.mirror:
                patch = np.ascontiguousarray(np.flip(patch, axis=_LEFT_RIGHT_AXIS))
            if not window.is_label:
                patch = patch.astype(np.float32, copy=False)
                if params.noise_std_hu > 0:
                    with _seeded_global_generators(params.noise_seed + number):
                        # batchgenerators calls the standard deviation "variance"; a range of
                        # one value fixes it.
                        noise_std = (params.noise_std_hu, params.noise_std_hu)
                        patch = augment_gaussian_noise(patch[np.newaxis], noise_std, p_per_channel=1.0)[0]
                patch += np.float32(params.hu_shift)
            out[name] = patch
        return out

    def warp(self, params: AugmentationParameters, window: Window) -> np.ndarray:
        """Resample one box under the spatial part of ``params``, without mirroring.

        Args:
            params: the pair's parameters.
            window: the box; its centre is the centre of the transform.

        Returns:
            float32 for images, the array's dtype for labels.
        """
        positions = self.source_positions(params, window)
        # The source region covers every position plus the interpolation stencil: linear reads
        # floor(p) and floor(p) + 1, hence + 2 above; the - 1 below is slack. A float32 position
        # may pass the float64 bounds by ~1e-5 voxel; the border padding clamps it, at an error of
        # that size times a neighbour difference.
        bounds = positions.bounds
        low_xyz = np.floor(bounds[:, 0]).astype(int) - 1
        high_xyz = np.floor(bounds[:, 1]).astype(int) + 2
        low, high = low_xyz[::-1], high_xyz[::-1]
        region = read_patch(window.array, low, high - low, window.pad_value)
        if window.is_label:
            grid = positions.grid(np.ones(3), -low_xyz)
            return ndimage.map_coordinates(region, grid[..., ::-1].transpose(3, 0, 1, 2), order=0, mode="nearest",
                                           prefilter=False)
        # grid_sample's -1..1 (align_corners): (p - low) · 2 / (n - 1) - 1, folded into the terms.
        scale = 2.0 / np.maximum(high_xyz - low_xyz - 1, 1)
        return trilinear(region, positions.grid(scale, -low_xyz * scale - 1.0))

    def source_positions(self, params: AugmentationParameters, window: Window) -> "SourcePositions":
        """For every voxel of the box, the (fractional) voxel index of the array to sample."""
        spacing = np.asarray(window.spacing_mm, dtype=float)
        axes_mm = [(np.arange(n) - (n - 1) / 2.0) * h for n, h in zip(window.size, spacing)]
        # Row r of the map in voxels of the source: centre_r + Σ_a (s·R)[r, a] / h_r · (p_a + d_a).
        to_voxels = params.matrix() / spacing[:, None]
        terms = [[to_voxels[row, axis] * axes_mm[axis] for axis in range(3)] for row in range(3)]
        field = None
        if params.elastic_mm is not None:
            # The field is linear in its coefficients, so mapping the coefficients to source
            # voxels first gives Σ_a to_voxels[r, a]·d_a directly, at the cost of a 3×3 product.
            field = self.displacement_mm(np.tensordot(to_voxels, params.elastic_mm, axes=1), axes_mm)
        return SourcePositions(np.asarray(window.centre_index(), dtype=float), terms, field)

    def displacement_mm(self, coefficients: np.ndarray, axes_mm: list[np.ndarray]) -> np.ndarray:
        """The elastic displacement, (3, nz, ny, nx), at the grid of positions given per axis.

        Args:
            coefficients: (3, G, G, G) B-spline coefficients; the field has their unit.
            axes_mm: positions along z, y and x relative to the patch centre, in mm.
        """
        bases = []
        for axis, positions in enumerate(axes_mm):
            points = coefficients.shape[1 + axis]
            extent = self.elastic_extent_mm[axis]
            knot_spacing = extent / (points - 1)
            knots = -extent / 2.0 + knot_spacing * np.arange(points)
            bases.append(cubic_bspline((positions[:, None] - knots[None, :]) / knot_spacing))
        basis_z, basis_y, basis_x = bases
        # Separable: contract x and y per (component, z-knot), then z as one matrix product.
        in_plane = basis_y @ coefficients @ basis_x.T
        points_z = coefficients.shape[1]
        field = basis_z @ in_plane.reshape(3, points_z, -1)
        return field.reshape((3, len(axes_mm[0]), len(axes_mm[1]), len(axes_mm[2])))


@dataclass(frozen=True)
class SourcePositions:
    """Where each voxel of a box samples the array, kept separable: row r (z, y, x) of the
    voxel (k, j, i) is ``centre[r] + terms[r][0][k] + terms[r][1][j] + terms[r][2][i]``, plus
    ``field[r, k, j, i]`` under elastic deformation. The affine part so costs one full-size add
    per row, and the bounds come from the terms, without a pass over the box."""

    centre: np.ndarray
    terms: list[list[np.ndarray]]
    field: np.ndarray | None

    @property
    def bounds(self) -> np.ndarray:
        """(3, 2): per component in x, y, z order, a min and max that enclose every position
        (in float64; the float32 grid may pass them by its rounding)."""
        bounds = np.empty((3, 2))
        for row in range(3):
            low = self.centre[row] + sum(term.min() for term in self.terms[row])
            high = self.centre[row] + sum(term.max() for term in self.terms[row])
            if self.field is not None:
                low, high = low + self.field[row].min(), high + self.field[row].max()
            bounds[2 - row] = (low, high)
        return bounds

    def grid(self, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """The positions times ``scale`` plus ``shift`` (both in x, y, z order), as a (*size, 3)
        float32 array with the components in x, y, z order: the layout ``grid_sample`` reads,
        built in place, the transform folded into the per-axis terms."""
        size = tuple(len(term) for term in self.terms[0])
        grid = np.empty(size + (3,), dtype=np.float32)
        for row in range(3):
            component = 2 - row
            factor = scale[component]
            along = [(factor * term).astype(np.float32) for term in self.terms[row]]
            grid[..., component] = (np.float32(factor * self.centre[row] + shift[component]) + along[0][:, None, None]) \
                + along[1][None, :, None] + along[2][None, None, :]
            if self.field is not None:
                grid[..., component] += factor * self.field[row]
        return grid


def trilinear(region: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``region`` at ``grid``, as float32.

    Args:
        region: the (z, y, x) array to sample.
        grid: (*size, 3) float32 positions in x, y, z order, in ``grid_sample``'s normalised
            units with ``align_corners``: -1 and 1 are the centres of the region's first and
            last voxel along each axis.

    ``torch.nn.functional.grid_sample`` rather than ``scipy.ndimage.map_coordinates``: on one
    core it samples a 108³ box in about half the time, and the image boxes' interpolation is
    most of a `paper` sample's cost (docs/performance.md).
    """
    source = torch.from_numpy(np.ascontiguousarray(region, dtype=np.float32))[None, None]
    sampled = F.grid_sample(source, torch.from_numpy(grid)[None], mode="bilinear", padding_mode="border",
                            align_corners=True)
    return sampled[0, 0].numpy()


def make_augmenter(plans: Plans) -> Augmenter | None:
    """The plan's augmenter, or ``None`` when augmentation is disabled."""
    return Augmenter.from_plans(plans) if plans.augmentation.enabled else None
