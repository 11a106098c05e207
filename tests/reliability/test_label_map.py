"""Checklist 26: the label map that ``dataset.json`` declares is cross-checked against the label
histogram that ``check`` measures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kitspipe.dataset import discover
from kitspipe.validation import check_dataset

KITS_MAP = {"background": 0, "kidney": 1, "tumor": 2}


def _raw(kits, labels: np.ndarray, label_map: dict) -> Path:
    """A one-case nnU-Net raw dataset with real (tiny) NIfTI files."""
    root = kits.root
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    kits.write(root / "imagesTr" / "case_00000_0000.nii.gz", kits.ct())
    kits.write(root / "labelsTr" / "case_00000.nii.gz", labels)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": label_map,
                                                   "numTraining": 1, "file_ending": ".nii.gz"}))
    return root


def _check(root: Path) -> tuple[list[str], list[str]]:
    report = check_dataset(discover(root), progress=False)
    return [p.line() for p in report.problems], [p.line() for p in report.warnings]


def test_item_26_consistent_label_map_passes(kits):
    assert _check(_raw(kits, kits.labels(), KITS_MAP)) == ([], [])


def test_item_26_label_value_missing_from_the_map_is_an_error(kits):
    root = _raw(kits, kits.labels(), {"background": 0, "kidney": 1})  # the files hold tumour (2) voxels
    errors, _ = _check(root)
    assert errors == [f"kitspipe: check: - {root / 'dataset.json'}: label value 2 is in the data but not in "
                      "dataset.json (8 voxels in 1 cases vs declared [0, 1])"]


def test_item_26_declared_class_absent_from_every_case_is_warned(kits):
    labels = kits.labels()
    labels[labels == 2] = 1
    root = _raw(kits, labels, KITS_MAP)
    assert _check(root) == ([], [f"kitspipe: check: - {root / 'dataset.json'}: label 2 (tumor) is declared but no "
                                 "case contains it (0 voxels vs some voxels) [warning]"])


def test_item_26_swapped_kidney_and_tumour_are_warned(kits):
    labels = kits.labels()
    swapped = np.where(labels == 1, 2, np.where(labels == 2, 1, 0)).astype(np.uint8)
    root = _raw(kits, swapped, KITS_MAP)
    assert _check(root) == ([], [f"kitspipe: check: - {root / 'dataset.json'}: more tumour than kidney voxels over "
                                 "the dataset; are labels 1 and 2 swapped? (24 tumour voxels vs fewer than the 8 "
                                 "kidney voxels) [warning]"])


def test_item_26_swap_is_also_warned_for_the_kits_layout(kits):
    labels = kits.labels()
    kits.case(label=np.where(labels == 1, 2, np.where(labels == 2, 1, 0)).astype(np.uint8))
    _, warnings = _check(kits.root)
    assert warnings == [f"kitspipe: check: - {kits.root}: more tumour than kidney voxels over the dataset; are "
                        "labels 1 and 2 swapped? (24 tumour voxels vs fewer than the 8 kidney voxels) [warning]"]
