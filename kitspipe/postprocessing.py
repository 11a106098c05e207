"""Post-processing of the network's region probabilities into a KiTS label map (paper 2.5).

The high-resolution network predicts two sigmoid region channels on the 1 mm grid:
channel 0 = kidney ∪ tumour, channel 1 = tumour. The low-resolution network predicts
kidney ∪ tumour at 4 mm; the caller resamples that probability to the 1 mm grid.

Connectivity: components are 26-connected (voxels sharing a face, an edge or a corner
belong together), so a thin oblique structure is not split into pieces and a tumour
touching a kidney only at a corner still counts as touching.

All functions are pure: they return new arrays and never modify their inputs. Physical
parameters are in mm and use the grid spacing, so they mean the same on any grid.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from kitspipe.errors import PlanError

CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)

# Distances computed by the distance transform can land a hair above an exact radius.
_DISTANCE_TOLERANCE_MM = 1e-6


@dataclass(frozen=True)
class PostprocessingSettings:
    """Which post-processing steps run, and their parameters (stored as JSON in the plans).

    Args:
        threshold: a probability strictly above it is foreground (applies to all channels and
            to the low-resolution probability).
        keep_largest_kidney_per_side: keep only the largest kidney ∪ tumour component on
            each side of the midline.
        drop_unconnected_tumour: drop tumour components that do not touch the kept kidneys.
        low_resolution_mask: keep only voxels near the low-resolution kidney ∪ tumour mask.
        low_resolution_dilation_mm: how far around the low-resolution mask voxels are kept;
            the paper's 10 dilation iterations on the 1 mm grid are 10 mm.
        low_resolution_mask_first: apply the low-resolution mask before the component steps
            rather than last. The paper lists it last; applied last, a spurious blob larger
            than the real kidney on the same side wins "keep the largest" and the mask then
            removes it, losing that kidney altogether (docs/interpretation.md).
        min_tumour_volume_ml: drop tumour components smaller than this (0: keep all; not in
            the paper). A dropped component stays kidney where the kidney channel covers it.
        min_tumour_fraction_in_kidney_region: drop tumour components with a smaller share of
            their voxels inside the kidney ∪ tumour channel (0: keep all; not in the paper).
            The two channels are nested by construction, so a tumour the first channel
            mostly disowns is taken as a false one, and its voxels become background.
    """

    threshold: float = 0.5
    keep_largest_kidney_per_side: bool = True
    drop_unconnected_tumour: bool = True
    low_resolution_mask: bool = True
    low_resolution_dilation_mm: float = 10.0
    low_resolution_mask_first: bool = True
    min_tumour_volume_ml: float = 0.0
    min_tumour_fraction_in_kidney_region: float = 0.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "bool" and not isinstance(value, bool):
                raise PlanError(f"postprocessing: {field.name} must be true or false, got {value!r}")
            if field.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise PlanError(f"postprocessing: {field.name} must be a number, got {value!r}")
        if not 0.0 < self.threshold < 1.0:
            raise PlanError(f"postprocessing: threshold must lie in (0, 1), got {self.threshold}")
        dilation = self.low_resolution_dilation_mm
        if not (math.isfinite(dilation) and dilation >= 0):
            raise PlanError(f"postprocessing: low_resolution_dilation_mm must be >= 0, got {dilation}")
        if not (math.isfinite(self.min_tumour_volume_ml) and self.min_tumour_volume_ml >= 0):
            raise PlanError(f"postprocessing: min_tumour_volume_ml must be >= 0, got {self.min_tumour_volume_ml}")
        if not 0.0 <= self.min_tumour_fraction_in_kidney_region <= 1.0:
            raise PlanError("postprocessing: min_tumour_fraction_in_kidney_region must lie in [0, 1], "
                            f"got {self.min_tumour_fraction_in_kidney_region}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PostprocessingSettings:
        """Settings from a JSON object; an unknown key is an error, a missing key takes its default."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(
                f"postprocessing: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return cls(**data)


