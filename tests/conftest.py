"""Shared fixtures: tiny KiTS19-layout datasets written in a temporary folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

KITS_DIRECTION = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0)


def phantom_arrays(shape_zyx=(24, 40, 48), spacing_zyx=(3.0, 2.0, 2.0), seed=0, tumour=True):
    """A body ellipse with two kidney ellipsoids and optionally a tumour, in canonical (z, y, x)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[(np.arange(n) - n / 2 + 0.5) * s for n, s in zip(shape_zyx, spacing_zyx)], indexing="ij")
    image = np.full(shape_zyx, -1000.0, dtype=np.float32)
    body = (y / (shape_zyx[1] * spacing_zyx[1] * 0.45)) ** 2 + (x / (shape_zyx[2] * spacing_zyx[2] * 0.45)) ** 2 < 1
    image[body] = 40.0
    label = np.zeros(shape_zyx, dtype=np.uint8)
    for side in (-1, 1):
        cx = side * shape_zyx[2] * spacing_zyx[2] * 0.2 + rng.uniform(-2, 2)
        kidney = ((z / 25) ** 2 + ((y - 5) / 12) ** 2 + ((x - cx) / 10) ** 2) < 1
        label[kidney] = 1
        image[kidney] = 160.0
    if tumour:
        cx = shape_zyx[2] * spacing_zyx[2] * 0.2 + 6
        ball = ((z - 5) ** 2 + (y - 5) ** 2 + (x - cx) ** 2) < 6.0 ** 2
        label[ball] = 2
        image[ball] = 70.0
    image += rng.normal(0, 10, shape_zyx).astype(np.float32)
    return image, label


def kits_image(canonical: np.ndarray, spacing_zyx) -> sitk.Image:
    """Store a canonical (z, y, x) array the way KiTS19 files are: ITK index axes (slice, y, x)
    with direction (0,0,1; 0,1,0; -1,0,0), i.e. numpy array (x, y, slice) reversed."""
    # ITK index i -> world -z (slice), j -> y, k -> x.  numpy array of GetImageFromArray is (k, j, i).
    stored = np.ascontiguousarray(np.flip(canonical, axis=0).transpose(2, 1, 0))
    image = sitk.GetImageFromArray(stored)
    image.SetSpacing((float(spacing_zyx[0]), float(spacing_zyx[1]), float(spacing_zyx[2])))
    image.SetDirection(KITS_DIRECTION)
    image.SetOrigin((0.0, 0.0, 0.0))
    return image


def write_kits_case(root: Path, case_id: str, image: np.ndarray, label: np.ndarray | None, spacing_zyx) -> Path:
    folder = root / case_id
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.Cast(kits_image(np.rint(image), spacing_zyx), sitk.sitkInt16), str(folder / "imaging.nii.gz"))
    if label is not None:
        sitk.WriteImage(sitk.Cast(kits_image(label, spacing_zyx), sitk.sitkUInt8), str(folder / "segmentation.nii.gz"))
    return folder


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """Four labelled KiTS-layout cases with different anisotropic spacings."""
    root = tmp_path / "data"
    spacings = [(3.0, 2.0, 2.0), (2.5, 1.8, 1.8), (4.0, 2.2, 2.2), (3.0, 2.0, 2.0)]
    for index, spacing in enumerate(spacings):
        image, label = phantom_arrays(spacing_zyx=spacing, seed=index, tumour=index != 3)
        write_kits_case(root, f"case_{index:05d}", image, label, spacing)
    return root


TINY_NETWORK = {
    "high": {"spacing_mm": [2.0, 2.0, 2.0], "base_filters": 4, "depth": 2, "input_patch": [44, 44, 44],
             "output_patch": [4, 4, 4]},
    "low": {"spacing_mm": [8.0, 8.0, 8.0], "base_filters": 4, "depth": 2, "input_patch": [52, 52, 52],
            "output_patch": [12, 12, 12]},
}


@pytest.fixture
def tiny_work(tiny_dataset, tmp_path):
    """fingerprint -> plan (cpu preset shrunk to tiny widths and patches) -> preprocess."""
    import json

    from kitspipe.fingerprint import run_fingerprint
    from kitspipe.planning import run_plan
    from kitspipe.preprocessing import run_preprocess

    work = tmp_path / "work"
    run_fingerprint(tiny_dataset, work, progress=False)
    run_plan(work, preset="cpu")
    plans = json.loads((work / "plans.json").read_text())
    plans.update(TINY_NETWORK)
    plans["network"].update({"head_conv_filters": [4, 4], "head_fc": [8, 8, 4], "head_fc_after_volume": [4, 4]})
    plans["training"].update({"steps_per_epoch": 2, "max_epochs": 2, "pretraining_max_epochs": 1, "num_workers": 0,
                              "max_minutes": None, "n_folds": 2})
    plans["augmentation"]["enabled"] = False
    # Tiny 44³ -> 4³ patches would need thousands of training-size tiles per case, so these plans
    # keep large fast tiles, with the batch norm that makes them exact.
    plans["network"]["normalisation"] = "batch"
    plans["inference"].update({"max_tile_voxels": 4_000_000, "tile_mode": "fast"})
    (work / "plans.json").write_text(json.dumps(plans))
    run_preprocess(work, progress=False)
    return work
