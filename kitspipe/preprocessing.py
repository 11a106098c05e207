"""The preprocess stage: every case onto the plan's two grids, stored for fast patch reads.

For each case: read in canonical (z, y, x) order, crop to the body, resample the image with
cubic B-splines and the label with nearest neighbour onto the high- and low-resolution grids
(``resampling.plan_grids``), clip HU to the plan's window and store

    WORK/preprocessed/<case>/high_image.npy   int16 HU (clipped; normalised on the fly)
                             high_label.npy   uint8 0/1/2
                             low_image.npy    int16 HU
                             low_label.npy    uint8
                             properties.json  source geometry, crop box, grids, label locations
    WORK/preprocessed/manifest.json           inputs, plan hash, output hashes per case

int16 HU is within 0.5 HU of the float result, half the bytes, and memory-maps directly.
A case whose inputs and plan hash are unchanged and whose outputs verify is skipped.
"""

from __future__ import annotations

import logging
import signal
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kitspipe import __version__
from kitspipe.atomic import atomic_save_npy, atomic_write_json, remove_stale_temporaries
from kitspipe.dataset import CaseFiles, discover
from kitspipe.errors import KitspipeError, Problem
from kitspipe.geometry import CanonicalGeometry
from kitspipe.hashing import file_sha256, stable_seed
from kitspipe.imageio import Volume, read_volume
from kitspipe.locking import work_lock
from kitspipe.manifest import MANIFEST_FILE, StageManifest
from kitspipe.plans import Plans, load_plans
from kitspipe.preflight import preprocess_bytes_needed, require_free_disk
from kitspipe.progress import progress_bar
from kitspipe.resampling import AIR_HU, Box, body_box, plan_grids, resample, resample_in_slabs, sub_grid

log = logging.getLogger(__name__)

PREPROCESSED_DIR = "preprocessed"
ARRAY_NAMES = ("high_image", "high_label", "low_image", "low_label")
LOCATION_SAMPLES = 2000


@dataclass
class PreparedCase:
    """A case on the plan's grids, in memory (inference uses this without writing it)."""

    high_image: np.ndarray
    low_image: np.ndarray
    high_label: np.ndarray | None
    low_label: np.ndarray | None
    high_grid: CanonicalGeometry
    low_grid: CanonicalGeometry
    crop: Box


def prepare_case(image: Volume, label: np.ndarray | None, plans: Plans) -> PreparedCase:
    """Crop, resample and clip one case; ``label`` is canonical and on the image's grid."""
    crop = body_box(image.array, label)
    cropped_grid = sub_grid(image.grid, crop)
    high_grid, low_grid = plan_grids(cropped_grid, Box((0, 0, 0), crop.shape), plans.high.spacing_mm, plans.scale)
    cropped = image.array[crop.slices()]
    low_clip, high_clip = plans.intensity.clip_hu

    def clipped_and_rounded(values: np.ndarray) -> np.ndarray:
        clipped = np.clip(values, low_clip, high_clip)
        return np.rint(clipped, out=clipped)

    def to_hu(grid: CanonicalGeometry) -> np.ndarray:
        # Slab by slab: the float32 result and SimpleITK's double coefficients of a whole case
        # would take several times the case's own memory (docs/performance.md).
        return resample_in_slabs(cropped, cropped_grid, grid, "cubic", default=AIR_HU, dtype=np.int16,
                                 finish=clipped_and_rounded)

    high_image, low_image = to_hu(high_grid), to_hu(low_grid)
    high_label = low_label = None
    if label is not None:
        cropped_label = np.ascontiguousarray(label[crop.slices()], dtype=np.uint8)
        high_label = resample(cropped_label, cropped_grid, high_grid, "nearest", dtype=np.uint8)
        low_label = resample(cropped_label, cropped_grid, low_grid, "nearest", dtype=np.uint8)
    return PreparedCase(high_image, low_image, high_label, low_label, high_grid, low_grid, crop)


def label_locations(label: np.ndarray, case_id: str) -> dict[str, list[list[int]]]:
    """A bounded, seeded sample of voxel positions per region, for foreground-centred sampling."""
    rng = np.random.default_rng(stable_seed("locations", case_id))
    out = {}
    for name, mask in (("kidney", label > 0), ("tumour", label == 2)):
        positions = np.argwhere(mask)
        if len(positions) > LOCATION_SAMPLES:
            positions = positions[np.sort(rng.choice(len(positions), LOCATION_SAMPLES, replace=False))]
        out[name] = positions.astype(int).tolist()
    return out


def case_inputs(case: CaseFiles) -> dict[str, str]:
    inputs = {"image": file_sha256(case.image)}
    if case.label is not None:
        inputs["label"] = file_sha256(case.label)
    return inputs


