"""Checklist 17: every nnU-Net raw-layout error is found by discovery and named by file.

Discovery never opens an image, so the NIfTI files here are empty placeholders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kitspipe.dataset import discover
from kitspipe.errors import KitspipeError

LABELS = {"background": 0, "kidney": 1, "tumor": 2}


def _raw(root: Path, images: list[str], label_files: list[str], **meta) -> Path:
    """An nnU-Net raw folder with the given file names in ``imagesTr`` and ``labelsTr``."""
    for folder, names in (("imagesTr", images), ("labelsTr", label_files)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / folder / name).write_bytes(b"")
    dataset = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": len(label_files), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps({**dataset, **meta}))
    return root


def _errors(root: Path) -> list[str]:
    with pytest.raises(KitspipeError) as caught:
        discover(root, stage="check")
    return str(caught.value).splitlines()


def test_item_17_good_raw_layout_passes(tmp_path):
    root = _raw(tmp_path, ["case_00000_0000.nii.gz", "case_00001_0000.nii.gz"],
                ["case_00000.nii.gz", "case_00001.nii.gz"])
    assert [c.case_id for c in discover(root).labelled] == ["case_00000", "case_00001"]


def test_item_17_missing_channel_suffix(tmp_path):
    root = _raw(tmp_path, ["case_00000.nii.gz"], ["case_00000.nii.gz"])
    images, labels = root / "imagesTr", root / "labelsTr"
    # Never the mangled id nnU-Net derives ("case"): the image is refused, so its label is an orphan.
    assert _errors(root) == [
        f"kitspipe: check: - {images / 'case_00000.nii.gz'}: image name lacks the channel suffix "
        "(case_00000.nii.gz vs <case>_0000.nii.gz)",
        f"kitspipe: check: case_00000 {labels / 'case_00000.nii.gz'}: label without a training image in imagesTr",
        f"kitspipe: check: - {root / 'dataset.json'}: numTraining does not match the cases found (0 vs 1)",
    ]


def test_item_17_unexpected_second_channel(tmp_path):
    root = _raw(tmp_path, ["case_00000_0000.nii.gz", "case_00000_0001.nii.gz"], ["case_00000.nii.gz"])
    assert _errors(root) == [f"kitspipe: check: case_00000 {root / 'imagesTr' / 'case_00000_0001.nii.gz'}: "
                             "unexpected channel (0001 vs only _0000 (CT))"]


def test_item_17_file_ending_mismatch(tmp_path):
    root = _raw(tmp_path, ["case_00000_0000.nii.gz", "case_00001_0000.nii"],
                ["case_00000.nii.gz", "case_00001.nii"], numTraining=1)
    assert _errors(root) == [
        f"kitspipe: check: - {root / 'imagesTr' / 'case_00001_0000.nii'}: file ending does not match dataset.json "
        "(case_00001_0000.nii vs *.nii.gz)",
        f"kitspipe: check: - {root / 'labelsTr' / 'case_00001.nii'}: file ending does not match dataset.json "
        "(case_00001.nii vs *.nii.gz)",
    ]


def test_item_17_unsupported_file_ending(tmp_path):
    root = _raw(tmp_path, ["case_00000_0000.mha"], ["case_00000.mha"], file_ending=".mha")
    assert _errors(root) == [f"kitspipe: check: - {root / 'dataset.json'}: unsupported file_ending (.mha vs .nii.gz)"]


def test_item_17_num_training_mismatch(tmp_path):
    root = _raw(tmp_path, ["case_00000_0000.nii.gz"], ["case_00000.nii.gz"], numTraining=3)
    assert _errors(root) == [f"kitspipe: check: - {root / 'dataset.json'}: numTraining does not match the cases "
                             "found (1 vs 3)"]


def test_item_17_non_consecutive_labels(tmp_path):
    root = _raw(tmp_path, ["case_00000_0000.nii.gz"], ["case_00000.nii.gz"],
                labels={"background": 0, "kidney": 1, "tumor": 3})
    path = root / "dataset.json"
    assert _errors(root) == [
        f"kitspipe: check: - {path}: label values are not consecutive ([0, 1, 3] vs 0, 1, 2)",
        f"kitspipe: check: - {path}: labels beyond background/kidney/tumour ([3] vs 0, 1, 2)",
    ]


def test_item_17_extra_files_in_labels_tr(tmp_path):
    root = _raw(tmp_path, ["case_00000_0000.nii.gz"], ["case_00000.nii.gz", "case_00007.nii.gz", "notes.txt"],
                numTraining=1)
    labels = root / "labelsTr"
    (labels / ".DS_Store").write_bytes(b"")  # hidden files are ignored
    assert _errors(root) == [
        f"kitspipe: check: case_00007 {labels / 'case_00007.nii.gz'}: label without a training image in imagesTr",
        f"kitspipe: check: - {labels / 'notes.txt'}: file ending does not match dataset.json (notes.txt vs *.nii.gz)",
    ]
