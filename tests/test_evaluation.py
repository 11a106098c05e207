import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from kitspipe.errors import KitspipeError
from kitspipe.evaluation import (
    PER_CASE_CSV,
    SUMMARY_JSON,
    evaluate_pairs,
    pair_predictions,
    plot_per_case_dice,
)
from kitspipe.metrics import METRIC_NAMES, kits_case_metrics

SPACING_ZYX = (3.0, 0.8, 0.8)
IPL_DIRECTION = (0, 0, -1, 0, -1, 0, -1, 0, 0)


def write_labels(path, labels, spacing_zyx=SPACING_ZYX, origin=(0.0, 0.0, 0.0), direction=IPL_DIRECTION):
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


def reference_labels(seed):
    rng = np.random.default_rng(seed)
    labels = np.zeros((6, 10, 12), dtype=np.uint8)
    z, y = rng.integers(0, 2, size=2)
    labels[1 + z : 5, 2 + y : 8, 2:10] = 1
    labels[2:4, 3:6, 3:6] = 2
    return labels


@pytest.fixture
def dataset(tmp_path):
    """Three cases: a perfect prediction, an imperfect one, and one with no tumour predicted."""
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    refs.mkdir()
    preds.mkdir()
    arrays = {}
    for i, case in enumerate(["case_00000", "case_00001", "case_00002"]):
        ref = reference_labels(i)
        pred = ref.copy()
        if i == 1:
            pred[1:3, 2:8, 2:10] = 0
        if i == 2:
            pred[pred == 2] = 1
        write_labels(refs / f"{case}.nii.gz", ref)
        write_labels(preds / f"{case}.nii.gz", pred)
        arrays[case] = (pred, ref)
    references = {case: refs / f"{case}.nii.gz" for case in arrays}
    return preds, references, arrays


def test_evaluate_writes_per_case_table_and_summary(tmp_path, dataset):
    preds, references, arrays = dataset
    pairs = pair_predictions(preds, references)
    table = evaluate_pairs(pairs, tmp_path / "eval", tolerance_mm=2.0)
    assert list(table.columns) == ["case", *METRIC_NAMES]
    assert list(table["case"]) == sorted(arrays)
    for _, row in table.iterrows():
        expected = kits_case_metrics(*arrays[row["case"]], SPACING_ZYX, 2.0)
        for name in METRIC_NAMES:
            assert row[name] == pytest.approx(expected[name])

    written = pd.read_csv(tmp_path / "eval" / PER_CASE_CSV)
    pd.testing.assert_frame_equal(written, table, check_exact=False, rtol=1e-12)
    summary = json.loads((tmp_path / "eval" / SUMMARY_JSON).read_text())
    assert summary["n_cases"] == 3 and summary["surface_dice_tolerance_mm"] == 2.0
    kidney = summary["metrics"]["kidney_dice"]
    assert kidney["mean"] == pytest.approx(table["kidney_dice"].mean())
    assert kidney["median"] == pytest.approx(table["kidney_dice"].median())
    assert kidney["std"] == pytest.approx(table["kidney_dice"].std(ddof=0))
    assert table.loc[0, "composite_dice"] == 1.0
    assert table.loc[2, "tumour_dice"] == 0.0


def test_infinite_hd95_is_counted_not_skipped(tmp_path, dataset):
    preds, references, _ = dataset
    table = evaluate_pairs(pair_predictions(preds, references), tmp_path / "eval")
    assert table.loc[2, "tumour_hd95_mm"] == math.inf
    hd95 = json.loads((tmp_path / "eval" / SUMMARY_JSON).read_text())["metrics"]["tumour_hd95_mm"]
    assert hd95["mean"] is None and hd95["std"] is None and hd95["n_infinite"] == 1
    assert hd95["median"] is not None
    assert pd.read_csv(tmp_path / "eval" / PER_CASE_CSV).loc[2, "tumour_hd95_mm"] == math.inf


