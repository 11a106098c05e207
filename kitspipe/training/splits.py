"""Case-level cross-validation splits, written once and reused (a user-supplied file wins).

Folds are drawn from the sorted case ids with a seeded permutation, so they do not depend on
directory listing order, and adding unlabelled cases changes nothing. Inside each fold's
training cases a further seeded ``validation_fraction`` (paper: 20 %) is held out for model
selection and early stopping; the fold's own held-out cases are used only for evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kitspipe.atomic import atomic_write_json
from kitspipe.errors import KitspipeError, Problem
from kitspipe.json_input import JsonInputError, read_json

SPLITS_FILE = "splits.json"


def make_splits(case_ids: list[str], n_folds: int, seed: int, validation_fraction: float) -> list[dict]:
    ids = sorted(case_ids)
    if n_folds < 2:
        raise KitspipeError(Problem("split", "-", SPLITS_FILE, "n_folds must be at least 2", str(n_folds), ">= 2"))
    if len(ids) < n_folds:
        raise KitspipeError(Problem("split", "-", SPLITS_FILE, "fewer cases than folds", str(len(ids)), f">= {n_folds}"))
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = []
    for fold in range(n_folds):
        test = sorted(ids[i] for i in order[fold::n_folds])
        train = [c for c in ids if c not in set(test)]
        rng = np.random.default_rng([seed, fold])
        n_val = max(1, int(round(validation_fraction * len(train)))) if len(train) > 1 else 0
        validation = sorted(rng.choice(train, n_val, replace=False).tolist()) if n_val else []
        folds.append({"train": [c for c in train if c not in set(validation)], "validation": validation,
                      "test": test})
    return folds


def check_splits(folds: list[dict], case_ids: list[str], path: Path) -> None:
    """Refuse unknown cases, overlaps inside a fold, a case tested in two folds, and a case tested
    in none (a split made before cases were added would leave them out of cross-validation)."""
    problems = []
    known = set(case_ids)
    tested: dict[str, int] = {}
    for index, fold in enumerate(folds):
        if not isinstance(fold, dict) or not {"train", "test"} <= set(fold):
            problems.append(Problem("split", "-", path, f"fold {index} lacks 'train'/'test' lists"))
            continue
        fold.setdefault("validation", [])
        parts = {name: set(fold[name]) for name in ("train", "validation", "test")}
        for name, ids in parts.items():
            for case in sorted(ids - known):
                problems.append(Problem("split", case, path, f"fold {index} {name} names an unknown case"))
        for a, b in (("train", "test"), ("train", "validation"), ("validation", "test")):
            for case in sorted(parts[a] & parts[b]):
                problems.append(Problem("split", case, path, f"fold {index}: case in both {a} and {b}"))
        for case in parts["test"]:
            if case in tested:
                problems.append(Problem("split", case, path, "case tested in two folds", f"folds {tested[case]} and {index}"))
            tested[case] = index
    if folds and all(isinstance(f, dict) and {"train", "test"} <= set(f) for f in folds):
        for case in sorted(known - set(tested)):
            problems.append(Problem("split", case, path, "case in no fold's test set; delete the file to draw "
                                    "the folds again (made before cases were added?)"))
    if problems:
        raise KitspipeError(problems)


def load_or_create_splits(work: Path, case_ids: list[str], n_folds: int, seed: int,
                          validation_fraction: float) -> list[dict]:
    path = Path(work) / SPLITS_FILE
    if path.is_file():
        try:
            folds = read_json(path, what="splits.json")
        except JsonInputError as error:
            raise KitspipeError(Problem("split", "-", path, error.problem, error.observed[:80], error.expected)) from None
    else:
        folds = make_splits(case_ids, n_folds, seed, validation_fraction)
        atomic_write_json(path, folds)
    check_splits(folds, case_ids, path)
    return folds


def fold_cases(folds: list[dict], fold: int, path: Path) -> dict:
    if not 0 <= fold < len(folds):
        raise KitspipeError(Problem("train", "-", path, "fold out of range", str(fold), f"0..{len(folds) - 1}"))
    return folds[fold]