def binarize(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Boolean mask ``probabilities > threshold``; a voxel exactly at the threshold is background."""
    return np.asarray(probabilities) > threshold


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(np.asarray(mask, dtype=bool), structure=CONNECTIVITY)


def keep_largest_kidney_per_side(kidney_mask: np.ndarray, midline_x: float | None = None) -> np.ndarray:
    """Keep the largest connected component on each side of the midline.

    A component belongs to the side of its centroid along x (axis 2): centroid ``< midline_x``
    is the patient's right (x grows towards the patient's left), ``>=`` the left. Equal sizes
    keep the component found first in C order, so the result is deterministic.

    Args:
        kidney_mask: boolean (z, y, x) kidney ∪ tumour mask.
        midline_x: the midline as a voxel index along x; ``None`` is the centre of the axis,
            ``(n_x - 1) / 2``.

    Example (one row along x, midline 3.5)::

        [1 1 0 1 0 0 1 1]  ->  [1 1 0 0 0 0 1 1]   (the single voxel loses on the right side)
    """
    labels, n = _components(kidney_mask)
    kept = np.zeros(n + 1, dtype=bool)
    if n:
        midline = (labels.shape[2] - 1) / 2 if midline_x is None else midline_x
        flat = labels.ravel()
        foreground = np.flatnonzero(flat)
        ids = flat[foreground]
        sizes = np.bincount(ids, minlength=n + 1).astype(float)
        centroid_x = np.bincount(ids, weights=foreground % labels.shape[2], minlength=n + 1)[1:] / sizes[1:]
        on_right = np.concatenate([[False], centroid_x < midline])
        for side in (on_right, ~on_right):
            side[0] = False
            if side.any():
                kept[np.argmax(np.where(side, sizes, -1.0))] = True
    return kept[labels]


def drop_unconnected_tumour(tumour_mask: np.ndarray, kidney_mask: np.ndarray) -> np.ndarray:
    """Keep the tumour components that overlap the kidney mask or touch it (26-adjacency).

    Example (one row)::

        tumour [0 1 1 0 0 0 1]
        kidney [1 0 0 0 0 0 0]  ->  [0 1 1 0 0 0 0]   (the far tumour voxel is dropped)
    """
    if np.shape(tumour_mask) != np.shape(kidney_mask):
        raise ValueError(f"tumour {np.shape(tumour_mask)} and kidney {np.shape(kidney_mask)} masks differ")
    labels, n = _components(tumour_mask)
    if n == 0:
        return np.zeros(labels.shape, dtype=bool)
    kidney = np.asarray(kidney_mask, dtype=bool)
    kidney_and_neighbours = ndimage.binary_dilation(kidney, structure=CONNECTIVITY)
    kept = np.zeros(n + 1, dtype=bool)
    kept[labels[kidney_and_neighbours]] = True
    kept[0] = False
    return kept[labels]


def drop_small_components(mask: np.ndarray, min_volume_ml: float, spacing: Sequence[float]) -> np.ndarray:
    """Remove the components (26-connected) whose volume is below ``min_volume_ml``.

    Example (one row, 1 mm voxels, 0.002 ml)::

        [1 1 1 0 1 1 0 1]  ->  [1 1 1 0 1 1 0 0]
    """
    mask = np.asarray(mask, dtype=bool)
    if min_volume_ml <= 0:
        return mask.copy()
    labels, n = _components(mask)
    if n == 0:
        return mask.copy()
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    sizes_ml = np.bincount(labels.ravel(), minlength=n + 1) * voxel_ml
    kept = sizes_ml >= min_volume_ml
    kept[0] = False
    return kept[labels]


def tumour_outside_kidney_region(tumour_mask: np.ndarray, kidney_region: np.ndarray, min_fraction: float) -> np.ndarray:
    """The voxels of the tumour components (26-connected) that have less than ``min_fraction``
    of their voxels inside ``kidney_region`` (the kidney ∪ tumour channel).

    Example (one row; kidney region ``[1 1 1 1 0 0 0 0]``, ``min_fraction`` 0.7)::

        tumour [0 1 1 0 0 1 1 1]  ->  removed [0 0 0 0 0 1 1 1]
    """
    tumour = np.asarray(tumour_mask, dtype=bool)
    if min_fraction <= 0:
        return np.zeros_like(tumour)
    labels, n = _components(tumour)
    if n == 0:
        return np.zeros_like(tumour)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    inside = np.bincount(labels[np.asarray(kidney_region, dtype=bool)], minlength=n + 1)
    removed = inside < min_fraction * sizes
    removed[0] = False
    return removed[labels]


def dilate_mm(mask: np.ndarray, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Voxels whose centre lies within ``radius_mm`` (Euclidean, inclusive) of a mask voxel.

    A distance transform with the grid spacing makes the radius physical on anisotropic
    grids; binary dilation by iterations would give a voxel-count (and city-block) ball.
    Only the mask's bounding box grown by the radius is transformed, since nothing outside
    it can be within reach.

    Example (spacing (3, 1, 1) mm, radius 3 mm): one voxel grows to ±1 voxel in z and ±3 in y, x.
    """
    mask = np.asarray(mask, dtype=bool)
    if radius_mm < 0:
        raise ValueError(f"radius_mm must be >= 0, got {radius_mm}")
    dilated = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return dilated
    box = []
    for axis, step in enumerate(spacing):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        reach = int(math.floor((radius_mm + _DISTANCE_TOLERANCE_MM) / step))
        box.append(slice(max(present[0] - reach, 0), min(present[-1] + 1 + reach, mask.shape[axis])))
    box = tuple(box)
    distance = ndimage.distance_transform_edt(~mask[box], sampling=tuple(float(s) for s in spacing))
    dilated[box] = distance <= radius_mm + _DISTANCE_TOLERANCE_MM
    return dilated


