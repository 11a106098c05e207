#!/usr/bin/env python3
"""Benchmark of the fingerprint and preprocess stages on full-size (512 x 512) cases.

Measured, each in a fresh child process (clean peak RSS, see child_process.py):

* per case: ``kitspipe.fingerprint.run_fingerprint`` of a one-case dataset, and
  ``kitspipe.preprocessing.run_preprocess(work, jobs=1)`` with the ``paper`` plan (1 mm and
  4 mm outputs), seconds and peak RSS, next to the case's size as float32;
* the whole dataset: ``run_preprocess`` with ``jobs=1`` and ``jobs=2``;
* if ``nnunetv2`` is importable (``make bench-nnunet``): nnU-Net's own ``3d_fullres``
  and ``3d_lowres`` preprocessing (``nnUNetv2_preprocess -np 1`` and ``-np 2``) of the same cases in
  the same run, planned by nnU-Net on these cases (``bench/nnunet_reference.py``), and the ratio
  of kitspipe's time to the sum of nnU-Net's two configurations with as many workers.

Synthetic cases (``kitspipe.synthetic``, size ``full``) are picked from the first candidates
of the seed so that their sizes spread from small to large: the per-case rows are the data
of the scaling plot (``--plot docs/preprocess_scaling.png``).

    python bench/preprocess.py                      # 3 cases x 3 repeats, ~3-4 min on 2 cores
    python bench/preprocess.py --quick              # 2 small cases, 1 repeat, ~1 min
    python bench/preprocess.py --data /data/kits19 --cases 5
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import child_process  # noqa: E402
import nnunet_reference  # noqa: E402
from benchlib import Summary, mib, summary_json, table  # noqa: E402

SCRIPT = Path(__file__).resolve()
CANDIDATES = 12  # synthetic case indices the spread of sizes is picked from
NNUNET_CONFIGURATIONS = ("3d_fullres", "3d_lowres")
NNUNET_WORKERS = (1, 2)


# ----------------------------------------------------------------------------- child side

def child_main(spec: dict[str, Any]) -> None:
    """One timed call; prints the BENCH_RESULT line."""
    task = spec["task"]
    if task == "fingerprint":
        from kitspipe.fingerprint import run_fingerprint

        baseline = child_process.rss_bytes()
        clock = child_process.ChildClock()
        run_fingerprint(spec["data"], spec["work"], jobs=1, progress=False, force=True)
    elif task == "preprocess":
        from kitspipe.preprocessing import run_preprocess

        baseline = child_process.rss_bytes()
        clock = child_process.ChildClock()
        run_preprocess(spec["work"], jobs=spec["jobs"], progress=False, force=True)
    elif task == "nnunet":
        nnunet_reference.child_preprocess(spec)
        return
    elif task == "nnunet_import":
        nnunet_reference.child_import()
        return
    else:
        raise ValueError(f"unknown task {task!r}")
    child_process.child_report(clock, baseline)


# ----------------------------------------------------------------------------- parent side

@dataclass
class CaseRun:
    """One case: its size and its measurements."""

    case_id: str
    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    work: Path
    data: Path
    high_shape: tuple[int, ...] = ()
    low_shape: tuple[int, ...] = ()
    fingerprint: list[child_process.ChildResult] = field(default_factory=list)
    preprocess: list[child_process.ChildResult] = field(default_factory=list)

    @property
    def voxels(self) -> int:
        return math.prod(self.shape_zyx)

    @property
    def float32_bytes(self) -> int:
        return 4 * self.voxels


def pick_indices(n_cases: int, seed: int, quick: bool) -> list[int]:
    """Synthetic case indices whose sizes spread from the smallest to the largest candidate
    (quick mode: the smallest ones, to be fast)."""
    from kitspipe.synthetic import sample_case

    by_size = sorted((math.prod(sample_case(i, seed, "full").scan.shape), i) for i in range(CANDIDATES))
    if quick or n_cases == 1:
        return sorted(i for _, i in by_size[:n_cases])
    positions = [round(k * (len(by_size) - 1) / (n_cases - 1)) for k in range(n_cases)]
    return [by_size[p][1] for p in positions]


def case_geometry(work: Path) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Canonical (z, y, x) shape and spacing of a one-case dataset, from its fingerprint."""
    from kitspipe.fingerprint import load_fingerprint

    case = load_fingerprint(work)["cases"][0]
    return tuple(case["shape"]), tuple(case["spacing_mm"])


