"""Checklist 16: a case with an empty label (no kidney) or a constant image goes through the
fingerprint and the training patch sampler without crashing; a dataset with no foreground at
all stops at planning with one clear line, not inside a statistic of an empty array."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kitspipe.data.cases import open_cases
from kitspipe.data.sampling import PatchSampler
from kitspipe.errors import KitspipeError
from kitspipe.fingerprint import run_fingerprint
from kitspipe.planning import run_plan
from kitspipe.plans import load_plans
from kitspipe.preprocessing import run_preprocess
from tests.conftest import TINY_NETWORK, phantom_arrays, write_kits_case

SPACING = (3.0, 2.0, 2.0)


def _dataset(root: Path, normal: bool) -> None:
    """``case_00001``: constant image, empty label; ``case_00002``: CT with an empty label;
    with ``normal``, ``case_00000`` is an ordinary labelled case."""
    image, label = phantom_arrays(spacing_zyx=SPACING, seed=0)
    if normal:
        write_kits_case(root, "case_00000", image, label, SPACING)
    write_kits_case(root, "case_00001", np.full_like(image, 40.0), np.zeros_like(label), SPACING)
    write_kits_case(root, "case_00002", image, np.zeros_like(label), SPACING)


def test_item_16_fingerprint_and_sampler_on_empty_label_and_constant_image(tmp_path):
    data, work = tmp_path / "data", tmp_path / "work"
    _dataset(data, normal=True)

    run_fingerprint(data, work, progress=False)
    summary = json.loads((work / "fingerprint.json").read_text())["summary"]
    assert summary["n_cases"] == 3 and summary["n_without_foreground"] == 2
    run_plan(work, preset="cpu")
    plans = json.loads((work / "plans.json").read_text())
    plans.update(TINY_NETWORK)
    (work / "plans.json").write_text(json.dumps(plans))
    run_preprocess(work, progress=False)

    # Only the two degenerate cases: every draw asks for a positive patch half the time and
    # must fall back to a negative one instead of indexing an empty candidate list.
    sampler = PatchSampler(open_cases(work / "preprocessed", ["case_00001", "case_00002"]),
                           load_plans(work / "plans.json"))
    rng = np.random.default_rng(0)
    pairs = [sampler.sample(rng) for _ in range(12)]
    assert {p.case_id for p in pairs} == {"case_00001", "case_00002"}
    for pair in pairs:
        assert np.isfinite(pair.high_image).all() and np.isfinite(pair.low_image).all()
        assert pair.high_target.sum() == 0 and pair.low_target.sum() == 0 and pair.tumour_present == 0.0
    constant = [p for p in pairs if p.case_id == "case_00001"]
    # The constant image plus the air padding outside the volume: at most two values.
    assert constant and all(len(np.unique(p.high_image)) <= 2 for p in constant)


def test_item_16_dataset_without_foreground_stops_at_planning_with_one_line(tmp_path):
    data, work = tmp_path / "data", tmp_path / "work"
    _dataset(data, normal=False)

    run_fingerprint(data, work, progress=False)  # measuring empty cases is not an error
    summary = json.loads((work / "fingerprint.json").read_text())["summary"]
    assert summary["n_without_foreground"] == 2 and summary["hu"] == {}
    with pytest.raises(KitspipeError) as caught:
        run_plan(work, preset="cpu")
    assert str(caught.value) == ("kitspipe: plan: - fingerprint.json: no foreground voxels in any case "
                                 "(0 voxels vs kidney labels)")
