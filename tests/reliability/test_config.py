"""Checklist 22, 24 and 25: a fold out of range, a bad split file, and a plan changed after preprocessing.

All are refused before any training step, with one error line per problem."""

import hashlib
import json
import re

import pytest

from kitspipe.errors import KitspipeError
from kitspipe.manifest import require_complete
from kitspipe.plans import load_plans
from kitspipe.preprocessing import run_preprocess
from kitspipe.training.run import train_fold

CASES = ["case_00000", "case_00001", "case_00002", "case_00003"]
GOOD = [{"train": ["case_00002"], "validation": ["case_00003"], "test": ["case_00000", "case_00001"]},
        {"train": ["case_00000"], "validation": ["case_00001"], "test": ["case_00002", "case_00003"]}]


def _with(fold: int, **parts) -> list[dict]:
    folds = json.loads(json.dumps(GOOD))
    folds[fold].update(parts)
    return folds


@pytest.mark.parametrize("folds, expected", [
    (_with(0, test=["case_00000", "case_00001", "case_09999"]),
     [r"case_09999 {splits}: fold 0 test names an unknown case"]),
    (_with(1, test=["case_00001", "case_00002", "case_00003"]),
     [r"case_00001 {splits}: fold 1: case in both validation and test",
      r"case_00001 {splits}: case tested in two folds \(folds 0 and 1\)"]),
    (_with(0, validation=["case_00002"]),
     [r"case_00002 {splits}: fold 0: case in both train and validation"]),
    (_with(1, train=["case_00000", "case_00002"]),
     [r"case_00002 {splits}: fold 1: case in both train and test"]),
    (_with(1, test=["case_00002"]),
     [r"case_00003 {splits}: case in no fold's test set; delete the file to draw the folds again "
      r"\(made before cases were added\?\)"]),
], ids=["unknown case", "tested in two folds", "train/validation overlap", "train/test overlap", "partial dataset"])
def test_item_24_bad_split_file_is_refused_with_one_line_per_problem(tiny_work, folds, expected):
    splits = tiny_work / "splits.json"
    splits.write_text(json.dumps(folds))
    with pytest.raises(KitspipeError) as caught:
        train_fold(tiny_work, 0, trainer="UNet3DTrainer", epochs=1, progress=False)
    lines = str(caught.value).splitlines()
    patterns = [rf"kitspipe: split: {p.format(splits=re.escape(str(splits)))}" for p in expected]
    assert len(lines) == len(patterns) and all(re.fullmatch(p, line) for p, line in zip(patterns, lines)), lines
    assert not (tiny_work / "fold_0").exists(), "training started on a bad split"


def test_item_24_good_split_file_is_used_as_written(tiny_work):
    from kitspipe.training.splits import fold_cases, load_or_create_splits

    (tiny_work / "splits.json").write_text(json.dumps(GOOD))
    folds = load_or_create_splits(tiny_work, CASES, n_folds=2, seed=0, validation_fraction=0.2)
    assert fold_cases(folds, 1, tiny_work / "splits.json") == GOOD[1]


def _edit_plans(work, section: str, key: str, value) -> None:
    plans = json.loads((work / "plans.json").read_text())
    plans[section][key] = value
    (work / "plans.json").write_text(json.dumps(plans))


def _array_hashes(work) -> dict[str, str]:
    return {str(p.relative_to(work)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((work / "preprocessed").rglob("*_image.npy"))}


def test_item_25_hu_window_changed_after_preprocessing_is_refused_then_rebuilt(tiny_work):
    manifest = tiny_work / "preprocessed" / "manifest.json"
    before = _array_hashes(tiny_work)
    old_hash = json.loads(manifest.read_text())["config_sha256"]
    _edit_plans(tiny_work, "intensity", "clip_hu", [-200.0, 300.0])
    new_hash = load_plans(tiny_work / "plans.json").preprocessing_sha256()
    with pytest.raises(KitspipeError) as caught:
        train_fold(tiny_work, 0, trainer="UNet3DTrainer", epochs=1, progress=False)
    assert str(caught.value) == (f"kitspipe: train: - {manifest}: artefacts were built under another plan "
                                 f"({old_hash[:12]} vs {new_hash[:12]})")
    run_preprocess(tiny_work, progress=False)
    after = _array_hashes(tiny_work)
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before), "stale arrays kept"
    require_complete(manifest, "train", new_hash)


def test_item_25_training_settings_do_not_invalidate_preprocessing(tiny_work):
    manifest = tiny_work / "preprocessed" / "manifest.json"
    before = load_plans(tiny_work / "plans.json").preprocessing_sha256()
    _edit_plans(tiny_work, "training", "learning_rate", 0.5)
    assert load_plans(tiny_work / "plans.json").preprocessing_sha256() == before
    require_complete(manifest, "train", before)


@pytest.mark.parametrize("fold", [2, -1])
def test_item_22_fold_out_of_range_is_refused_before_training(tiny_work, fold):
    # nnU-Net silently trains on a random 80:20 split here; kitspipe refuses.
    expected = f"kitspipe: train: - {tiny_work / 'splits.json'}: fold out of range ({fold} vs 0..1)"
    with pytest.raises(KitspipeError) as caught:
        train_fold(tiny_work, fold, trainer="UNet3DTrainer", epochs=1, progress=False)
    assert str(caught.value) == expected
    assert not (tiny_work / f"fold_{fold}").exists()


def test_item_22_cross_validation_checks_every_fold_before_the_first_trains(tiny_work):
    from kitspipe.crossval import run_cv

    with pytest.raises(KitspipeError) as caught:
        run_cv(tiny_work, trainer="UNet3DTrainer", folds=[0, 2], epochs=1, progress=False)
    assert str(caught.value) == f"kitspipe: train: - {tiny_work / 'splits.json'}: fold out of range (2 vs 0..1)"
    assert not (tiny_work / "fold_0").exists(), "fold 0 trained before fold 2 was refused"
