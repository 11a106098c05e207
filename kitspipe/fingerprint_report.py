"""Showing a fingerprint to a person: tables on the terminal and ``fingerprint.png``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from kitspipe.atomic import atomic_write_bytes
from kitspipe.fingerprint import load_fingerprint


def _row(name: str, d: dict, unit: str = "") -> str:
    if not d.get("n"):
        return f"  {name:<28} (none)"
    return (f"  {name:<28} median {d['median']:9.3f}{unit}  p05 {d['p05']:9.3f}  p95 {d['p95']:9.3f}  "
            f"min {d['min']:9.3f}  max {d['max']:9.3f}  n {d['n']}")


def fingerprint_text(fingerprint: dict) -> str:
    s = fingerprint["summary"]
    lines = [f"dataset {fingerprint['dataset_root']} ({fingerprint['layout']} layout), fingerprint "
             f"{fingerprint['sha256'][:12]}",
             f"cases: {s['n_cases']}, with tumour: {s['n_with_tumour']}, without any foreground: "
             f"{s['n_without_foreground']}", "", "spacing (mm), canonical axes z y x:"]
    lines += [_row(axis, s["spacing_mm"][axis]) for axis in "zyx"]
    lines += ["", "shape (voxels):"] + [_row(axis, s["shape"][axis]) for axis in "zyx"]
    lines += ["", "volumes (ml):", _row("kidney + tumour", s["kidney_volume_ml"]), _row("tumour", s["tumour_volume_ml"]),
              "", "foreground HU:"]
    for region, stats in s["hu"].items():
        lines.append(f"  {region:<28} mean {stats['mean']:8.1f}  std {stats['std']:7.1f}  "
                     f"p0.5 {stats['p00_5']:8.1f}  p99.5 {stats['p99_5']:8.1f}")
    lines += ["", f"{'case':<14}{'shape (z y x)':<20}{'spacing (mm)':<24}{'orient.':<9}{'kidney ml':>10}{'tumour ml':>10}"]
    for case in fingerprint["cases"]:
        shape = " ".join(str(v) for v in case["shape"])
        spacing = " ".join(f"{v:.2f}" for v in case["spacing_mm"])
        lines.append(f"{case['case_id']:<14}{shape:<20}{spacing:<24}{case['orientation']:<9}"
                     f"{case['volume_ml']['kidney']:>10.1f}{case['volume_ml']['tumour']:>10.1f}")
    return "\n".join(lines)


def plot_fingerprint(fingerprint: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = fingerprint["cases"]
    summary = fingerprint["summary"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    spacing = np.asarray([c["spacing_mm"] for c in cases])
    axes[0, 0].hist([spacing[:, 0], spacing[:, 2]], bins=15, label=["slice (z)", "in-plane (x)"])
    axes[0, 0].set_xlabel("spacing (mm)")
    axes[0, 0].set_ylabel("cases")
    axes[0, 0].legend()
    shape = np.asarray([c["shape"] for c in cases])
    axes[0, 1].hist([shape[:, 0], shape[:, 2]], bins=15, label=["slices (z)", "x"])
    axes[0, 1].set_xlabel("voxels")
    axes[0, 1].legend()
    edges = np.asarray(summary["hu_histogram_edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    for region in ("kidney", "tumour"):
        if region in summary["hu"]:
            counts = np.asarray(summary["hu"][region]["histogram"], dtype=float)
            axes[1, 0].plot(centres, counts / max(1.0, counts.sum()), label=region)
    axes[1, 0].set_xlabel("HU")
    axes[1, 0].set_ylabel("fraction of sampled voxels")
    axes[1, 0].legend()
    volumes = [c["volume_ml"]["tumour"] for c in cases if c["volume_ml"]["tumour"] > 0]
    axes[1, 1].hist(volumes or [0], bins=15)
    axes[1, 1].set_xlabel("tumour volume per case (ml)")
    fig.suptitle(f"fingerprint {fingerprint['sha256'][:12]}: {len(cases)} cases")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def show_fingerprint(work: str | Path) -> str:
    """Text tables of ``WORK/fingerprint.json``; also writes ``WORK/fingerprint.png``."""
    fingerprint = load_fingerprint(work)
    png = Path(work) / "fingerprint.png"
    plot_fingerprint(fingerprint, png)
    return fingerprint_text(fingerprint) + f"\n\nhistograms: {png}"
