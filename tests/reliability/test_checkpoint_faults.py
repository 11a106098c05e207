"""Checklist 28: a kill between writing a checkpoint's temporary file and renaming it.

The kill is injected in-process at the n-th ``os.replace`` of a checkpoint save: from there on
nothing runs, not even the clean-up of the temporary file, as after a SIGKILL. The previous
checkpoint must stay usable, and a resume must report and remove the stray temporary file."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from kitspipe.atomic import TEMP_PREFIX
from kitspipe.training.checkpoint import load_tensors, read_metadata, read_resumable, save_checkpoint
from kitspipe.plans import load_plans
from kitspipe.training.identity import resume_identity
from kitspipe.training.run import fold_folder, train_fold
from kitspipe.training.state import TrainingState


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler treats it as an error to recover from."""


def _save_killed_at(monkeypatch, replace_call: int, *args) -> None:
    """``save_checkpoint(*args)``, killed just before its ``replace_call``-th rename."""
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == replace_call:
            monkeypatch.setattr(os, "unlink", lambda path: None)  # a killed process cleans nothing up
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        save_checkpoint(*args)
    monkeypatch.undo()


# A save renames four times: previous .pt link, previous .json link, new .pt, new .json.
@pytest.mark.parametrize("replace_call", [1, 2, 3, 4])
def test_item_28_kill_before_a_rename_keeps_a_usable_checkpoint(tmp_path, monkeypatch, replace_call):
    save_checkpoint(tmp_path, "latest", {"w": torch.zeros(3)}, {"epoch": 1})
    save_checkpoint(tmp_path, "latest", {"w": torch.ones(3)}, {"epoch": 2})

    _save_killed_at(monkeypatch, replace_call, tmp_path, "latest", {"w": torch.full((3,), 3.0)}, {"epoch": 3})

    assert list(tmp_path.glob(TEMP_PREFIX + "*")), "the injected kill should leave a temporary file"
    metadata, weights = read_resumable(tmp_path, "latest")
    assert metadata["epoch"] == 2 and torch.equal(load_tensors(weights)["w"], torch.ones(3))
    if replace_call == 4:  # the new .pt is in place, its .json is not: a torn pair
        assert read_metadata(tmp_path, "latest") is None and weights.name == "checkpoint_latest.previous.pt"


def test_item_28_resume_after_a_torn_checkpoint_reports_the_temporary_and_uses_the_previous_pair(
        tiny_work, monkeypatch, caplog):
    # A finished one-epoch run, written as training writes it (no network is needed to resume it).
    plans = load_plans(tiny_work / "plans.json").with_training(trainer="UNet3DTrainer")
    manifest = json.loads((tiny_work / "preprocessed" / "manifest.json").read_text())
    state = TrainingState(global_epoch=1, finished=True, stop_reason="1 epochs")
    epoch_one = {"trainer": "UNet3DTrainer", "fold": 0, **resume_identity(plans, manifest["config_sha256"]),
                 "state": state.to_json()}
    folder = fold_folder(tiny_work, 0, "UNet3DTrainer")
    folder.mkdir(parents=True)
    save_checkpoint(folder, "latest", {"model": {"w": torch.zeros(2)}}, epoch_one)
    save_checkpoint(folder, "latest", {"model": {"w": torch.zeros(2)}}, epoch_one)  # becomes the previous pair
    # The next save, killed between the .pt rename and the .json rename.
    _save_killed_at(monkeypatch, 4, folder, "latest", {"model": {"w": torch.ones(2)}}, {**epoch_one, "torn": True})
    stray = sorted(folder.glob(TEMP_PREFIX + "*"))
    assert len(stray) == 1 and read_metadata(folder, "latest") is None

    # Without the previous pair, --resume would fail with "nothing to resume"; with it, the
    # finished run is found (and, with the same --epochs, has nothing left to do).
    with caplog.at_level(logging.INFO):
        train_fold(tiny_work, 0, trainer="UNet3DTrainer", epochs=1, resume=True, progress=False)

    assert f"removed the remains of an interrupted write: {stray[0]}" in caplog.text
    assert "resuming from checkpoint_latest.previous" in caplog.text
    assert "fold 0 already complete (checkpoint_latest sha256=" in caplog.text
    assert not list(folder.glob(TEMP_PREFIX + "*"))
