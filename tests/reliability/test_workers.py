"""Checklist 38 and 40: a worker process that dies or hangs stops the stage with an error
naming it, within seconds, instead of a hang or a traceback through a pool's internals."""

import os
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


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid``, from /proc (no psutil in the test environment)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return sorted(children)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the worker processes")
def test_item_38_killed_preprocess_worker_is_reported_naming_the_case(tiny_work):
    import shutil

    shutil.rmtree(tiny_work / "preprocessed")
    process = subprocess.Popen([sys.executable, "-m", "kitspipe", "--no-progress", "preprocess", str(tiny_work),
                                "-j", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    workers: list[int] = []
    while not workers and process.poll() is None and time.monotonic() < deadline:
        workers = _children(process.pid)
        time.sleep(0.01)
    assert workers, "preprocess ended before a worker process was seen"
    os.kill(workers[0], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = process.communicate(timeout=30)
    lines = [line for line in stderr.splitlines() if line.startswith("kitspipe: preprocess:")]
    assert process.returncode == 2, stderr[-2000:]
    assert len(lines) == 1 and "a worker process died" in lines[0] and "-j 1" in lines[0], stderr[-2000:]
    assert lines[0].split()[2].startswith("case_0000"), lines[0]
    assert time.monotonic() - killed < 15
