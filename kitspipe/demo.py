"""``kitspipe demo``: the whole pipeline on the built-in synthetic dataset, through the same
stage functions a user calls, ending with per-class Dice on held-out cases.

    DEMO/data/        training cases (KiTS19 layout)
    DEMO/test/        held-out cases with labels, never seen in training
    DEMO/work/        fingerprint, plans, preprocessed arrays, fold_0/, predictions/, evaluation/

Every stage checks its own artefacts, so a second run redoes nothing that is up to date; the
model that the training budget produced is reused (``kitspipe train --resume`` trains it on).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kitspipe.dataset import discover
from kitspipe.evaluation import evaluate_pairs, pair_predictions
from kitspipe.fingerprint import run_fingerprint
from kitspipe.fingerprint_report import show_fingerprint
from kitspipe.inference.run import run_inference
from kitspipe.planning import run_plan
from kitspipe.preprocessing import run_preprocess
from kitspipe.report import build_report
from kitspipe.synthetic import synthesize_dataset
from kitspipe.training.checkpoint import read_metadata
from kitspipe.training.run import fold_folder, train_fold
from kitspipe.validation import check_dataset

log = logging.getLogger(__name__)


def _synthesize_once(folder: Path, n_cases: int, seed: int, first_index: int, progress: bool) -> None:
    marker = folder / ".complete.json"
    wanted = {"cases": n_cases, "seed": seed, "first_index": first_index, "size": "small"}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return
    synthesize_dataset(folder, n_cases, seed=seed, size="small", first_index=first_index, progress=progress)
    from kitspipe.atomic import atomic_write_json

    atomic_write_json(marker, wanted)


def run_demo(folder: str | Path = "demo", train_cases: int = 24, test_cases: int = 6, seed: int = 0,
             preset: str = "cpu", max_minutes: float | None = None, progress: bool = True) -> dict:
    """Run every stage; returns the summary of the held-out evaluation."""
    folder = Path(folder)
    data, test, work = folder / "data", folder / "test", folder / "work"
    log.info("demo: synthesising %d training and %d held-out cases (seed %d)", train_cases, test_cases, seed)
    _synthesize_once(data, train_cases, seed, 0, progress)
    _synthesize_once(test, test_cases, seed, 10_000, progress)
    report = check_dataset(discover(data, stage="check", require_labels=True), stage="check", progress=progress)
    report.raise_if_errors()
    log.info("check: %d cases, %d warnings", len(report.cases), len(report.warnings))
    run_fingerprint(data, work, progress=progress)
    log.info("fingerprint: %s", work / "fingerprint.json")
    show_fingerprint(work)
    run_plan(work, preset=preset)
    log.info("plan: %s", work / "plans.json")
    run_preprocess(work, progress=progress)
    log.info("preprocess: %s", work / "preprocessed")
    from kitspipe.plans import load_plans

    trainer = load_plans(work / "plans.json").training.trainer
    previous = read_metadata(fold_folder(work, 0, trainer), "latest")
    if previous is not None and previous["state"]["stop_reason"].startswith("time budget") and max_minutes is None:
        # The demo's training is bounded by its time budget: a rerun reuses the model rather
        # than training for another budget (`kitspipe train --resume` continues it on purpose).
        folder_0 = fold_folder(work, 0, trainer)
    else:
        folder_0 = train_fold(work, 0, resume="auto", max_minutes=max_minutes, progress=progress)
    log.info("train: %s (training_log.csv, progress.png)", folder_0)
    predictions = work / "predictions"
    run_inference(work, test, predictions, folds=[0], progress=progress)
    log.info("infer: %s", predictions)
    references = {c.case_id: c.label for c in discover(test, stage="evaluate").labelled}
    table = evaluate_pairs(pair_predictions(predictions, references), work / "evaluation")
    summary = json.loads((work / "evaluation" / "summary.json").read_text())
    columns = ["kidney_dice", "tumour_dice", "composite_dice"]
    print("\nheld-out synthetic cases (never seen in training):")
    print(table[["case", *columns]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("mean   " + "   ".join(f"{c} {table[c].mean():.3f}" for c in columns))
    print(f"\nartefacts: data {data}, held-out {test}, work {work}; per-case metrics "
          f"{work / 'evaluation' / 'metrics_per_case.csv'}")
    index = build_report(work, data=test, predictions=predictions, evaluation=work / "evaluation")
    log.info("report: %s", index)
    return summary
