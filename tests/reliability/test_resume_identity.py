"""Checklist 31 and 48: a resume with a changed plan, data or kitspipe version is refused with
the changed fields named; every checkpoint says whether its run is deterministic."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from kitspipe.errors import KitspipeError
from kitspipe.training.identity import changed_fields, determinism, refuse_changed_run, resume_identity
from kitspipe.training.run import train_fold


def _edit(work, section: str, key: str, value) -> None:
    plans = json.loads((work / "plans.json").read_text())
    plans[section][key] = value
    (work / "plans.json").write_text(json.dumps(plans))


def _refusal(work, folder) -> str:
    with pytest.raises(KitspipeError) as caught:
        train_fold(work, 0, trainer="UNet3DTrainer", epochs=2, resume=True, progress=False)
    text = str(caught.value)
    prefix = (f"kitspipe: train: - {folder}: plan or preprocessed data changed since this run started, "
              "or kitspipe did; --force starts over (")
    assert text.startswith(prefix) and text.endswith(" vs unchanged)") and "\n" not in text, text
    return text[len(prefix):-len(" vs unchanged)")]


def test_item_31_and_48_changed_run_is_refused_naming_the_fields(tiny_work, caplog, one_torch_thread):
    with caplog.at_level(logging.INFO, logger="kitspipe.training.run"):
        folder = train_fold(tiny_work, 0, trainer="UNet3DTrainer", epochs=1, progress=False)
    sidecar = json.loads((folder / "checkpoint_latest.json").read_text())
    assert sidecar["determinism"] == {"bitwise": True, "reasons": []}  # CPU, one process
    assert "training fold 0 is deterministic" in caplog.text
    assert sidecar["plans"]["loss"]["topk_fraction"] == json.loads((tiny_work / "plans.json").read_text())[
        "loss"]["topk_fraction"]

    original = json.loads((tiny_work / "plans.json").read_text())
    _edit(tiny_work, "loss", "topk_fraction", 0.5)
    _edit(tiny_work, "training", "learning_rate", 0.25)
    assert _refusal(tiny_work, folder) == (
        f"loss.topk_fraction: {original['loss']['topk_fraction']!r} -> 0.5; "
        f"training.learning_rate: {original['training']['learning_rate']!r} -> 0.25")

    (tiny_work / "plans.json").write_text(json.dumps(original))
    sidecar_path = folder / "checkpoint_latest.json"
    stored = json.loads(sidecar_path.read_text())
    sidecar_path.write_text(json.dumps({**stored, "kitspipe_version": "0.0.1"}))
    assert _refusal(tiny_work, folder) == f"kitspipe_version: '0.0.1' -> '{stored['kitspipe_version']}'"

    # A sidecar written before the plan was stored: the hashes are all there is to show.
    legacy = {k: v for k, v in stored.items() if k != "plans"}
    sidecar_path.write_text(json.dumps({**legacy, "plans_sha256": "0" * 64}))
    assert _refusal(tiny_work, folder).startswith("plans_sha256: 000000000000 -> ")

    sidecar_path.write_text(json.dumps(stored))  # unchanged again: past the check to "already complete"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kitspipe.training.run"):
        train_fold(tiny_work, 0, trainer="UNet3DTrainer", epochs=1, resume=True, progress=False)
    assert "fold 0 already complete" in caplog.text


def test_item_31_field_diff_lists_every_changed_leaf():
    old = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    new = {"a": {"b": 1, "c": [1, 3]}, "e": 2}
    assert changed_fields(old, new) == ["a.c: [1, 2] -> [1, 3]", "d: 'x' -> '(absent)'", "e: '(absent)' -> 2"]


def test_item_31_a_run_from_before_new_plan_fields_may_resume(tmp_path):
    """Fields added to the plan since a run started default to the old behaviour, so their
    absence from the stored plan is no change; a real change is still named."""
    from dataclasses import replace

    from kitspipe.plans import load_preset

    plans = load_preset("paper")
    identity = resume_identity(plans, "data")
    stored = json.loads(json.dumps(identity["plans"]))
    for section, key in (("network", "normalisation"), ("training", "weight_average_decay"),
                         ("inference", "checkpoint"), ("high", "padding"), ("high", "output_crop")):
        del stored[section][key]
    old_run = {"plans_sha256": "written-by-an-older-kitspipe", "plans": stored,
               "preprocessing_sha256": "data", "kitspipe_version": identity["kitspipe_version"]}
    refuse_changed_run(old_run, identity, tmp_path)
    changed = resume_identity(replace(plans, network=replace(plans.network, normalisation="instance")), "data")
    with pytest.raises(KitspipeError, match="network.normalisation: 'batch' -> 'instance'"):
        refuse_changed_run(old_run, changed, tmp_path)


def test_item_48_non_deterministic_runs_are_labelled(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        cuda = determinism(torch.device("cuda", 0), world=2)
        assert not cuda["bitwise"] and cuda["reasons"] == [
            "CUDA without CUBLAS_WORKSPACE_CONFIG=:4096:8", "cudnn.benchmark chooses kernels by timing",
            "CUDA operations without a deterministic version only warn",
            "2 processes: the order of gradient reductions may vary"]
        assert determinism(torch.device("cpu"), world=1) == {"bitwise": True, "reasons": []}
        # A resumed run inherits what made its first part unrepeatable.
        assert determinism(torch.device("cpu"), world=1, earlier=cuda) == cuda
        torch.use_deterministic_algorithms(False)
        assert determinism(torch.device("cpu"), world=1) == {"bitwise": False,
                                                             "reasons": ["deterministic algorithms are off"]}
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