def setup_work(data: Path, work: Path) -> None:
    """Fingerprint and ``paper`` plan of a dataset (setup, not timed)."""
    from kitspipe.fingerprint import run_fingerprint
    from kitspipe.planning import run_plan

    run_fingerprint(data, work, jobs=1, progress=False)
    run_plan(work, "paper")


def output_shapes(work: Path, case_id: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    properties = json.loads((work / "preprocessed" / case_id / "properties.json").read_text())
    return tuple(properties["high_grid"]["shape"]), tuple(properties["low_grid"]["shape"])


def measure(args) -> dict[str, Any]:
    repeats = args.repeats or (1 if args.quick else 3)
    n_cases = args.cases or (2 if args.quick else 3)
    with benchlib.data_folder(args.data) as data, benchlib.scratch_folder("preprocess") as scratch:
        if not benchlib.has_cases(data):
            indices = pick_indices(n_cases, args.seed, args.quick)
            print(f"synthesizing full-size cases {indices} (seed {args.seed}) in {data} ...", flush=True)
            benchlib.synthesize(data, indices, args.seed, "full")
        cases = benchlib.labelled_cases(data, n_cases)
        runs = []
        for case in cases:
            case_data = benchlib.link_case(case, scratch / "data" / case.case_id)
            work = scratch / "work" / case.case_id
            setup_work(case_data, work)
            shape, spacing = case_geometry(work)
            runs.append(CaseRun(case.case_id, shape, spacing, work, case_data))
        all_data = scratch / "data_all"
        for case in cases:
            benchlib.link_case(case, all_data)
        all_work = scratch / "work_all"
        setup_work(all_data, all_work)

        nnunet_env: dict[str, str] | None = None
        nnunet_note = ""
        if not args.nnunet:
            nnunet_note = "nnU-Net comparison skipped (--no-nnunet)"
        elif not nnunet_reference.available():
            nnunet_note = nnunet_reference.skip_reason("cpu")  # preprocessing runs on the CPU whatever --device says
        else:
            nnunet_env = nnunet_reference.setup(cases, scratch / "nnunet")
        nnunet_configs = nnunet_reference.planned(nnunet_env, NNUNET_CONFIGURATIONS) if nnunet_env else []

        # jobs=1 over the dataset is the sequence of the per-case runs (same code path, one case
        # after the other), so only jobs=2 is run over the whole dataset.
        dataset_runs: dict[str, list[child_process.ChildResult]] = {"jobs=2": []} if len(cases) > 1 else {}
        nnunet_runs: dict[tuple[str, int], list[child_process.ChildResult]] = {(c, w): [] for w in NNUNET_WORKERS
                                                                  for c in nnunet_configs}
        # Repeats are interleaved so that a change of machine load spreads over every measurement.
        for repeat in range(repeats):
            print(f"repeat {repeat + 1}/{repeats} ...", flush=True)
            for run in runs:
                run.fingerprint.append(child_process.run_child(SCRIPT, {"task": "fingerprint", "data": str(run.data),
                                                                        "work": str(run.work)}))
                run.preprocess.append(child_process.run_child(SCRIPT, {"task": "preprocess", "work": str(run.work),
                                                                       "jobs": 1}))
            if dataset_runs:
                dataset_runs["jobs=2"].append(child_process.run_child(SCRIPT, {"task": "preprocess", "work": str(all_work),
                                                                               "jobs": 2}))
            for config, workers in nnunet_runs:
                nnunet_runs[config, workers].append(child_process.run_child(
                    SCRIPT, {"task": "nnunet", "configuration": config, "workers": workers}, env=nnunet_env))
        nnunet_import = [child_process.run_child(SCRIPT, {"task": "nnunet_import"}, env=nnunet_env)
                         for _ in range(repeats)] if nnunet_env else []
        for run in runs:
            run.high_shape, run.low_shape = output_shapes(run.work, run.case_id)
        # nnU-Net's plans give the target spacings it resampled to (the median of these cases).
        nnunet_planned = nnunet_reference.plans(nnunet_env)["configurations"] if nnunet_env else {}
        nnunet_spacing = {c: nnunet_planned[c]["spacing"] for c in nnunet_configs}
    return report(runs, dataset_runs, nnunet_runs, nnunet_import, nnunet_note, nnunet_spacing, repeats, args)


# ----------------------------------------------------------------------------- report

def report(runs: list[CaseRun], dataset_runs: dict[str, list[child_process.ChildResult]],
           nnunet_runs: dict[tuple[str, int], list[child_process.ChildResult]],
           nnunet_import: list[child_process.ChildResult], nnunet_note: str, nnunet_spacing: dict[str, list[float]], repeats: int,
           args) -> dict[str, Any]:
    rows = []
    figures_cases = []
    for run in runs:
        fp = Summary.of([r.seconds for r in run.fingerprint])
        pp = Summary.of([r.seconds for r in run.preprocess])
        pp_cpu = Summary.of([r.cpu_seconds for r in run.preprocess])
        peak = Summary.of([r.peak_rss for r in run.preprocess])
        fp_peak = Summary.of([r.peak_rss for r in run.fingerprint])
        # What the stage itself adds on top of the interpreter and imports (issue 6's target).
        added = Summary.of([r.peak_rss - r.baseline_rss for r in run.preprocess])
        rows.append([run.case_id, "×".join(map(str, run.shape_zyx)), "×".join(f"{s:.2f}" for s in run.spacing_zyx),
                     mib(run.float32_bytes), "×".join(map(str, run.high_shape)), fp.fmt(), pp.fmt(), pp_cpu.fmt(1),
                     f"{mib(peak.median)} / {mib(fp_peak.median)}", f"{peak.median / run.float32_bytes:.1f}",
                     f"{added.median / run.float32_bytes:.2f}"])
        figures_cases.append({
            "case_id": run.case_id, "shape_zyx": list(run.shape_zyx), "spacing_zyx_mm": list(run.spacing_zyx),
            "voxels": run.voxels, "float32_bytes": run.float32_bytes, "high_shape": list(run.high_shape),
            "low_shape": list(run.low_shape), "high_voxels": math.prod(run.high_shape),
            "fingerprint_s": summary_json([r.seconds for r in run.fingerprint]),
            "fingerprint_cpu_s": summary_json([r.cpu_seconds for r in run.fingerprint]),
            "fingerprint_peak_rss_bytes": summary_json([r.peak_rss for r in run.fingerprint]),
            "preprocess_s": summary_json([r.seconds for r in run.preprocess]),
            "preprocess_cpu_s": summary_json([r.cpu_seconds for r in run.preprocess]),
            "preprocess_peak_rss_bytes": summary_json([r.peak_rss for r in run.preprocess]),
            "preprocess_baseline_rss_bytes": Summary.of([r.baseline_rss for r in run.preprocess]).median,
            "peak_rss_over_float32_case": peak.median / run.float32_bytes,
            "added_rss_over_float32_case": added.median / run.float32_bytes,
        })
    print()
    print(table(["case", "shape z×y×x", "spacing mm", "f32 MiB", "1 mm grid", "fingerprint s", "preprocess -j1 s",
                 "preprocess CPU s", "peak RSS MiB pp / fp", "pp peak/f32", "pp added/f32"], rows,
                title=f"Per case: median (min–max) of {repeats} runs, each in a fresh process; "
                      f"preprocess = paper plan, 1 mm + 4 mm outputs"))
    baseline_mib = mib(Summary.of([r.baseline_rss for run in runs for r in run.preprocess]).median)
    print(f"(peak RSS includes ~{baseline_mib} MiB of interpreter and imports, measured before the timed call; "
          f"added = peak RSS minus that baseline; CPU s = user + system)")

    figures: dict[str, Any] = {"repeats": repeats, "cases": figures_cases}
    if dataset_runs:
        n = len(runs)
        dataset_runs = {"jobs=1": sequential_runs(runs), **dataset_runs}
        one = Summary.of([r.seconds for r in dataset_runs["jobs=1"]])
        dataset_rows = []
        figures["dataset"] = {"n_cases": n, "jobs=1_is": "sum of the per-case runs of the same repeat"}
        for label, results in dataset_runs.items():
            seconds = Summary.of([r.seconds for r in results])
            dataset_rows.append([f"run_preprocess {label}", seconds.fmt(), f"{seconds.median / n:.2f}",
                                 f"{one.median / seconds.median:.2f}×",
                                 Summary.of([r.cpu_seconds for r in results]).fmt(1),
                                 mib(Summary.of([r.peak_rss for r in results]).median),
                                 mib(Summary.of([r.tree_peak_rss for r in results]).median)])
            figures["dataset"][label] = {"seconds": summary_json([r.seconds for r in results]),
                                         "cpu_seconds": summary_json([r.cpu_seconds for r in results]),
                                         "peak_rss_per_process_bytes": summary_json([r.peak_rss for r in results]),
                                         "tree_peak_rss_bytes": summary_json([r.tree_peak_rss for r in results])}
        print()
        print(table(["stage", "seconds", "s per case", "speed-up", "CPU s", "peak RSS/process MiB",
                     "peak RSS all processes MiB"], dataset_rows,
                    title=f"Whole dataset ({n} cases; jobs=1 = the per-case runs of each repeat added up, "
                          f"jobs=2 = one run_preprocess over all cases)"))
    print()
    if nnunet_note:
        print(nnunet_note)
        figures["nnunet"] = {"skipped": nnunet_note}
    else:
        figures["nnunet"] = nnunet_figures(runs, dataset_runs, nnunet_runs, nnunet_import, nnunet_spacing)
    return figures


def sequential_runs(runs: list[CaseRun]) -> list[child_process.ChildResult]:
    """Repeat r of the whole dataset at jobs=1: the per-case runs of repeat r added up."""
    totals = []
    for repeat in range(len(runs[0].preprocess)):
        parts = [run.preprocess[repeat] for run in runs]
        totals.append(child_process.ChildResult(seconds=sum(p.seconds for p in parts),
                                       cpu_seconds=sum(p.cpu_seconds for p in parts),
                                       peak_rss=max(p.peak_rss for p in parts),
                                       tree_peak_rss=max(p.tree_peak_rss for p in parts),
                                       baseline_rss=max(p.baseline_rss for p in parts)))
    return totals


def nnunet_figures(runs: list[CaseRun], dataset_runs: dict[str, list[child_process.ChildResult]],
                   nnunet_runs: dict[tuple[str, int], list[child_process.ChildResult]],
                   nnunet_import: list[child_process.ChildResult], spacing: dict[str, list[float]]) -> dict[str, Any]:
    """nnU-Net's preprocessing of the same cases next to kitspipe's, 1 and 2 workers, and the ratios."""
    n = len(runs)
    configurations = sorted({c for c, _ in nnunet_runs}, key=NNUNET_CONFIGURATIONS.index)
    figures: dict[str, Any] = {"version": nnunet_reference.version(), "configurations": configurations,
                               "target_spacing_mm": spacing}
    kitspipe = {1: dataset_runs.get("jobs=1") or sequential_runs(runs), 2: dataset_runs.get("jobs=2")}
    rows = []
    for workers in NNUNET_WORKERS:
        total = 0.0
        for config in configurations:
            results = nnunet_runs[config, workers]
            seconds = Summary.of([r.seconds for r in results])
            total += seconds.median
            rows.append([f"nnU-Net {config} -np {workers}", seconds.fmt(), f"{seconds.median / n:.2f}",
                         Summary.of([r.cpu_seconds for r in results]).fmt(1),
                         mib(Summary.of([r.peak_rss for r in results]).median),
                         mib(Summary.of([r.tree_peak_rss for r in results]).median), ""])
            figures[f"{config} -np {workers}"] = {
                "seconds": summary_json([r.seconds for r in results]),
                "cpu_seconds": summary_json([r.cpu_seconds for r in results]),
                "peak_rss_bytes": summary_json([r.peak_rss for r in results]),
                "tree_peak_rss_bytes": summary_json([r.tree_peak_rss for r in results])}
        if not kitspipe[workers]:
            continue
        ours = Summary.of([r.seconds for r in kitspipe[workers]])
        ratio = ours.median / total
        rows.append([f"kitspipe paper plan -j{workers}", ours.fmt(), f"{ours.median / n:.2f}",
                     Summary.of([r.cpu_seconds for r in kitspipe[workers]]).fmt(1),
                     mib(Summary.of([r.peak_rss for r in kitspipe[workers]]).median),
                     mib(Summary.of([r.tree_peak_rss for r in kitspipe[workers]]).median), f"{ratio:.2f}×"])
        figures[f"seconds_ratio_kitspipe_over_nnunet_{workers}_workers"] = ratio
    print(table(["stage", "seconds", "s per case", "CPU s", "peak RSS/process MiB", "peak RSS all processes MiB",
                 "kitspipe / nnU-Net"], rows,
                title=f"nnU-Net {figures['version']} on the same {n} cases, same run (seconds exclude interpreter "
                      f"start and imports; kitspipe / nnU-Net = kitspipe ÷ the sum of nnU-Net's "
                      f"{' + '.join(configurations)} with as many workers)"))
    print("nnU-Net's target spacings (its axis order, mm): "
          + "; ".join(f"{c} {'×'.join(f'{v:.2f}' for v in spacing[c])}" for c in configurations)
          + "; kitspipe's paper plan: 1 mm and 4 mm isotropic")
    if nnunet_import:
        print(f"(nnU-Net's import alone: {Summary.of([r.seconds for r in nnunet_import]).fmt()} s, not counted)")
    missing = [c for c in NNUNET_CONFIGURATIONS if c not in configurations]
    if missing:
        print(f"nnU-Net planned no {', '.join(missing)} for these cases")
    return figures


def _errorbar(ax, cases: list[dict[str, Any]], x_key: str, y_key: str, label: str, marker: str,
              scale: float = 1.0) -> None:
    cases = sorted(cases, key=lambda c: c[x_key])
    x = [c[x_key] / 1e6 for c in cases]
    median = [c[y_key]["median"] * scale for c in cases]
    below = [m - c[y_key]["min"] * scale for m, c in zip(median, cases)]
    above = [c[y_key]["max"] * scale - m for m, c in zip(median, cases)]
    ax.errorbar(x, median, yerr=[below, above], marker=marker, capsize=3, label=label)


def plot(figures: dict[str, Any], path: Path) -> None:
    """Seconds against case voxels (source grid and 1 mm grid) and peak RSS, with min–max bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = figures["cases"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    _errorbar(axes[0], cases, "voxels", "fingerprint_s", "fingerprint", "s")
    _errorbar(axes[0], cases, "voxels", "preprocess_s", "preprocess -j1 (1 mm + 4 mm)", "o")
    axes[0].set_xlabel("source voxels (millions; 512 × 512 × slices)")
    axes[0].set_title("against the source size")
    _errorbar(axes[1], cases, "high_voxels", "preprocess_s", "preprocess -j1, wall", "o")
    _errorbar(axes[1], cases, "high_voxels", "preprocess_cpu_s", "preprocess -j1, CPU (user + system)", "^")
    axes[1].set_xlabel("1 mm grid voxels (millions)")
    axes[1].set_title("against the 1 mm output size")
    for ax in axes[:2]:
        ax.set_ylabel("seconds per case (median, min–max)")
    _errorbar(axes[2], cases, "voxels", "preprocess_peak_rss_bytes", "preprocess peak RSS", "o", 1 / benchlib.GIB)
    _errorbar(axes[2], cases, "voxels", "fingerprint_peak_rss_bytes", "fingerprint peak RSS", "s", 1 / benchlib.GIB)
    ordered = sorted(cases, key=lambda c: c["voxels"])
    axes[2].plot([c["voxels"] / 1e6 for c in ordered], [c["float32_bytes"] / benchlib.GIB for c in ordered], "k--",
                 label="source case as float32")
    axes[2].set_xlabel("source voxels (millions)")
    axes[2].set_ylabel("GiB")
    axes[2].set_title("memory")
    for ax, key in zip(axes, ("voxels", "high_voxels", "voxels")):
        ax.set_xlim(0, 1.1 * max(c[key] for c in cases) / 1e6)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"kitspipe fingerprint and preprocess (paper plan), full-size synthetic cases, "
                 f"median of {figures['repeats']} runs per point")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main() -> None:
    parser = benchlib.base_parser(__doc__)
    parser.add_argument("--cases", type=int, default=None, help="cases to measure (default 3; quick 2)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic dataset seed (default 0)")
    parser.add_argument("--plot", type=Path, default=None, help="write the scaling plot (PNG) here")
    parser.add_argument("--no-nnunet", dest="nnunet", action="store_false",
                        help="skip nnU-Net's preprocessing (it runs when nnunetv2 is importable, ~12 min more)")
    args = parser.parse_args()
    benchlib.run_benchmark(args, "bench/preprocess.py", measure, child_main, notes=("the preprocess stage runs on the CPU whatever --device says",), after=(lambda figures: plot(figures, args.plot)) if args.plot else None,
                           device_check=False)

if __name__ == "__main__":
    main()
