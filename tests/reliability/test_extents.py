"""Checklist 14: unusual extents run end to end through inference without crashing, and the
exported label map has exactly the input's grid (no padding left in it).

The cases: KiTS19's case_00160 in-plane size (512 x 796) with case_00061's 29 slices at 5 mm,
and a volume smaller than one patch at 4 mm. The plan is the test plan on a coarse 4 mm /
16 mm grid, so the whole dual-resolution prediction takes a fraction of a second."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from kitspipe.geometry import Geometry
from kitspipe.imageio import to_canonical
from kitspipe.inference.export import labels_from_probabilities, write_prediction
from kitspipe.inference.run import postprocessing_settings, predict_case
from kitspipe.trainers.builtin import build_dual_network

KITS_DIRECTION = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0)
CASES = {
    # ITK size (slices, rows, cols) and spacing, as KiTS19 stores them
    "512x796 in-plane, 29 slices at 5 mm": ((29, 796, 512), (5.0, 0.78125, 0.78125)),
    "smaller than a patch at 4 mm": ((6, 5, 7), (4.0, 4.0, 4.0)),
}


@pytest.mark.parametrize("size, spacing", CASES.values(), ids=CASES.keys())
def test_item_14_unusual_extents_predict_and_export_on_the_input_grid(tmp_path, small_plans, size, spacing,
                                                                      one_torch_thread):
    plans = replace(small_plans, high=replace(small_plans.high, spacing_mm=(4.0,) * 3),
                    low=replace(small_plans.low, spacing_mm=(16.0,) * 3))
    rng = np.random.default_rng(0)
    voxels = np.full(size[::-1], -1000, np.int16)  # air, with soft tissue in the middle rows of every slice
    body = np.s_[:, size[1] // 4: size[1] - size[1] // 4, :]
    voxels[body] = rng.normal(40.0, 30.0, voxels[body].shape)
    stored = sitk.GetImageFromArray(voxels)
    stored.SetSpacing(spacing)
    stored.SetDirection(KITS_DIRECTION)
    image = to_canonical(stored, dtype=np.float32)
    torch.manual_seed(0)
    network = build_dual_network(plans).eval()

    regions, low, _ = predict_case([network], image, plans, "fast", torch.device("cpu"))
    assert regions.shape == (2, *image.array.shape) and np.isfinite(regions).all()
    # Post-processing is off: it works on the exported grid and has its own tests.
    labels = labels_from_probabilities(regions, low, image.grid.spacing, postprocessing_settings(plans, False))
    write_prediction(labels, image, tmp_path / "case.nii.gz")
    written = sitk.ReadImage(str(tmp_path / "case.nii.gz"))
    assert written.GetSize() == stored.GetSize()
    assert Geometry.of(written).differences(Geometry.of(stored)) == []
    assert set(np.unique(sitk.GetArrayFromImage(written))) <= {0, 1, 2}
