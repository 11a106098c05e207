"""Checklist 38 and 40: a worker process that dies or hangs stops the stage with an error
naming it, within seconds, instead of a hang or a traceback through a pool's internals."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kitspipe.data.loader import make_loader
from kitspipe.errors import KitspipeError


class _HangingSampler:
    """A sampler whose every draw blocks, as a worker stuck on a stalled network disk would."""

    def sample(self, rng: np.random.Generator):
        time.sleep(3600)


def test_item_40_hung_loader_worker_stops_training_with_a_clear_error(small_plans):
    loader = make_loader(_HangingSampler(), small_plans, epoch=0, steps=2, num_workers=1, seed=0, timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(KitspipeError) as caught:
        next(iter(loader))
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert message.startswith("kitspipe: train: - data loader: a worker process hung") and "\n" not in message
    assert "nothing for 1 s from 1 workers" in message
    assert elapsed < 10, f"the watchdog took {elapsed:.1f} s"


def _children(pid: int, marker: bytes) -> list[int]:
    """Live child processes of ``pid`` whose command line holds ``marker``, from /proc (no psutil
    in the test environment); the marker tells pool workers from helpers such as the resource tracker."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and marker in command:
            children.append(int(stat.parent.name))
    return sorted(children)


def _kill_a_worker(arguments: list[str], marker: bytes) -> tuple[int, list[str], float]:
    """Run ``kitspipe ARGUMENTS``, SIGKILL its first worker process as soon as it exists, and
    return the exit code, the kitspipe error lines and the seconds from the kill to the exit."""
    process = subprocess.Popen([sys.executable, "-m", "kitspipe", "--no-progress", *arguments],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    workers: list[int] = []
    while not workers and process.poll() is None and time.monotonic() < deadline:
        workers = _children(process.pid, marker)
        time.sleep(0.01)
    assert workers, "the stage ended before a worker process was seen"
    os.kill(workers[0], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = process.communicate(timeout=30)
    return process.returncode, [line for line in stderr.splitlines() if line.startswith("kitspipe: ")], \
        time.monotonic() - killed


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the workers")


@needs_proc
def test_item_38_killed_preprocess_worker_is_reported_naming_the_case(tiny_work):
    import shutil

    shutil.rmtree(tiny_work / "preprocessed")
    # preprocess forks its workers: their command line is the parent's.
    code, lines, seconds = _kill_a_worker(["preprocess", str(tiny_work), "-j", "2"], b"kitspipe")
    assert code == 2 and len(lines) == 1, lines
    assert re.match(r"kitspipe: preprocess: case_0000\d \S+: a worker process died \(killed for memory\?\); "
                    r"rerun with fewer workers \(-j 1\) \(cases in flight or queued: case_0000", lines[0]), lines
    assert seconds < 15


@needs_proc
def test_item_38_killed_check_worker_is_reported_naming_the_case(tiny_dataset):
    code, lines, seconds = _kill_a_worker(["check", str(tiny_dataset), "-j", "2"], b"spawn_main")
    assert code == 2 and len(lines) == 1, lines
    assert re.match(r"kitspipe: check: case_0000\d \S+imaging.nii.gz: a check worker died \(killed for memory\?\) "
                    r"\(--jobs 2 vs fewer jobs or more memory\)", lines[0]), lines
    assert seconds < 15


@needs_proc
def test_item_38_killed_training_loader_worker_is_one_error_line(tiny_work):
    # torch reports a dead loader worker from a SIGCHLD handler, wherever the main thread is
    # (usually in the middle of a step), so the loop itself turns it into the stage's error.
    import json

    plans_file = tiny_work / "plans.json"
    plans = json.loads(plans_file.read_text())
    plans["training"].update(num_workers=1, steps_per_epoch=10_000)
    plans_file.write_text(json.dumps(plans))
    code, lines, seconds = _kill_a_worker(["train", str(tiny_work), "--fold", "0", "--trainer", "UNet3DTrainer",
                                           "--epochs", "1", "--device", "cpu"], b"kitspipe")
    assert code == 2, lines
    assert lines and lines[-1].startswith("kitspipe: train: - data loader: a worker process died"), lines
    assert seconds < 20, f"the dead worker was noticed after {seconds:.1f} s"
