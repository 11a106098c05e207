"""Checklist 36, 42, 43: disk full (array, checkpoint and NIfTI writes), unwritable output, non-finite loss."""

import errno
import json
import os

import pytest

from kitspipe.atomic import atomic_open, atomic_write_bytes, atomic_write_json
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


def _full_disk(monkeypatch, free: int) -> None:
    """ENOSPC from fsync, where a filesystem with delayed allocation reports a full disk."""
    import kitspipe.preflight

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(kitspipe.preflight, "free_bytes", lambda folder: free)


def test_item_36_disk_full_names_the_bytes_needed_and_free(tmp_path, monkeypatch):
    target = tmp_path / "high_image.npy"
    target.write_bytes(b"previous")
    _full_disk(monkeypatch, free=2048)
    with pytest.raises(KitspipeError) as caught:
        atomic_write_bytes(target, b"x" * 3 * 2**20)
    assert str(caught.value) == (f"kitspipe: write: - {target}: disk full; the previous file is untouched "
                                 "(needs 3.0 MiB vs 2.0 KiB free)")
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_item_36_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import torch

    from kitspipe.training.checkpoint import load_tensors, read_metadata, save_checkpoint

    save_checkpoint(tmp_path, "latest", {"w": torch.zeros(4)}, {"epoch": 1})
    _full_disk(monkeypatch, free=0)
    with pytest.raises(KitspipeError, match=r"checkpoint_latest.pt: disk full; .* \(needs .* vs 0.0 KiB free\)"):
        save_checkpoint(tmp_path, "latest", {"w": torch.ones(4)}, {"epoch": 2})
    monkeypatch.undo()
    assert read_metadata(tmp_path, "latest")["epoch"] == 1
    assert torch.equal(load_tensors(tmp_path / "checkpoint_latest.pt")["w"], torch.zeros(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.json", "checkpoint_latest.previous.json",
                                                          "checkpoint_latest.previous.pt", "checkpoint_latest.pt"]


def test_item_36_disk_full_during_a_nifti_export_is_a_kitspipe_error(tmp_path, monkeypatch):
    import numpy as np
    import SimpleITK as sitk

    import kitspipe.preflight
    from kitspipe.imageio import write_image_atomic

    target = tmp_path / "case_00000.nii.gz"
    target.write_bytes(b"previous export")
    image = sitk.GetImageFromArray(np.zeros((8, 16, 16), np.uint8))

    def failing_write(image, name, useCompression=True):
        open(name, "wb").write(b"partial")  # SimpleITK gives no errno, only a RuntimeError
        raise RuntimeError("ITK ERROR: NiftiImageIO: Could not write file")

    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    monkeypatch.setattr(kitspipe.preflight, "free_bytes", lambda folder: 1024)
    with pytest.raises(KitspipeError) as caught:
        write_image_atomic(image, target)
    assert str(caught.value) == (f"kitspipe: write: - {target}: disk full; the previous file is untouched "
                                 "(needs up to 2.3 KiB vs 1.0 KiB free)")  # 2048 voxels + 352-byte header
    assert target.read_bytes() == b"previous export" and [p.name for p in tmp_path.iterdir()] == [target.name]

    monkeypatch.setattr(kitspipe.preflight, "free_bytes", lambda folder: 2**30)
    with pytest.raises(RuntimeError, match="Could not write"):  # plenty of space: not blamed on the disk
        write_image_atomic(image, target)


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
