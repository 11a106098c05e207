"""Shared helpers of the kitspipe benchmarks (``bench/*.py``).

What lives here: the common command-line options, statistics (median with min–max), plain
text tables, the record appended to ``bench/results.jsonl`` (git commit, machine, figures),
synthetic input data, timing (``Stopwatch``). Measurement in a fresh child process is
``child_process.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_FILE = BENCH_DIR / "results.jsonl"
MIB = 1024.0**2
GIB = 1024.0**3


# ----------------------------------------------------------------------------- options

def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the network runs (default cpu)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per measurement (default 3; see each script for exceptions)")
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset folder; if it holds no cases it is filled with synthetic ones and kept "
                             "(default: a temporary folder filled with `kitspipe synth` data and removed)")
    parser.add_argument("--quick", action="store_true", help="fast smoke mode: fewer and smaller measurements")
    parser.add_argument("--results", type=Path, default=RESULTS_FILE,
                        help=f"JSON-lines file the run is appended to (default {RESULTS_FILE.relative_to(REPO)})")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser


def check_device(device: str) -> None:
    """Exit with a clear message when CUDA is asked for and absent."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch.cuda.is_available() is False on this machine")


# ----------------------------------------------------------------------------- statistics

@dataclass(frozen=True)
class Summary:
    """Median and range of repeated measurements."""

    n: int
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Summary":
        if not values:
            raise ValueError("no values to summarise")
        return cls(len(values), float(statistics.median(values)), float(min(values)), float(max(values)))

    def fmt(self, digits: int = 2, scale: float = 1.0) -> str:
        """``median (min–max)``, or the single value when there is one."""
        median, low, high = (v * scale for v in (self.median, self.low, self.high))
        if self.n == 1:
            return f"{median:.{digits}f} (n=1)"
        return f"{median:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"

    def to_json(self) -> dict[str, float]:
        return {"n": self.n, "median": self.median, "min": self.low, "max": self.high}


def summary_json(values: Sequence[float]) -> dict[str, Any]:
    """Summary plus the raw values, for the results file."""
    return {**Summary.of(values).to_json(), "values": [float(v) for v in values]}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A plain text table with left-aligned first column and right-aligned others."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    out = [title] if title else []
    out += [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells[1:]]
    return "\n".join(out)


# ----------------------------------------------------------------------------- the record

def git_commit() -> dict[str, Any]:
    """Short commit of HEAD and whether the working tree differs from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict[str, Any]:
    """What the figures were measured on, including the load at the time (the machine may be shared)."""
    import torch

    name = torch.cuda.get_device_name(0) if device == "cuda" else cpu_model()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "device_name": name,
        "python": platform.python_version(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }


def describe_machine(info: dict[str, Any]) -> str:
    load = info["load_average_1_5_15"]
    return (f"machine: {info['cpu_count']} CPUs ({info['cpu_model']}), {info['memory_gib']} GiB, "
            f"torch {info['torch']} ({info['torch_threads']} threads), device {info['device']} "
            f"= {info['device_name']}; load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")


def record(path: Path, script: str, args: argparse.Namespace, info: dict[str, Any], figures: dict[str, Any]) -> None:
    """Append one JSON line describing this run to ``path``."""
    options = {key: (str(value) if isinstance(value, Path) else value)
               for key, value in vars(args).items() if key not in ("child", "results")}
    line = {
        "script": script,
        "utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **git_commit(),
        "machine": info,
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "options": options,
        "figures": figures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line, sort_keys=True) + "\n")
    print(f"\nappended to {path}")


# ----------------------------------------------------------------------------- data


def run_benchmark(args: argparse.Namespace, script: str, measure, child_main, notes: Sequence[str] = (),
                  after=None, device_check: bool = True) -> None:
    """The common ``main`` of every script: a child measurement, or the timed parent run that
    prints the machine, measures, and appends its JSON line to the results file."""
    if args.child:
        child_main(json.loads(args.child))
        return
    if device_check:
        check_device(args.device)
    info = machine(args.device)
    print(describe_machine(info))
    for note in notes:
        print(note)
    started = time.perf_counter()
    figures = measure(args)
    figures["wall_seconds"] = time.perf_counter() - started
    print(f"\nbenchmark wall time {figures['wall_seconds']:.0f} s")
    if after is not None:
        after(figures)
    record(args.results, script, args, info, figures)


@contextmanager
def data_folder(requested: Path | None) -> Iterator[Path]:
    """The dataset folder: the one asked for (created if missing), or a temporary one."""
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        yield requested
        return
    with tempfile.TemporaryDirectory(prefix="kitspipe-bench-") as folder:
        yield Path(folder)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch and the BLAS/OpenMP pools on one thread for the block, as in a data-loader worker
    (kitspipe's and nnU-Net's alike), then the process's own thread count again."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def scratch_folder(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"kitspipe-bench-{prefix}-") as folder:
        yield Path(folder)


def has_cases(folder: Path) -> bool:
    from kitspipe.dataset import discover
    from kitspipe.errors import KitspipeError

    try:
        return bool(discover(folder).labelled)
    except KitspipeError:
        return False


def synthesize(folder: Path, indices: Sequence[int], seed: int, size: str) -> None:
    """Write synthetic cases ``indices`` (any order, any gaps) of dataset ``seed`` into ``folder``."""
    from kitspipe.synthetic import synthesize_dataset

    for index in indices:
        synthesize_dataset(folder, 1, seed=seed, size=size, first_index=index, progress=False)


def labelled_cases(folder: Path, limit: int | None = None) -> list:
    """The first ``limit`` labelled cases of ``folder`` (kitspipe's own discovery)."""
    from kitspipe.dataset import discover

    cases = list(discover(folder).labelled)
    return cases[:limit] if limit is not None else cases


def link_file(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (a copy across file systems); never a symlink, which
    kitspipe's discovery rejects when it leads out of the dataset."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def link_case(case, dest_root: Path) -> Path:
    """Add ``case`` to the KiTS-layout dataset ``dest_root`` (hard links, no copy); returns the root."""
    link_file(Path(case.image), dest_root / case.case_id / "imaging.nii.gz")
    link_file(Path(case.label), dest_root / case.case_id / "segmentation.nii.gz")
    return dest_root


class Stopwatch:
    """``with Stopwatch() as w: ...`` then ``w.seconds``; synchronises CUDA when given a device."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.seconds = 0.0

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def __enter__(self) -> "Stopwatch":
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._start


def mib(n_bytes: float) -> str:
    return f"{n_bytes / MIB:.0f}"