def preprocess_case(case: CaseFiles, plans: Plans, out_root: Path) -> list[Path]:
    """Preprocess one case and write its arrays and properties; returns the files written."""
    # The stored dtype (int16 for most CT) rather than float32: half the memory of the largest
    # array a case holds; resampling converts one slab at a time.
    image = read_volume(case.image, stage="preprocess", case=case.case_id)
    if image.array.dtype.itemsize > 4:  # float64 storage: float32 holds every HU value there is
        image = replace(image, array=image.array.astype(np.float32))
    label = None
    if case.label is not None:
        label = read_volume(case.label, dtype=np.uint8, stage="preprocess", case=case.case_id).array
    prepared = prepare_case(image, label, plans)
    properties = {
        "case_id": case.case_id,
        "kitspipe_version": __version__,
        "source_geometry": image.source.to_json(),
        "reorientation": {"transpose": list(image.reorientation.transpose), "flip": list(image.reorientation.flip)},
        "canonical_grid": image.grid.to_json(),
        "crop": prepared.crop.to_json(),
        "high_grid": prepared.high_grid.to_json(),
        "low_grid": prepared.low_grid.to_json(),
        "has_label": prepared.high_label is not None,
    }
    del image, label  # the source arrays, as large as the outputs: room for the steps below
    folder = out_root / case.case_id
    written = []
    for name in ARRAY_NAMES:
        array = getattr(prepared, name)
        if array is not None:
            path = folder / f"{name}.npy"
            atomic_save_npy(path, array)
            written.append(path)
    if prepared.high_label is not None:
        properties["locations"] = label_locations(prepared.high_label, case.case_id)
        properties["has_tumour"] = bool((prepared.high_label == 2).any())
    path = folder / "properties.json"
    atomic_write_json(path, properties)
    written.append(path)
    return written


def _worker_init() -> None:
    # Workers leave SIGINT to the parent, which stops the pool and marks the manifest.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_preprocess(work: str | Path, data: str | Path | None = None, jobs: int = 1, progress: bool = True,
                   force: bool = False) -> Path:
    """The preprocess stage over every case of the fingerprinted dataset."""
    work = Path(work)
    plans = load_plans(work / "plans.json")
    from kitspipe.fingerprint import load_fingerprint

    fingerprint = load_fingerprint(work)
    if plans.fingerprint_sha256 != fingerprint["sha256"]:
        raise KitspipeError(Problem("preprocess", "-", work / "plans.json", "plans were made from another fingerprint",
                                    str(plans.fingerprint_sha256)[:12], fingerprint["sha256"][:12]))
    dataset = discover(data or fingerprint["dataset_root"], stage="preprocess")
    cases = [c for c in dataset.cases if c.label is not None]
    out_root = work / PREPROCESSED_DIR
    with work_lock(out_root, "preprocess"):
        for stale in remove_stale_temporaries(out_root):
            log.info("removed the remains of an interrupted write: %s", stale)
        manifest = StageManifest.open(out_root / MANIFEST_FILE, "preprocess", plans.preprocessing_sha256())
        manifest.extra = {"fingerprint_sha256": fingerprint["sha256"], "case_ids": [c.case_id for c in cases]}
        todo = []
        inputs = {}
        measured = {c["case_id"]: {"image": c["image_sha256"], "label": c["label_sha256"]} for c in fingerprint["cases"]}
        changed = []
        for case in cases:
            inputs[case.case_id] = case_inputs(case)
            if measured.get(case.case_id) != inputs[case.case_id]:
                changed.append(Problem("preprocess", case.case_id, case.image.parent,
                                       "case differs from the fingerprinted data; rerun `kitspipe fingerprint`",
                                       "changed or new", "as fingerprinted"))
                continue
            if force or not manifest.is_current(case.case_id, inputs[case.case_id]):
                todo.append(case)
        if changed:
            raise KitspipeError(changed)
        log.info("preprocess: %d of %d cases to do", len(todo), len(cases))
        # Refused before the first case, not when the disk fills halfway through the dataset.
        require_free_disk("preprocess", out_root, preprocess_bytes_needed(
            {c.case_id: c.image for c in todo}, plans.high.spacing_mm, plans.scale))
        manifest.save(status="incomplete" if todo else "complete")
        with manifest.marking_interrupts():
            _run_cases(todo, plans, out_root, manifest, inputs, jobs, progress)
        stale_ids = sorted(set(manifest.cases) - {c.case_id for c in cases})
        for case_id in stale_ids:
            del manifest.cases[case_id]
        manifest.save(status="complete")
    return out_root


def _run_cases(todo: list[CaseFiles], plans: Plans, out_root: Path, manifest: StageManifest,
               inputs: dict[str, dict], jobs: int, progress: bool) -> None:
    if jobs <= 1 or len(todo) <= 1:
        for case in progress_bar(todo, desc="preprocess", enabled=progress):
            written = preprocess_case(case, plans, out_root)
            manifest.record(case.case_id, inputs[case.case_id], written)
            manifest.save()
        return
    with ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init) as pool:
        finished: set[str] = set()
        try:
            # Submitting is inside the try: a worker can die while later cases are still queued.
            futures = {pool.submit(preprocess_case, case, plans, out_root): case for case in todo}
            for future in progress_bar(as_completed(futures), total=len(futures), desc="preprocess", enabled=progress):
                case = futures[future]
                written = future.result()
                manifest.record(case.case_id, inputs[case.case_id], written)
                manifest.save()
                finished.add(case.case_id)
        except BrokenProcessPool:
            unfinished = [c.case_id for c in todo if c.case_id not in finished]
            raise KitspipeError(Problem(
                "preprocess", unfinished[0] if unfinished else "-", out_root,
                "a worker process died (killed for memory?); rerun with fewer workers (-j 1)",
                f"cases in flight or queued: {', '.join(unfinished[:4])}", "every case done")) from None
