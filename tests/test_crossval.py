import json

import pandas as pd

from kitspipe.crossval import run_cv


def test_cv_trains_predicts_and_evaluates_every_fold(tiny_work):
    out = run_cv(tiny_work, trainer="UNet3DTrainer", epochs=1, progress=False)
    splits = json.loads((tiny_work / "splits.json").read_text())
    tested = sorted(c for fold in splits for c in fold["test"])
    assert tested == [f"case_0000{i}" for i in range(4)]
    per_case = pd.read_csv(out / "metrics_per_case.csv")
    assert sorted(per_case["case"]) == tested
    summary = pd.read_csv(out / "summary.csv", index_col=0)
    assert list(summary.columns) == ["post-processed", "without post-processing"]
    assert (out / "per_case_dice.png").stat().st_size > 1000
    before = (out / "fold_0" / "predictions" / "case_00000.nii.gz").stat().st_mtime_ns \
        if (out / "fold_0" / "predictions" / "case_00000.nii.gz").exists() else None
    run_cv(tiny_work, trainer="UNet3DTrainer", epochs=1, progress=False)  # everything up to date
    if before is not None:
        assert (out / "fold_0" / "predictions" / "case_00000.nii.gz").stat().st_mtime_ns == before
