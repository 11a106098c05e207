"""Checklist 45 and 46: the number of workers and the order a filesystem lists a folder in change
nothing, and adding unlabelled (test) cases does not change the fingerprint, the preprocessed
cases or the training splits."""

from __future__ import annotations

import json
import os
import pathlib
from pathlib import Path

import numpy as np

from kitspipe.fingerprint import run_fingerprint
from kitspipe.planning import run_plan
from kitspipe.preprocessing import run_preprocess
from kitspipe.training.splits import load_or_create_splits
from tests.conftest import phantom_arrays, write_kits_case

SPACINGS = [(3.0, 2.0, 2.0), (2.5, 1.8, 1.8), (4.0, 2.2, 2.2), (3.0, 2.0, 2.0)]


def _scramble_listings(monkeypatch) -> None:
    """Every way of listing a folder returns its entries reversed, then rotated by one: neither
    sorted nor reverse-sorted, as on a filesystem that lists in hash order."""
    def scramble(entries: list) -> list:
        entries = list(reversed(entries))
        return entries[1:] + entries[:1]

    class Scandir(list):
        # os.scandir is also used as a context manager (by shutil, for one).
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def close(self):
            pass

    listdir, scandir, iterdir = os.listdir, os.scandir, pathlib.Path.iterdir
    monkeypatch.setattr(os, "listdir", lambda path=".": scramble(listdir(path)))
    monkeypatch.setattr(os, "scandir", lambda path=".": Scandir(scramble(list(scandir(path)))))
    monkeypatch.setattr(pathlib.Path, "iterdir", lambda self: iter(scramble(list(iterdir(self)))))


def _pipeline(data: Path, work: Path) -> dict:
    """fingerprint -> plan -> preprocess -> splits, as ``kitspipe train`` draws them."""
    run_fingerprint(data, work, progress=False)
    run_plan(work, preset="cpu")
    plans = json.loads((work / "plans.json").read_text())
    plans["high"]["spacing_mm"], plans["low"]["spacing_mm"] = [2.0] * 3, [8.0] * 3  # small arrays
    (work / "plans.json").write_text(json.dumps(plans))
    run_preprocess(work, progress=False)
    manifest = json.loads((work / "preprocessed" / "manifest.json").read_text())
    splits = load_or_create_splits(work, sorted(manifest["cases"]), n_folds=2, seed=0, validation_fraction=0.2)
    return {"fingerprint": json.loads((work / "fingerprint.json").read_text())["sha256"],
            "plans": (work / "plans.json").read_bytes(), "cases": sorted(manifest["cases"]), "splits": splits,
            "arrays": {p.relative_to(work).as_posix(): p.read_bytes()
                       for p in sorted((work / "preprocessed").rglob("*.npy"))}}


def _small_dataset(data: Path) -> None:
    for index, spacing in enumerate(SPACINGS):
        image, label = phantom_arrays(shape_zyx=(12, 20, 24), spacing_zyx=spacing, seed=index)
        write_kits_case(data, f"case_{index:05d}", image, label, spacing)


def test_item_45_fingerprint_identical_with_two_workers(tmp_path):
    data = tmp_path / "data"
    _small_dataset(data)
    serial = run_fingerprint(data, tmp_path / "serial", jobs=1, progress=False).read_bytes()
    pooled = run_fingerprint(data, tmp_path / "pooled", jobs=2, progress=False).read_bytes()
    assert pooled == serial


def test_item_46_listing_order_and_unlabelled_cases_change_nothing(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _small_dataset(data)
    reference = _pipeline(data, tmp_path / "work_a")

    _scramble_listings(monkeypatch)
    assert [p.name for p in data.iterdir()] != sorted(p.name for p in data.iterdir())
    for index in (210, 211, 299):  # KiTS19's test cases have no segmentation
        image, _ = phantom_arrays(shape_zyx=(12, 20, 24), seed=index)
        write_kits_case(data, f"case_{index:05d}", image, None, (3.0, 2.0, 2.0))
    scrambled = _pipeline(data, tmp_path / "work_b")

    assert scrambled == reference
    assert reference["cases"] == [f"case_{i:05d}" for i in range(4)]
    tested = sorted(c for fold in reference["splits"] for c in fold["test"])
    assert tested == reference["cases"] and np.all([len(f["test"]) == 2 for f in reference["splits"]])
