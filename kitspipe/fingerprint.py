"""The dataset fingerprint: what the planner needs to know about the data, and what a user
wants to inspect before training.

Per case: canonical shape and spacing, orientation, kidney and tumour voxel counts and
volumes, the foreground bounding box, the intensity encoding and a bounded, seeded sample of
foreground HU. Over the dataset: distributions of spacing, shape and tumour volume, and
foreground HU statistics. Written to ``WORK/fingerprint.json``; ``--show`` prints it and
draws ``WORK/fingerprint.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from kitspipe import __version__
from kitspipe.atomic import atomic_write_json, canonical_json
from kitspipe.dataset import CaseFiles, Dataset, discover
from kitspipe.errors import KitspipeError, Problem
from kitspipe.hashing import file_sha256, stable_seed
from kitspipe.imageio import read_volume
from kitspipe.labels import KIDNEY, TUMOUR
from kitspipe.progress import progress_bar

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
HU_SAMPLES_PER_REGION = 10_000
HU_HISTOGRAM_EDGES = list(range(-500, 1001, 10))


def case_fingerprint(case: CaseFiles) -> dict:
    """Measure one labelled case; the HU sample is seeded by the case id, not by call order."""
    image = read_volume(case.image, dtype=np.float32, stage="fingerprint", case=case.case_id)
    label = read_volume(case.label, dtype=np.uint8, stage="fingerprint", case=case.case_id).array
    spacing = image.grid.spacing
    voxel_ml = float(np.prod(spacing)) / 1000.0
    rng = np.random.default_rng(stable_seed("fingerprint", case.case_id))
    counts = {name: int(np.count_nonzero(label == value)) for name, value in (("kidney", KIDNEY), ("tumour", TUMOUR))}
    foreground = label > 0
    samples = {}
    for name, value in (("kidney", KIDNEY), ("tumour", TUMOUR)):
        values = image.array[label == value]
        if values.size > HU_SAMPLES_PER_REGION:
            values = rng.choice(values, HU_SAMPLES_PER_REGION, replace=False)
        samples[name] = np.sort(values).round(1).tolist()
    if foreground.any():
        nonzero = np.nonzero(foreground)
        bbox = [[int(a.min()), int(a.max()) + 1] for a in nonzero]
    else:
        bbox = None
    return {
        "case_id": case.case_id,
        "image_sha256": file_sha256(case.image),
        "label_sha256": file_sha256(case.label),
        "shape": list(image.grid.shape),
        "spacing_mm": list(spacing),
        "orientation": "".join(nib.aff2axcodes(_ras_affine(image.source))),
        "voxels": counts,
        "volume_ml": {"kidney": counts["kidney"] * voxel_ml, "tumour": counts["tumour"] * voxel_ml,
                      "kidney_and_tumour": (counts["kidney"] + counts["tumour"]) * voxel_ml},
        "foreground_bbox": bbox,
        "foreground_extent_mm": None if bbox is None else [(b - a) * s for (a, b), s in zip(bbox, spacing)],
        "hu_sample": samples,
    }


def _ras_affine(geometry) -> np.ndarray:
    """The NIfTI (RAS) affine of a SimpleITK (LPS) geometry, for orientation codes."""
    affine = np.eye(4)
    affine[:3, :3] = geometry.matrix() * np.asarray(geometry.spacing)
    affine[:3, 3] = geometry.origin
    return np.diag([-1, -1, 1, 1]) @ affine


def _distribution(values: list[float]) -> dict:
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return {"n": 0}
    return {"n": int(array.size), "min": float(array.min()), "p05": float(np.percentile(array, 5)),
            "median": float(np.median(array)), "mean": float(array.mean()), "p95": float(np.percentile(array, 95)),
            "max": float(array.max())}


def summarise(cases: list[dict]) -> dict:
    """Dataset-level statistics from per-case fingerprints (ordered by case id)."""
    spacing = np.asarray([c["spacing_mm"] for c in cases])
    shape = np.asarray([c["shape"] for c in cases])
    kidney_hu = np.concatenate([np.asarray(c["hu_sample"]["kidney"]) for c in cases])
    tumour_hu = np.concatenate([np.asarray(c["hu_sample"]["tumour"]) for c in cases])
    foreground_hu = np.concatenate([kidney_hu, tumour_hu])
    summary = {
        "n_cases": len(cases),
        "n_with_tumour": sum(1 for c in cases if c["voxels"]["tumour"] > 0),
        "n_without_foreground": sum(1 for c in cases if c["foreground_bbox"] is None),
        "spacing_mm": {axis: _distribution(spacing[:, i].tolist()) for i, axis in enumerate("zyx")},
        "shape": {axis: _distribution(shape[:, i].tolist()) for i, axis in enumerate("zyx")},
        "tumour_volume_ml": _distribution([c["volume_ml"]["tumour"] for c in cases if c["voxels"]["tumour"] > 0]),
        "kidney_volume_ml": _distribution([c["volume_ml"]["kidney_and_tumour"] for c in cases]),
        "foreground_fraction": _distribution([
            (c["voxels"]["kidney"] + c["voxels"]["tumour"]) / float(np.prod(c["shape"])) for c in cases]),
        "tumour_fraction_of_foreground": _distribution([
            c["voxels"]["tumour"] / max(1, c["voxels"]["kidney"] + c["voxels"]["tumour"]) for c in cases]),
    }
    hu = {}
    for name, values in (("foreground", foreground_hu), ("kidney", kidney_hu), ("tumour", tumour_hu)):
        if values.size:
            hu[name] = {"mean": float(values.mean()), "std": float(values.std()),
                        "p00_5": float(np.percentile(values, 0.5)), "p99_5": float(np.percentile(values, 99.5)),
                        "histogram": np.histogram(values, bins=HU_HISTOGRAM_EDGES)[0].tolist()}
    summary["hu"] = hu
    summary["hu_histogram_edges"] = HU_HISTOGRAM_EDGES
    return summary


def compute_fingerprint(dataset: Dataset, jobs: int = 1, progress: bool = True) -> dict:
    cases = list(dataset.labelled)
    if not cases:
        raise KitspipeError(Problem("fingerprint", "-", dataset.root, "no labelled cases to fingerprint"))
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            per_case = list(progress_bar(pool.map(case_fingerprint, cases), total=len(cases),
                                         desc="fingerprint", enabled=progress))
    else:
        per_case = [case_fingerprint(c) for c in progress_bar(cases, desc="fingerprint", enabled=progress)]
    per_case.sort(key=lambda c: c["case_id"])
    fingerprint = {"kitspipe_version": __version__, "dataset_root": str(dataset.root.resolve()),
                   "layout": dataset.layout, "cases": per_case, "summary": summarise(per_case)}
    fingerprint["sha256"] = fingerprint_sha256(fingerprint)
    return fingerprint


def fingerprint_sha256(fingerprint: dict) -> str:
    """Hash of the measured content only: the same data gives the same hash wherever it lies."""
    content = {k: v for k, v in fingerprint.items() if k not in ("sha256", "dataset_root", "kitspipe_version")}
    return hashlib.sha256(canonical_json(content).encode()).hexdigest()


def load_fingerprint(work: str | Path) -> dict:
    path = Path(work) / FINGERPRINT_FILE
    if not path.is_file():
        raise KitspipeError(Problem("plan", "-", path, "no fingerprint (run `kitspipe fingerprint DATA --work WORK`)"))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise KitspipeError(Problem("plan", "-", path, "corrupt fingerprint", str(error)[:80])) from None
    if data.get("sha256") != fingerprint_sha256(data):
        raise KitspipeError(Problem("plan", "-", path, "fingerprint content does not match its hash",
                                    str(fingerprint_sha256(data))[:12], str(data.get("sha256"))[:12]))
    return data


def is_up_to_date(work: Path, dataset: Dataset) -> bool:
    """True when the stored fingerprint was computed from exactly these files (by content hash)."""
    try:
        stored = load_fingerprint(work)
    except KitspipeError:
        return False
    recorded = {c["case_id"]: (c["image_sha256"], c["label_sha256"]) for c in stored["cases"]}
    current = {c.case_id: (c.image, c.label) for c in dataset.labelled}
    if set(recorded) != set(current):
        return False
    return all((file_sha256(image), file_sha256(label)) == recorded[case_id]
               for case_id, (image, label) in current.items())


def run_fingerprint(data: str | Path, work: str | Path, jobs: int = 1, progress: bool = True,
                    force: bool = False) -> Path:
    """The fingerprint stage: discover, check, measure, write ``WORK/fingerprint.json``."""
    from kitspipe.validation import check_dataset

    work = Path(work)
    dataset = discover(data, stage="fingerprint", require_labels=False)
    if not dataset.labelled:
        raise KitspipeError(Problem("fingerprint", "-", dataset.root, "no labelled cases to fingerprint"))
    out = work / FINGERPRINT_FILE
    if not force and is_up_to_date(work, dataset):
        log.info("fingerprint up to date: %s", out)
        return out
    report = check_dataset(dataset, stage="fingerprint", jobs=jobs, progress=progress)
    for warning in report.warnings:
        log.warning(warning.line())
    report.raise_if_errors()
    fingerprint = compute_fingerprint(dataset, jobs=jobs, progress=progress)
    encodings = {c.case_id: c.intensity_encoding for c in report.cases}
    for case in fingerprint["cases"]:
        case["intensity_encoding"] = encodings.get(case["case_id"], "unknown")
    fingerprint["sha256"] = fingerprint_sha256(fingerprint)
    atomic_write_json(out, fingerprint)
    log.info("wrote %s (%d cases)", out, len(fingerprint["cases"]))
    return out