def mask_with_low_resolution(
    mask: np.ndarray, low_res_mask_on_fine_grid: np.ndarray, dilation_mm: float, spacing: Sequence[float]
) -> np.ndarray:
    """``mask`` AND the low-resolution mask dilated by ``dilation_mm`` (see :func:`dilate_mm`).

    An empty low-resolution mask removes everything: the low-resolution network found no kidney.
    """
    if np.shape(mask) != np.shape(low_res_mask_on_fine_grid):
        raise ValueError(
            f"mask {np.shape(mask)} and low-resolution mask {np.shape(low_res_mask_on_fine_grid)} differ"
        )
    return np.asarray(mask, dtype=bool) & dilate_mm(low_res_mask_on_fine_grid, dilation_mm, spacing)


def postprocess(
    region_probabilities: np.ndarray,
    spacing: Sequence[float],
    settings: PostprocessingSettings = PostprocessingSettings(),
    low_res_probability: np.ndarray | None = None,
) -> np.ndarray:
    """Region probabilities -> KiTS label map (0 background, 1 kidney, 2 tumour).

    Steps; each switch in ``settings`` skips its step only:

    1. threshold: K = channel 0 > t (kidney ∪ tumour), T = channel 1 > t (tumour);
    2. ``low_resolution_mask`` (when ``low_resolution_mask_first``, the default): with
       L = low-resolution probability > t, dilated by ``low_resolution_dilation_mm``:
       K = K ∧ L, T = T ∧ L;
    3. ``keep_largest_kidney_per_side``: K = largest component of K on each side of the
       midline (centre of the x axis);
    4. ``drop_unconnected_tumour``: T = components of T that overlap or touch K;
       ``min_tumour_volume_ml``: T = components of T at least that large;
       ``min_tumour_fraction_in_kidney_region``: the components of T with a smaller share of
       their voxels in the kidney ∪ tumour channel (as thresholded in step 1, masked in step 2)
       are removed from T and from K;
    5. region R = K ∪ T, so a kept tumour is always inside the kidney ∪ tumour region;
    6. ``low_resolution_mask`` in the paper's place instead (``low_resolution_mask_first``
       off): R = R ∧ L, T = T ∧ L;
    7. labels: 2 where T, else 1 where R, else 0.

    Args:
        region_probabilities: (2, z, y, x) sigmoid probabilities on the fine grid.
        spacing: (z, y, x) spacing of the fine grid in mm.
        settings: which steps run, and their parameters.
        low_res_probability: (z, y, x) low-resolution kidney ∪ tumour probability resampled
            to the fine grid; required when ``settings.low_resolution_mask`` is on.

    Returns:
        uint8 label map (z, y, x).
    """
    probabilities = np.asarray(region_probabilities)
    if probabilities.ndim != 4 or probabilities.shape[0] != 2:
        raise ValueError(f"region_probabilities must be (2, z, y, x), got {probabilities.shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers, got {spacing}")
    kidney = binarize(probabilities[0], settings.threshold)
    tumour = binarize(probabilities[1], settings.threshold)
    allowed = None
    if settings.low_resolution_mask:
        if low_res_probability is None:
            raise ValueError("low_resolution_mask is on but no low-resolution probability was given")
        if np.shape(low_res_probability) != kidney.shape:
            raise ValueError(
                f"low-resolution probability {np.shape(low_res_probability)} is not on the grid {kidney.shape}"
            )
        low_res = binarize(low_res_probability, settings.threshold)
        allowed = dilate_mm(low_res, settings.low_resolution_dilation_mm, spacing)
    if allowed is not None and settings.low_resolution_mask_first:
        kidney, tumour = kidney & allowed, tumour & allowed
    kidney_channel = kidney
    if settings.keep_largest_kidney_per_side:
        kidney = keep_largest_kidney_per_side(kidney)
    if settings.drop_unconnected_tumour:
        tumour = drop_unconnected_tumour(tumour, kidney)
    tumour = drop_small_components(tumour, settings.min_tumour_volume_ml, spacing)
    disowned = tumour_outside_kidney_region(tumour, kidney_channel, settings.min_tumour_fraction_in_kidney_region)
    tumour, kidney = tumour & ~disowned, kidney & ~disowned
    region = kidney | tumour
    if allowed is not None and not settings.low_resolution_mask_first:
        region, tumour = region & allowed, tumour & allowed
    labels = region.astype(np.uint8)
    labels[tumour] = 2
    return labels
