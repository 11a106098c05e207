"""Checklist 36, 42, 43: disk full, unwritable output, non-finite loss."""

import errno
import json
import os

import pytest

from kitspipe.atomic import atomic_open, atomic_write_json
from kitspipe.errors import KitspipeError
from kitspipe.locking import work_lock
from kitspipe.training.run import train_fold


def test_disk_full_mid_write_keeps_previous_file(tmp_path):
    target = tmp_path / "plans.json"
    atomic_write_json(target, {"version": 1})
    before = target.read_bytes()
    with pytest.raises(KitspipeError, match=f"{target}: disk full"):
        with atomic_open(target) as handle:
            handle.write(b"{\"version\": 2, ")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["plans.json"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_folder_is_refused_before_work(tmp_path):
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o500)
    with pytest.raises(KitspipeError, match="not writable"):
        with work_lock(folder / "sub", "infer"):
            pass


def test_output_folder_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(KitspipeError, match="output folder is not writable"):
        with work_lock(blocker / "out", "infer"):
            pass


def _nan_loss(monkeypatch):
    from kitspipe.trainers.builtin import UNet3DTrainer

    original = UNet3DTrainer.loss

    def poisoned(self, network, loss_fn, batch, phase):
        terms = original(self, network, loss_fn, batch, phase)
        return terms._replace(total=terms.total * float("nan"))

    monkeypatch.setattr(UNet3DTrainer, "loss", poisoned)


def test_non_finite_loss_stops_and_keeps_last_finite_checkpoint(tiny_work, monkeypatch):
    folder = train_fold(tiny_work, 0, trainer="UNet3DTrainer", epochs=1, progress=False)
    before = (folder / "checkpoint_latest.pt").read_bytes()
    _nan_loss(monkeypatch)
    with pytest.raises(KitspipeError, match="non-finite loss"):
        train_fold(tiny_work, 0, trainer="UNet3DTrainer", epochs=2, resume=True, progress=False)
    assert (folder / "checkpoint_latest.pt").read_bytes() == before


def test_non_finite_loss_skip_policy_skips_and_counts_steps(tiny_work, monkeypatch):
    plans = json.loads((tiny_work / "plans.json").read_text())
    plans["training"]["non_finite_loss"] = "skip"
    (tiny_work / "plans.json").write_text(json.dumps(plans))
    _nan_loss(monkeypatch)
    folder = train_fold(tiny_work, 0, trainer="UNet3DTrainer", epochs=1, progress=False)
    state = json.loads((folder / "checkpoint_latest.json").read_text())["state"]
    assert state["skipped_steps"] == plans["training"]["steps_per_epoch"]
    assert state["history"][0]["loss_total"] is None