def test_geometry_mismatches_are_all_reported_by_case(tmp_path, dataset):
    preds, references, arrays = dataset
    write_labels(preds / "case_00000.nii.gz", arrays["case_00000"][0], origin=(100.0, 0.0, 0.0))
    flipped = (0, 0, 1, 0, -1, 0, -1, 0, 0)
    write_labels(preds / "case_00001.nii.gz", arrays["case_00001"][0], direction=flipped)
    write_labels(preds / "case_00002.nii.gz", arrays["case_00002"][0][:, :, :-1])
    with pytest.raises(KitspipeError) as raised:
        evaluate_pairs(pair_predictions(preds, references), tmp_path / "eval")
    lines = str(raised.value).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("kitspipe: evaluate: case_00000 ") and "origin differs" in lines[0]
    assert lines[1].startswith("kitspipe: evaluate: case_00001 ") and "direction differs" in lines[1]
    assert lines[2].startswith("kitspipe: evaluate: case_00002 ") and "size differs" in lines[2]
    assert not (tmp_path / "eval").exists()


def test_spacing_within_float_noise_passes_and_beyond_fails(tmp_path, dataset):
    preds, references, arrays = dataset
    pred, _ = arrays["case_00001"]
    write_labels(preds / "case_00001.nii.gz", pred, spacing_zyx=(3.0, 0.8000001, 0.8))
    evaluate_pairs(pair_predictions(preds, references), tmp_path / "eval")
    write_labels(preds / "case_00001.nii.gz", pred, spacing_zyx=(3.0, 0.81, 0.8))
    with pytest.raises(KitspipeError, match="case_00001 .*spacing differs"):
        evaluate_pairs(pair_predictions(preds, references), tmp_path / "eval")


def test_missing_and_extra_predictions(tmp_path, dataset, caplog):
    preds, references, arrays = dataset
    (preds / "case_00001.nii.gz").unlink()
    write_labels(preds / "case_00009.nii.gz", arrays["case_00000"][0])
    (preds / ".tmp-case_00007.nii.gz.abc").write_bytes(b"partial")
    (preds / "notes.txt").write_text("ignored")
    with pytest.raises(KitspipeError) as raised:
        pair_predictions(preds, references)
    message = str(raised.value)
    assert "case_00001" in message and "prediction missing" in message
    assert "case_00009" in message and "prediction has no reference" in message
    assert "case_00007" not in message

    write_labels(preds / "case_00001.nii.gz", arrays["case_00001"][0])
    with caplog.at_level(logging.WARNING):
        pairs = pair_predictions(preds, references, allow_extra=True)
    assert [case for case, _, _ in pairs] == sorted(references)
    assert "case_00009" in caplog.text and "[warning]" in caplog.text


def test_bad_file_names_and_missing_folder(tmp_path, dataset):
    preds, references, arrays = dataset
    write_labels(preds / "bad name.nii.gz", arrays["case_00000"][0])
    with pytest.raises(KitspipeError, match="not a valid case id"):
        pair_predictions(preds, references)
    with pytest.raises(KitspipeError, match="prediction folder not found"):
        pair_predictions(tmp_path / "nowhere", references)


def test_unreadable_and_invalid_predictions_are_errors(tmp_path, dataset):
    preds, references, arrays = dataset
    (preds / "case_00000.nii.gz").write_bytes(b"not a nifti at all")
    bad = arrays["case_00001"][0].copy()
    bad[0, 0, 0] = 7
    write_labels(preds / "case_00001.nii.gz", bad)
    pairs = pair_predictions(preds, references)
    with pytest.raises(KitspipeError) as raised:
        evaluate_pairs(pairs, tmp_path / "eval")
    assert str(raised.value).count("\n") == 0 and "case_00000" in str(raised.value)
    assert "cannot read prediction image header" in str(raised.value)

    write_labels(preds / "case_00000.nii.gz", arrays["case_00000"][0])
    listing = r"invalid labels \(labels outside \{0, 1, 2\} \(value: voxels\) 7: 1"
    with pytest.raises(KitspipeError, match=r"case_00001 .*" + listing):
        evaluate_pairs(pairs, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_duplicate_and_empty_pair_lists(tmp_path, dataset):
    preds, references, _ = dataset
    pairs = pair_predictions(preds, references)
    with pytest.raises(KitspipeError, match="listed more than once"):
        evaluate_pairs(pairs + pairs[:1], tmp_path / "eval")
    with pytest.raises(KitspipeError, match="no cases"):
        evaluate_pairs([], tmp_path / "eval")


def test_plot_per_case_dice_writes_a_png(tmp_path, dataset):
    preds, references, _ = dataset
    table = evaluate_pairs(pair_predictions(preds, references), tmp_path / "eval")
    png = tmp_path / "plots" / "dice.png"
    plot_per_case_dice(table, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(png.parent.glob(".tmp-*"))
