import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kitspipe.metrics import (
    METRIC_NAMES,
    describe_invalid_labels,
    dice,
    hausdorff95,
    kits_case_metrics,
    surface,
    surface_dice,
)


def cube(shape, start, edge=4):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + edge) for s in start)] = True
    return mask


def brute_force_surface(mask):
    """Voxels with a face neighbour outside the mask or outside the array, by enumeration."""
    result = np.zeros(mask.shape, dtype=bool)
    for index in zip(*np.nonzero(mask)):
        for axis in range(3):
            for step in (-1, 1):
                neighbour = list(index)
                neighbour[axis] += step
                inside = 0 <= neighbour[axis] < mask.shape[axis]
                if not inside or not mask[tuple(neighbour)]:
                    result[index] = True
    return result


def brute_force_distances(a, b, spacing):
    """For each surface voxel of a, the distance in mm to the nearest surface voxel of b."""
    pa = np.argwhere(brute_force_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(brute_force_surface(b)) * np.asarray(spacing)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(axis=1)


def test_dice_of_two_cubes_with_half_overlap():
    a = cube((8, 8, 8), (0, 0, 0))
    b = cube((8, 8, 8), (0, 0, 2))
    assert dice(a, b) == pytest.approx(0.5)  # 32 shared voxels of 64 + 64
    assert dice(a, a) == 1.0


def test_hd95_of_cubes_offset_by_two_voxels_on_anisotropic_spacing():
    a = cube((10, 8, 8), (1, 2, 2))
    b = cube((10, 8, 8), (3, 2, 2))
    # Directed distances of either cube: 24 surface voxels at 0, 4 at 1 mm (top face centre to
    # the other cube's side), 12 at 2.5 mm (one slice), 16 at 5 mm (the far face): p95 = 5 mm.
    assert hausdorff95(a, b, (2.5, 1.0, 1.0)) == pytest.approx(5.0)
    assert hausdorff95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert hausdorff95(a, a, (2.5, 1.0, 1.0)) == 0.0


def test_surface_dice_of_offset_cubes():
    a = cube((10, 8, 8), (1, 2, 2))
    b = cube((10, 8, 8), (3, 2, 2))
    # Within 2.5 mm: 24 + 4 + 12 of 56 surface voxels per cube.
    assert surface_dice(a, b, (2.5, 1.0, 1.0), tolerance_mm=2.5) == pytest.approx(40 / 56)
    assert surface_dice(a, b, (2.5, 1.0, 1.0), tolerance_mm=5.0) == 1.0
    assert surface_dice(a, b, (2.5, 1.0, 1.0), tolerance_mm=0.5) == pytest.approx(24 / 56)


def test_empty_masks():
    empty = np.zeros((4, 4, 4), dtype=bool)
    full = cube((4, 4, 4), (0, 0, 0), edge=2)
    spacing = (1.0, 1.0, 1.0)
    assert dice(empty, empty) == 1.0 and dice(empty, full) == 0.0
    assert hausdorff95(empty, empty, spacing) == 0.0
    assert hausdorff95(empty, full, spacing) == math.inf and hausdorff95(full, empty, spacing) == math.inf
    assert surface_dice(empty, empty, spacing, 2.0) == 1.0 and surface_dice(full, empty, spacing, 2.0) == 0.0


def test_voxels_on_the_array_border_are_surface():
    full = np.ones((3, 3, 3), dtype=bool)
    expected = full.copy()
    expected[1, 1, 1] = False
    assert np.array_equal(surface(full), expected)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


@settings(max_examples=60, deadline=None)
@given(
    masks=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 7)).flatmap(
        lambda shape: st.tuples(arrays(bool, shape), arrays(bool, shape))
    ),
    spacing=st.tuples(*[st.sampled_from([0.5, 0.75, 1.0, 2.0, 3.0])] * 3),
    tolerance=st.sampled_from([0.5, 1.0, 1.5, 3.0]),
)
def test_agreement_with_brute_force(masks, spacing, tolerance):
    pred, ref = masks
    total = pred.sum() + ref.sum()
    assert dice(pred, ref) == pytest.approx(2 * (pred & ref).sum() / total if total else 1.0)
    if pred.any() and ref.any():
        to_ref = brute_force_distances(pred, ref, spacing)
        to_pred = brute_force_distances(ref, pred, spacing)
        expected_hd95 = max(np.percentile(to_ref, 95), np.percentile(to_pred, 95))
        close = (to_ref <= tolerance).sum() + (to_pred <= tolerance).sum()
        assert hausdorff95(pred, ref, spacing) == pytest.approx(expected_hd95, abs=1e-9)
        expected_surface_dice = close / (to_ref.size + to_pred.size)
        assert surface_dice(pred, ref, spacing, tolerance) == pytest.approx(expected_surface_dice)


def test_kits_case_metrics_on_label_maps():
    ref = np.zeros((6, 8, 8), dtype=np.uint8)
    ref[1:5, 1:5, 1:5] = 1
    ref[2:4, 2:4, 2:4] = 2
    pred = ref.copy()
    pred[2:4, 2:4, 2:4] = 1  # tumour called kidney: kidney region unchanged, tumour missed
    pred[1:3, 1:3, 6:8] = 2  # a tumour outside the kidney: 8 voxels
    spacing = (2.0, 1.0, 1.0)
    result = kits_case_metrics(pred, ref, spacing)
    assert list(result) == list(METRIC_NAMES)
    assert result["kidney_dice"] == pytest.approx(2 * 64 / (72 + 64))
    assert result["tumour_dice"] == 0.0
    assert result["composite_dice"] == pytest.approx(result["kidney_dice"] / 2)
    assert result["kidney_volume_ref_ml"] == pytest.approx(64 * 2 / 1000)
    assert result["kidney_volume_pred_ml"] == pytest.approx(72 * 2 / 1000)
    assert result["tumour_volume_ref_ml"] == pytest.approx(8 * 2 / 1000)
    assert result["tumour_volume_pred_ml"] == pytest.approx(8 * 2 / 1000)
    assert result["kidney_hd95_mm"] == pytest.approx(hausdorff95(pred > 0, ref > 0, spacing))
    perfect = kits_case_metrics(ref, ref, spacing)
    assert perfect["composite_dice"] == 1.0
    assert perfect["tumour_hd95_mm"] == 0.0 and perfect["tumour_surface_dice"] == 1.0


def test_invalid_labels_are_listed_with_counts():
    labels = np.zeros((3, 3, 3), dtype=np.int16)
    labels[0, 0, :2] = 3
    labels[1, 1, 1] = -1
    assert describe_invalid_labels(labels) == "labels outside {0, 1, 2} (value: voxels) -1: 1, 3: 2"
    assert describe_invalid_labels(np.array([0.0, 1.0, 2.0])) is None
    assert "0.5: 1" in describe_invalid_labels(np.array([0.0, 0.5]))
    with pytest.raises(ValueError, match="prediction: labels outside"):
        kits_case_metrics(labels, np.zeros_like(labels), (1, 1, 1))
