"""Checklist 13: the orientation zoo through preprocessing and export, with an identity "model".

The model is replaced by the preprocessed label itself, so whatever differs between the label
file and the exported one comes from reorientation, resampling, cropping and export. Files are
written and read as NIfTI, as in a run."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from kitspipe.geometry import Geometry
from kitspipe.imageio import read_volume
from kitspipe.inference.export import labels_from_probabilities, to_source_grid, write_prediction
from kitspipe.metrics import dice
from kitspipe.plans import load_preset
from kitspipe.postprocessing import PostprocessingSettings
from kitspipe.preprocessing import prepare_case
from tests.conftest import phantom_arrays

OFF = PostprocessingSettings(keep_largest_kidney_per_side=False, drop_unconnected_tumour=False,
                             low_resolution_mask=False)
C, S = math.cos(0.3), math.sin(0.3)
DIRECTIONS = {  # ITK direction matrices (LPS world), row-major
    "IPL (KiTS19)": (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0),
    "RAS": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    "LPS": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    "oblique": (C, -S, 0.0, S, C, 0.0, 0.0, 0.0, 1.0),  # 17° about the patient's long axis
}


def _round_trip(tmp_path, direction, spacing_xyz, plan_mm: float) -> tuple[sitk.Image, sitk.Image]:
    """(the label file, the exported label) after preprocessing onto a ``plan_mm`` grid and back."""
    image_zyx, label_zyx = phantom_arrays(shape_zyx=(30, 44, 52), spacing_zyx=spacing_xyz[::-1], seed=3)
    paths = {}
    for name, array, pixel in (("image", image_zyx, sitk.sitkInt16), ("label", label_zyx, sitk.sitkUInt8)):
        stored = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
        stored.SetSpacing(spacing_xyz)
        stored.SetDirection(direction)
        stored.SetOrigin((5.0, -3.0, 2.0))
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(sitk.Cast(stored, pixel), str(paths[name]))
    base = load_preset("cpu")
    plans = replace(base, high=replace(base.high, spacing_mm=(plan_mm,) * 3),
                    low=replace(base.low, spacing_mm=(4 * plan_mm,) * 3))
    image = read_volume(paths["image"], dtype=np.float32)
    prepared = prepare_case(image, read_volume(paths["label"]).array, plans)
    identity = np.stack([prepared.high_label > 0, prepared.high_label == 2]).astype(np.float32)
    on_source = to_source_grid(identity, prepared.high_grid, image, prepared.crop)
    write_prediction(labels_from_probabilities(on_source, None, image.grid.spacing, OFF), image,
                     tmp_path / "exported.nii.gz")
    return sitk.ReadImage(str(paths["label"])), sitk.ReadImage(str(tmp_path / "exported.nii.gz"))


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
def test_item_13_identity_model_on_the_plan_grid_returns_the_label_unchanged(tmp_path, direction):
    label, exported = _round_trip(tmp_path, direction, (2.0, 2.0, 2.0), plan_mm=2.0)
    assert Geometry.of(exported).differences(Geometry.of(label)) == []
    assert exported.GetSize() == label.GetSize()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(exported), sitk.GetArrayFromImage(label))


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
def test_item_13_identity_model_through_a_resampled_grid_keeps_geometry_and_labels(tmp_path, direction):
    # 1.9 x 1.7 x 3.0 mm to the plan's 1 mm grid and back: the geometry must be exact and the
    # labels may move only by interpolation.
    label, exported = _round_trip(tmp_path, direction, (1.9, 1.7, 3.0), plan_mm=1.0)
    assert Geometry.of(exported).differences(Geometry.of(label)) == []
    result, reference = sitk.GetArrayFromImage(exported), sitk.GetArrayFromImage(label)
    assert dice(result > 0, reference > 0) >= 0.97 and dice(result == 2, reference == 2) >= 0.97
