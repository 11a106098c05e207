"""``kitspipe cv``: five-fold cross-validation as independent fold jobs, then one report.

Each fold is trained (or resumed, or skipped when finished), predicts its own held-out cases
with its own model, and the predictions of all folds are evaluated together against the raw
labels, with and without post-processing:

    WORK/cv/<Trainer>/fold_K/predictions/<case>.nii.gz
    WORK/cv/<Trainer>/fold_K/unprocessed/<case>.nii.gz
    WORK/cv/<Trainer>/metrics_per_case.csv, summary.json       (post-processed)
    WORK/cv/<Trainer>/without_postprocessing/...                (same, before post-processing)
    WORK/cv/<Trainer>/summary.csv                               (both, mean per metric)
    WORK/cv/<Trainer>/per_case_dice.png
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from kitspipe.atomic import atomic_write_text
from kitspipe.dataset import discover
from kitspipe.evaluation import evaluate_pairs, pair_predictions, plot_per_case_dice
from kitspipe.fingerprint import load_fingerprint
from kitspipe.inference.run import run_inference
from kitspipe.manifest import require_complete
from kitspipe.plans import load_plans
from kitspipe.preprocessing import PREPROCESSED_DIR
from kitspipe.trainers.registry import get_trainer, load_plugin
from kitspipe.training.run import train_fold
from kitspipe.training.splits import SPLITS_FILE, fold_cases, load_or_create_splits

log = logging.getLogger(__name__)


def _train_one(work: Path, fold: int, trainer: str, epochs, max_minutes, device, threads: int,
               plugins: tuple[str, ...] = ()) -> int:
    import torch

    torch.set_num_threads(max(1, threads))
    train_fold(work, fold, trainer=trainer, resume="auto", epochs=epochs, max_minutes=max_minutes,
               device=device, plugins=plugins, progress=False)
    return fold


def run_cv(work: str | Path, trainer: str | None = None, jobs: int = 1, folds: list[int] | None = None,
           epochs: int | None = None, max_minutes: float | None = None, device: str | None = None,
           progress: bool = True, plugins: tuple[str, ...] = ()) -> Path:
    work = Path(work)
    for plugin in plugins:
        load_plugin(plugin)
    plans = load_plans(work / "plans.json")
    trainer_name = get_trainer(trainer or plans.training.trainer).__name__
    manifest = require_complete(work / PREPROCESSED_DIR / "manifest.json", "cv", plans.preprocessing_sha256())
    splits = load_or_create_splits(work, sorted(manifest["cases"]), plans.training.n_folds, plans.training.seed,
                                   plans.training.validation_fraction)
    folds = list(range(len(splits))) if folds is None else folds
    for fold in folds:  # all checked before the first fold trains, not when a later one is reached
        fold_cases(splits, fold, work / SPLITS_FILE)
    if jobs > 1:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for fold in pool.map(_train_one, *zip(*[(work, f, trainer_name, epochs, max_minutes, device, threads,
                                                     plugins) for f in folds])):
                log.info("cv: fold %d trained", fold)
    else:
        for fold in folds:
            _train_one(work, fold, trainer_name, epochs, max_minutes, device, os.cpu_count() or 1, plugins)
    out = work / "cv" / trainer_name
    dataset = discover(load_fingerprint(work)["dataset_root"], stage="cv")
    references = {c.case_id: c.label for c in dataset.labelled}
    for fold in folds:
        test = splits[fold]["test"]
        run_inference(work, dataset.root, out / f"fold_{fold}" / "predictions", folds=[fold], trainer=trainer_name,
                      device=device, progress=progress, case_ids=test, plugins=plugins,
                      unprocessed_dir=out / f"fold_{fold}" / "unprocessed")
    tables = {}
    for variant, subfolder, target in (("post-processed", "predictions", out),
                                       ("without post-processing", "unprocessed", out / "without_postprocessing")):
        pairs = []
        for fold in folds:
            fold_refs = {c: references[c] for c in splits[fold]["test"]}
            pairs += pair_predictions(out / f"fold_{fold}" / subfolder, fold_refs, stage="cv")
        tables[variant] = evaluate_pairs(sorted(pairs), target, stage="cv")
    plot_per_case_dice(tables["post-processed"], out / "per_case_dice.png")
    summary = pd.DataFrame({name: table.select_dtypes("number").mean() for name, table in tables.items()})
    atomic_write_text(out / "summary.csv", summary.to_csv(float_format="%.4f"))
    log.info("cv summary (%s):\n%s", out, summary.loc[[i for i in summary.index if "dice" in i]].to_string())
    return out
