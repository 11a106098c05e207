"""The first half of the pipeline on a tiny dataset: values, not just files."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kitspipe.atomic import atomic_write_json
from kitspipe.dataset import discover
from kitspipe.fingerprint import FINGERPRINT_FILE, compute_fingerprint, fingerprint_sha256
from kitspipe.imageio import read_volume
from kitspipe.networks.sizes import output_size
from kitspipe.planning import plan_from_fingerprint, run_plan
from kitspipe.plans import load_plans, load_preset
from kitspipe.preprocessing import run_preprocess


@pytest.fixture
def planned_work(tiny_dataset, tmp_path):
    work = tmp_path / "work"
    fingerprint = compute_fingerprint(discover(tiny_dataset), progress=False)
    atomic_write_json(work / FINGERPRINT_FILE, fingerprint)
    run_plan(work, preset="cpu")
    return work


def test_fingerprint_figures_equal_numpy(tiny_dataset):
    fingerprint = compute_fingerprint(discover(tiny_dataset), progress=False)
    assert fingerprint["sha256"] == fingerprint_sha256(fingerprint)
    first = fingerprint["cases"][0]
    image = read_volume(tiny_dataset / "case_00000" / "imaging.nii.gz").array
    label = read_volume(tiny_dataset / "case_00000" / "segmentation.nii.gz").array
    assert first["shape"] == list(image.shape)
    assert first["voxels"]["kidney"] == int((label == 1).sum())
    assert first["voxels"]["tumour"] == int((label == 2).sum())
    assert first["volume_ml"]["tumour"] == pytest.approx((label == 2).sum() * 3.0 * 2.0 * 2.0 / 1000, rel=1e-5)
    nonzero = np.nonzero(label)
    assert first["foreground_bbox"] == [[int(a.min()), int(a.max()) + 1] for a in nonzero]
    # Few foreground voxels, so the HU sample is complete and statistics are exact.
    kidney_hu = np.sort(image[label == 1])
    assert np.allclose(first["hu_sample"]["kidney"], kidney_hu, atol=0.051)
    summary = fingerprint["summary"]
    assert summary["n_cases"] == 4 and summary["n_with_tumour"] == 3
    assert summary["spacing_mm"]["z"]["median"] == pytest.approx(np.median([3.0, 2.5, 4.0, 3.0]))
    all_foreground = np.concatenate([np.concatenate([c["hu_sample"]["kidney"], c["hu_sample"]["tumour"]])
                                     for c in fingerprint["cases"]])
    assert summary["hu"]["foreground"]["mean"] == pytest.approx(all_foreground.mean(), abs=1e-6)
    assert summary["hu"]["foreground"]["p99_5"] == pytest.approx(np.percentile(all_foreground, 99.5), abs=1e-6)


def test_fingerprint_independent_of_listing_order(tiny_dataset, tmp_path):
    reordered = tmp_path / "reordered"
    reordered.mkdir()
    for case in sorted(tiny_dataset.iterdir(), reverse=True):
        shutil.copytree(case, reordered / case.name)
    a = compute_fingerprint(discover(tiny_dataset), progress=False)
    b = compute_fingerprint(discover(reordered), progress=False)
    assert a["sha256"] == b["sha256"]


def test_planner_patch_sizes_are_valid(planned_work):
    plans = load_plans(planned_work / "plans.json")
    for branch in (plans.high, plans.low):
        assert branch.output_patch == tuple(output_size(s, branch.depth, borders=branch.borders)
                                            for s in branch.input_patch)
    # cpu preset: the low-resolution output spans the whole high-resolution input.
    assert plans.low.output_patch[0] * plans.low.spacing_mm[0] >= plans.high.input_patch[0] * plans.high.spacing_mm[0]
    assert plans.intensity.std > 0 and -500 <= plans.intensity.mean <= 400
    assert all(w >= 1 for w in plans.loss.high_positive_weights)
    paper = plan_from_fingerprint(load_preset("paper"), json.loads((planned_work / "fingerprint.json").read_text()))
    assert paper.high.input_patch == (108,) * 3 and paper.low.output_patch == (20,) * 3


def test_preprocess_writes_aligned_grids_and_skips_up_to_date_cases(planned_work):
    out = run_preprocess(planned_work, progress=False)
    plans = load_plans(planned_work / "plans.json")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and sorted(manifest["cases"]) == [f"case_0000{i}" for i in range(4)]
    case = out / "case_00000"
    high_image = np.load(case / "high_image.npy", allow_pickle=False)
    high_label = np.load(case / "high_label.npy", allow_pickle=False)
    low_label = np.load(case / "low_label.npy", allow_pickle=False)
    assert high_image.dtype == np.int16 and high_label.dtype == np.uint8
    assert high_image.min() >= -500 and high_image.max() <= 400
    assert all(h == plans.scale * l for h, l in zip(high_label.shape, low_label.shape))
    properties = json.loads((case / "properties.json").read_text())
    original = read_volume(Path(discover(planned_work.parent / "data").by_id()["case_00000"].label)).array
    voxel_ml_high = np.prod(plans.high.spacing_mm) / 1000
    assert (high_label == 2).sum() * voxel_ml_high == pytest.approx((original == 2).sum() * 12 / 1000, rel=0.15)
    assert properties["has_tumour"] and len(properties["locations"]["tumour"]) > 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    run_preprocess(planned_work, progress=False)
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}


def test_preprocess_is_bitwise_reproducible_and_redoes_corrupt_cases(planned_work):
    out = run_preprocess(planned_work, progress=False)
    digests = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.npy")}
    victim = out / "case_00001" / "high_image.npy"
    victim.write_bytes(victim.read_bytes()[:100])  # what a kill before atomic writes would leave
    (out / "case_00002" / ".tmp-high_label.npy.x").write_bytes(b"partial")
    run_preprocess(planned_work, progress=False)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*.npy")} == digests
    assert not list(out.rglob(".tmp-*"))


def test_preprocess_refuses_plans_from_another_fingerprint(planned_work):
    from kitspipe.errors import KitspipeError

    data = json.loads((planned_work / "plans.json").read_text())
    data["fingerprint_sha256"] = "0" * 64
    (planned_work / "plans.json").write_text(json.dumps(data))
    with pytest.raises(KitspipeError, match="plans were made from another fingerprint"):
        run_preprocess(planned_work, progress=False)


def test_preprocess_refuses_data_changed_after_fingerprint(planned_work):
    from kitspipe.errors import KitspipeError

    import SimpleITK as sitk

    label = planned_work.parent / "data" / "case_00002" / "segmentation.nii.gz"

    edited = sitk.ReadImage(str(label))
    edited = sitk.Cast(edited, sitk.sitkUInt8)
    array = sitk.GetArrayFromImage(edited)
    array[0, 0, 0] = 1
    changed = sitk.GetImageFromArray(array)
    changed.CopyInformation(edited)
    sitk.WriteImage(changed, str(label))
    with pytest.raises(KitspipeError, match="case_00002 .*differs from the fingerprinted data"):
        run_preprocess(planned_work, progress=False)
