"""Segmentation metrics on boolean masks and KiTS label maps, with physical spacing in mm.

Conventions (chosen so that no case silently drops out of an average):

- Dice: both masks empty -> 1.0 (a correct "nothing there"); exactly one empty -> 0.0.
- Surface: the voxels of a mask with at least one of their 6 face neighbours outside the mask;
  voxels on the array border count as surface (outside the array is background).
- Surface distances: from each surface voxel of one mask to the nearest surface voxel of the
  other, centre to centre, in mm (Euclidean distance transform with ``sampling=spacing``).
- HD95: the larger of the two directed 95th percentiles (numpy's linear interpolation), as in
  MONAI's ``compute_hausdorff_distance``. Both empty -> 0.0; exactly one empty -> ``inf`` (the
  Hausdorff distance to an empty set is unbounded; unlike NaN, ``inf`` cannot be skipped by
  ``nanmean``, so a summary shows it).
- Surface Dice at tolerance t: surface voxels (of both masks) within t mm of the other
  surface, over all surface voxels; voxels are counted, not weighted by surface area.
  Both empty -> 1.0; exactly one empty -> 0.0.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)

METRIC_NAMES = (
    "kidney_dice",
    "tumour_dice",
    "composite_dice",
    "kidney_hd95_mm",
    "tumour_hd95_mm",
    "kidney_surface_dice",
    "tumour_surface_dice",
    "kidney_volume_pred_ml",
    "kidney_volume_ref_ml",
    "tumour_volume_pred_ml",
    "tumour_volume_ref_ml",
)


def _pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    return pred, ref


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice overlap ``2|P ∩ R| / (|P| + |R|)``; 1.0 when both are empty.

    Example: two 1-D masks ``[1 1 0 0]`` and ``[0 1 1 0]`` -> 2·1 / 4 = 0.5.
    """
    pred, ref = _pair(pred, ref)
    total = np.count_nonzero(pred) + np.count_nonzero(ref)
    if total == 0:
        return 1.0
    return 2.0 * np.count_nonzero(pred & ref) / total


def surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face neighbour outside the mask (or outside the array)."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, structure=FACE_NEIGHBOURS, border_value=0)


def _crop_to_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union.

    Nothing changes by the cut: every surface voxel lies inside the box, and the erosion
    treats the outside of the box as background, which is what lies there.
    """
    union = pred | ref
    box = []
    for axis in range(union.ndim):
        present = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(present[0], present[-1] + 1))
    return pred[tuple(box)], ref[tuple(box)]


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: pred surface -> ref surface, and ref -> pred.

    Both masks must be non-empty.
    """
    pred, ref = _pair(pred, ref)
    if not (pred.any() and ref.any()):
        raise ValueError("surface distances need two non-empty masks")
    sampling = tuple(float(s) for s in spacing)
    pred, ref = _crop_to_union(pred, ref)
    pred_surface, ref_surface = surface(pred), surface(ref)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=sampling)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)[ref_surface]
    return to_ref, to_pred


def hausdorff95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (see the module notes for empty masks).

    Example: two 4³ cubes offset by 2 voxels along z at spacing (2.5, 1, 1) mm -> 5.0 mm.
    """
    pred, ref = _pair(pred, ref)
    pred_empty, ref_empty = not pred.any(), not ref.any()
    if pred_empty and ref_empty:
        return 0.0
    if pred_empty or ref_empty:
        return math.inf
    to_ref, to_pred = surface_distances(pred, ref, spacing)
    return float(max(np.percentile(to_ref, 95), np.percentile(to_pred, 95)))


def surface_dice(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Share of surface voxels within ``tolerance_mm`` of the other mask's surface."""
    pred, ref = _pair(pred, ref)
    pred_empty, ref_empty = not pred.any(), not ref.any()
    if pred_empty and ref_empty:
        return 1.0
    if pred_empty or ref_empty:
        return 0.0
    to_ref, to_pred = surface_distances(pred, ref, spacing)
    close = np.count_nonzero(to_ref <= tolerance_mm) + np.count_nonzero(to_pred <= tolerance_mm)
    return close / (to_ref.size + to_pred.size)


def describe_invalid_labels(labels: np.ndarray) -> str | None:
    """None if every value is a KiTS label (0, 1, 2); otherwise the bad values and their counts."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return None
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        return f"label dtype {labels.dtype} is not numeric"
    # Written as three comparisons so that NaN and fractional values are caught as well.
    bad = (labels != 0) & (labels != 1) & (labels != 2)
    if not bad.any():
        return None
    values, counts = np.unique(labels[bad], return_counts=True)
    shown = ", ".join(f"{value:g}: {count}" for value, count in zip(values[:10], counts[:10]))
    more = f" and {values.size - 10} more" if values.size > 10 else ""
    return f"labels outside {{0, 1, 2}} (value: voxels) {shown}{more}"


def kits_case_metrics(
    pred_labels: np.ndarray, ref_labels: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 2.0
) -> dict[str, float]:
    """All per-case metrics of :data:`METRIC_NAMES` for KiTS label maps.

    Regions follow the KiTS19 evaluation: kidney = label > 0 (kidney ∪ tumour), tumour =
    label == 2; composite Dice = mean of the two Dice scores.

    Args:
        pred_labels: predicted label map (z, y, x) with values in {0, 1, 2}.
        ref_labels: reference label map of the same shape.
        spacing: (z, y, x) spacing in mm.
        tolerance_mm: tolerance of the surface Dice.
    """
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"prediction {pred_labels.shape} and reference {ref_labels.shape} differ in shape")
    for name, labels in (("prediction", pred_labels), ("reference", ref_labels)):
        problem = describe_invalid_labels(labels)
        if problem:
            raise ValueError(f"{name}: {problem}")
    voxel_ml = math.prod(float(s) for s in spacing) / 1000.0
    masks = {
        "kidney": (pred_labels > 0, ref_labels > 0),
        "tumour": (pred_labels == 2, ref_labels == 2),
    }
    result: dict[str, float] = {}
    for region, (pred, ref) in masks.items():
        result[f"{region}_dice"] = dice(pred, ref)
        result[f"{region}_hd95_mm"] = hausdorff95(pred, ref, spacing)
        result[f"{region}_surface_dice"] = surface_dice(pred, ref, spacing, tolerance_mm)
        result[f"{region}_volume_pred_ml"] = np.count_nonzero(pred) * voxel_ml
        result[f"{region}_volume_ref_ml"] = np.count_nonzero(ref) * voxel_ml
    result["composite_dice"] = (result["kidney_dice"] + result["tumour_dice"]) / 2.0
    return {name: float(result[name]) for name in METRIC_NAMES}
