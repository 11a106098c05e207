"""Checklist 37 and 41: a stage refuses to start when the disk or /dev/shm cannot hold what it
would write, naming both sizes, instead of failing halfway through with ENOSPC or a bus error.

The free space is faked by patching ``shutil.disk_usage``, which the pre-flight asks."""

import logging
import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from kitspipe.data.loader import make_loader, shared_memory_bytes
from kitspipe.errors import KitspipeError
from kitspipe.plans import load_plans
from kitspipe.preflight import SHARED_MEMORY, format_bytes, preprocess_bytes_needed
from kitspipe.preprocessing import run_preprocess

Usage = namedtuple("Usage", "total used free")
REAL_DISK_USAGE = shutil.disk_usage


def _fake_free_space(monkeypatch, free: int, only: Path | None = None) -> None:
    """``free`` bytes on every filesystem, or only on the one at ``only``."""
    def disk_usage(path):
        if only is not None and Path(path) != only:
            return REAL_DISK_USAGE(path)
        return Usage(10 * free, 9 * free, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_item_37_preprocess_estimate_bounds_what_it_writes(tiny_work, tiny_dataset):
    plans = load_plans(tiny_work / "plans.json")
    images = {p.name: p / "imaging.nii.gz" for p in sorted(tiny_dataset.iterdir())}
    estimate = preprocess_bytes_needed(images, plans.high.spacing_mm, plans.scale)
    written = _folder_bytes(tiny_work / "preprocessed")
    assert written <= estimate <= 4 * written, (written, estimate)


def test_item_37_preprocess_refuses_before_work_when_the_disk_is_too_small(tiny_work, monkeypatch):
    shutil.rmtree(tiny_work / "preprocessed")
    _fake_free_space(monkeypatch, free=2**20)
    with pytest.raises(KitspipeError) as caught:
        run_preprocess(tiny_work, progress=False)
    message = str(caught.value)
    folder = tiny_work / "preprocessed"
    assert re.fullmatch(rf"kitspipe: preprocess: - {re.escape(str(folder))}: not enough free disk "
                        r"\(needs [0-9.]+ MiB vs 1\.0 MiB free\)", message), message
    assert not [p for p in folder.iterdir() if p.is_dir()], "a case was preprocessed before the refusal"
    monkeypatch.undo()
    run_preprocess(tiny_work, progress=False)  # the same run goes through once there is space


def _infer_without_a_trained_fold(monkeypatch):
    from kitspipe.inference import run
    from kitspipe.networks.unet3d import UNet3D

    # No trained fold is needed: the pre-flight comes before any case is predicted.
    monkeypatch.setattr(run, "load_fold_model", lambda *args, **kwargs: (UNet3D(1, 2, 4, 2), "0" * 64))
    return run


def test_item_37_infer_refuses_before_work_when_the_disk_is_too_small(tiny_work, tiny_dataset, tmp_path,
                                                                      monkeypatch):
    run = _infer_without_a_trained_fold(monkeypatch)
    _fake_free_space(monkeypatch, free=100)
    output = tmp_path / "predictions"
    with pytest.raises(KitspipeError) as caught:
        run.run_inference(tiny_work, tiny_dataset, output, device="cpu", progress=False)
    assert re.fullmatch(rf"kitspipe: infer: - {re.escape(str(output))}: not enough free disk "
                        r"\(needs [0-9.]+ KiB vs 0\.1 KiB free\)", str(caught.value)), str(caught.value)
    assert not list(output.glob("*.nii.gz"))


def test_item_37_infer_only_warns_when_compressed_outputs_may_still_fit(tiny_work, tiny_dataset, tmp_path,
                                                                        monkeypatch, caplog):
    # Compressed label maps are 50-200x smaller than the uncompressed upper bound: a disk that
    # cannot hold the upper bound must not stop an inference that fits.
    from kitspipe.preflight import export_bytes_needed

    run = _infer_without_a_trained_fold(monkeypatch)
    images = {p.name: p / "imaging.nii.gz" for p in sorted(tiny_dataset.iterdir())}
    lower, upper = export_bytes_needed(images)
    assert 100 * lower < upper
    _fake_free_space(monkeypatch, free=(lower + upper) // 2)
    monkeypatch.setattr(run, "predict_case", _stop_at_the_first_case)
    with caplog.at_level(logging.WARNING, logger="kitspipe.preflight"), pytest.raises(_FirstCase):
        run.run_inference(tiny_work, tiny_dataset, tmp_path / "predictions", device="cpu", progress=False)
    assert "usually far less" in caplog.text


class _FirstCase(Exception):
    pass


def _stop_at_the_first_case(*args, **kwargs):
    raise _FirstCase


class _UnusedSampler:
    def sample(self, rng):
        raise AssertionError("the pre-flight must refuse before any batch is drawn")


@pytest.mark.skipif(not SHARED_MEMORY.is_dir(), reason="no /dev/shm on this system")
def test_item_41_small_dev_shm_is_refused_with_the_size_needed(small_plans, monkeypatch):
    needed = shared_memory_bytes(small_plans, num_workers=2)
    _fake_free_space(monkeypatch, free=needed // 3, only=SHARED_MEMORY)
    with pytest.raises(KitspipeError) as caught:
        make_loader(_UnusedSampler(), small_plans, epoch=0, steps=2, num_workers=2, seed=0)
    message = str(caught.value)
    assert message.startswith(f"kitspipe: train: - {SHARED_MEMORY}: not enough shared memory") and "\n" not in message
    assert f"(needs {format_bytes(needed)} vs {format_bytes(needed // 3)} free)" in message
    make_loader(_UnusedSampler(), small_plans, epoch=0, steps=2, num_workers=0, seed=0)  # no workers, no shm


@pytest.mark.skipif(not SHARED_MEMORY.is_dir(), reason="no /dev/shm on this system")
def test_item_41_little_headroom_in_dev_shm_is_warned(small_plans, monkeypatch, caplog):
    needed = shared_memory_bytes(small_plans, num_workers=2)
    _fake_free_space(monkeypatch, free=needed + needed // 2, only=SHARED_MEMORY)
    with caplog.at_level(logging.WARNING, logger="kitspipe.preflight"):
        make_loader(_UnusedSampler(), small_plans, epoch=0, steps=2, num_workers=2, seed=0)
    assert any("/dev/shm" in r.getMessage() and format_bytes(needed) in r.getMessage() for r in caplog.records)
