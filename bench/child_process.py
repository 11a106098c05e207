"""Measurement in a fresh child process, for the kitspipe benchmarks (``bench/*.py``).

Why a child process: a peak RSS is a high-water mark, and
``getrusage(RUSAGE_CHILDREN)`` in a long-lived parent only ever grows (it is the largest
child ever waited for), so a clean per-measurement peak needs a fresh process. Each script
re-runs itself with ``--child SPEC``; the child imports what it needs, notes its resident
memory, runs the one timed call, and prints one ``BENCH_RESULT {json}`` line with the
seconds and its peak RSS. The parent also samples the resident memory of the child's whole
process tree every 0.1 s, which is what a ``-j 2`` run really occupies at once.

Linux pitfall: a child's own ``ru_maxrss`` is *not* clean. ``fork`` copies the parent's page
tables, and ``execve`` folds the high-water mark of that copy into the process's
``ru_maxrss``, so every child starts at the parent's RSS at the time of the fork (a parent
that synthesized a 512² case: ~780 MiB in every measurement). The child therefore reports
``VmHWM`` from ``/proc/self/status``, the peak of its own address space after ``execve``.
Its pool workers are forked from the small child; their peak comes from the child's
``getrusage(RUSAGE_CHILDREN)`` and includes the pages they share with it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "


def _status_bytes(pid: int | str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def rss_bytes(pid: int | str = "self") -> int:
    """Current resident set size of a process (0 if it is gone)."""
    return _status_bytes(pid, "VmRSS")


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak resident set size of a process's address space since its ``execve`` (VmHWM)."""
    return _status_bytes(pid, "VmHWM")


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, summed."""
    return sum(rss_bytes(p) for p in _descendants(pid))


@dataclass
class ChildResult:
    """What one measurement in a child process reported."""

    seconds: float
    cpu_seconds: float  # user + system, the child and its workers
    peak_rss: int  # bytes: the largest peak RSS of the child (VmHWM) or of any of its waited-for workers
    tree_peak_rss: int  # bytes: the largest sampled sum over the child's process tree
    baseline_rss: int  # bytes: the child's RSS just before the timed call (imports, inputs)
    extra: dict[str, Any] = field(default_factory=dict)


def run_child(script: Path, spec: dict[str, Any], env: dict[str, str] | None = None,
              timeout_s: float = 3600.0, sample_s: float = 0.1) -> ChildResult:
    """Run ``script --child SPEC`` and return what it reports; raise with its stderr on failure."""
    command = [sys.executable, str(script), "--child", json.dumps(spec)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})})
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss_bytes(process.pid))
            stop.wait(sample_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    finally:
        stop.set()
        sampler.join()
        if process.poll() is None:
            process.kill()
            process.wait()
    reports = [line[len(RESULT_PREFIX):] for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if process.returncode != 0 or not reports:
        raise RuntimeError(f"benchmark child failed (exit {process.returncode}): {' '.join(command[:3])} ...\n"
                           f"{stderr[-4000:]}")
    report = json.loads(reports[-1])
    return ChildResult(seconds=report.pop("seconds"), cpu_seconds=report.pop("cpu_seconds"),
                       peak_rss=report.pop("peak_rss"), tree_peak_rss=max(peak, report["peak_rss_self"]),
                       baseline_rss=report.pop("baseline_rss"), extra=report)


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its waited-for children so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class ChildClock:
    """Wall and CPU time of the one timed call of a child process.

    CPU seconds say how much work was done; on a shared machine they move much less with
    the load than wall seconds do (which include the time spent waiting for a core).
    """

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = cpu_seconds()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def child_report(clock: ChildClock, baseline_rss: int, **extra: Any) -> None:
    """Print the one result line a child process hands back (call once, after the timed call)."""
    seconds, cpu = clock.elapsed()
    self_peak = peak_rss_bytes()
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    payload = {"seconds": seconds, "cpu_seconds": cpu, "baseline_rss": baseline_rss,
               "peak_rss": max(self_peak, workers_peak), "peak_rss_self": self_peak,
               "peak_rss_workers": workers_peak, **extra}
    print(RESULT_PREFIX + json.dumps(payload), flush=True)
