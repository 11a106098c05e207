"""The integrity check of input data, run by ``kitspipe check DATA`` and before every stage.

Each case is judged in the order a careful reader would: the raw header (is it NIfTI,
how big, see ``kitspipe.nifti_header``; which orientation transform applies, see
``kitspipe.nifti_orientation``); the whole
stream (so a truncated file fails here, not in epoch 40, and NaN/Inf are counted before
SimpleITK silently loads them as 0); the voxels as SimpleITK loads them (label values,
constant images); and finally whether the label lies on the image's grid. Every problem
of every case is collected, so one run lists everything a user has to fix. Nothing is
written.

Errors stop the stage that asked for the check; warnings (an empty label, a constant
image, an unusual voxel spacing, a stale qform) are reported and the stage goes on.
"""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from kitspipe.dataset import CaseFiles, Dataset
from kitspipe.errors import KitspipeError, Problem
from kitspipe.geometry import Geometry, reorientation_for
from kitspipe.imageio import read_image
from kitspipe.label_map import cross_check_label_map
from kitspipe.labels import ALLOWED_LABELS, KIDNEY, TUMOUR
from kitspipe.nifti_header import (
    NiftiHeader,
    available_memory_bytes,
    read_nifti_header,
    size_problems,
    verify_stream,
)
from kitspipe.nifti_orientation import format_vector, orientation_problems

# Outside this range a spacing is more likely a unit or header error than a real scan.
USUAL_SPACING_MM = (0.3, 10.0)
# A CT volume in HU contains air (about -1000 HU); a minimum above this suggests stored
# values that were never shifted to HU, e.g. a 1024 offset without scl_inter.
AIR_HU_CEILING = -100.0
OBLIQUE_TOL = 1e-4


@dataclass
class CaseReport:
    """What the check learnt about one case; the fingerprint stores it.

    Args:
        case_id: the case.
        ok: True when no error was found (warnings allowed).
        image_geometry: the image's grid as stored in its file, None if it could not be read.
        label_values: label value -> voxel count (empty for unlabeled or unreadable labels).
        intensity_encoding: how the image stores intensities, e.g. ``int16 scaled (slope 1, inter -1024)``.
        notes: accepted oddities and normalisations applied when reading.
    """

    case_id: str
    ok: bool
    image_geometry: Geometry | None
    label_values: dict[int, int] = field(default_factory=dict)
    intensity_encoding: str = ""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "case_id": self.case_id,
            "ok": self.ok,
            "image_geometry": None if self.image_geometry is None else self.image_geometry.to_json(),
            "label_values": {str(k): v for k, v in sorted(self.label_values.items())},
            "intensity_encoding": self.intensity_encoding,
            "notes": list(self.notes),
        }


@dataclass
class CheckReport:
    """All findings of one check run: errors, warnings and one report per case (ordered by id)."""

    problems: list[Problem]
    warnings: list[Problem]
    cases: list[CaseReport]

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_errors(self) -> None:
        """Raise one ``KitspipeError`` whose message holds every error line."""
        if self.problems:
            raise KitspipeError(self.problems)


def check_case(case: CaseFiles, stage: str = "check",
               memory_limit_bytes: int | None = None) -> tuple[CaseReport, list[Problem]]:
    """Check the image and (if present) the label of one case.

    Args:
        case: the case's files, as found by ``kitspipe.dataset.discover``.
        stage: the stage name used in problem lines.
        memory_limit_bytes: refuse files whose header asks for more; None means the memory
            available now.

    Returns:
        The case report and every problem found, errors and warnings (``Problem.severity``).
    """
    if memory_limit_bytes is None:
        memory_limit_bytes = available_memory_bytes()
    problems: list[Problem] = []
    report = CaseReport(case.case_id, ok=True, image_geometry=None)
    loaded = _load_checked(case.image, "image", case.case_id, stage, memory_limit_bytes, problems, report.notes)
    if loaded is not None:
        info, image = loaded
        report.intensity_encoding = info.encoding()
        report.image_geometry = Geometry.of(image)
        _check_image_values(sitk.GetArrayViewFromImage(image), case, stage, problems)
        _check_image_grid(report.image_geometry, case, stage, problems, report.notes)
        del image, loaded  # only the geometry is needed from here on; free the voxels first
    if case.label is not None:
        loaded = _load_checked(case.label, "label", case.case_id, stage, memory_limit_bytes, problems, report.notes)
        if loaded is not None:
            label = loaded[1]
            if report.image_geometry is not None:
                _compare_grids(case.case_id, case.label, Geometry.of(label), "label",
                               case.image, report.image_geometry, "image", stage, problems)
            report.label_values = _check_label_values(sitk.GetArrayViewFromImage(label), case, stage,
                                                      problems, report.notes)
            del label, loaded
    report.ok = not any(p.severity == "error" for p in problems)
    return report, problems


def check_dataset(dataset: Dataset, stage: str = "check", require_labels: bool = False, jobs: int = 1,
                  memory_limit_bytes: int | None = None, progress: bool = True) -> CheckReport:
    """Check every case of a dataset and collect all problems.

    Args:
        dataset: the cases, as found by ``kitspipe.dataset.discover``.
        stage: the stage name used in problem lines.
        require_labels: training needs a label for every case; a missing one is an error.
        jobs: worker processes; each checks one case at a time.
        memory_limit_bytes: memory the whole check may use, shared among the workers;
            None means the memory available now.
        progress: print one line per checked case to stderr.
    """
    if memory_limit_bytes is None:
        memory_limit_bytes = available_memory_bytes()
    per_worker = None if memory_limit_bytes is None else memory_limit_bytes // max(1, jobs)
    cases = sorted(dataset.cases, key=lambda c: c.case_id)
    problems: list[Problem] = []
    if require_labels:
        for case in cases:
            if case.label is None:
                kits = dataset.layout == "kits"
                problems.append(Problem(stage, case.case_id, case.image.parent if kits else case.image,
                                        "training case without a label file", "no segmentation",
                                        "segmentation.nii.gz" if kits else "a label in labelsTr/"))
    reports = []
    for index, (report, found) in enumerate(_run_checks(cases, stage, per_worker, jobs), start=1):
        reports.append(report)
        problems.extend(found)
        if progress:
            status = "ok" if report.ok else "FAILED"
            print(f"{stage} {index}/{len(cases)} {report.case_id}: {status}", file=sys.stderr, flush=True)
    problems.extend(cross_check_label_map(dataset, reports, stage))  # needs every case's histogram
    return CheckReport(problems=[p for p in problems if p.severity == "error"],
                       warnings=[p for p in problems if p.severity != "error"], cases=reports)


def _run_checks(cases: list[CaseFiles], stage: str, memory_limit_bytes: int | None, jobs: int):
    """Yield ``check_case`` results in the order of ``cases``, in this process or in a pool."""
    if jobs <= 1 or len(cases) <= 1:
        for case in cases:
            yield check_case(case, stage, memory_limit_bytes)
        return
    # spawn, not fork: a forked child may inherit ITK's thread pool in a locked state.
    context = multiprocessing.get_context("spawn")
    def died(case: CaseFiles) -> KitspipeError:
        return KitspipeError(Problem(stage, case.case_id, case.image, "a check worker died (killed for memory?)",
                                     f"--jobs {jobs}", "fewer jobs or more memory"))

    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        try:
            # spawn starts workers while cases are submitted, so one can die before all are queued.
            futures = [pool.submit(check_case, case, stage, memory_limit_bytes) for case in cases]
        except BrokenProcessPool:
            raise died(cases[0]) from None
        for case, future in zip(cases, futures):
            try:
                yield future.result()
            except BrokenProcessPool:
                raise died(case) from None


def check_predictions(reference: Dataset, prediction_dir: str | Path, stage: str = "evaluate",
                      file_ending: str = ".nii.gz") -> CheckReport:
    """Pair every labelled reference case with ``<prediction_dir>/<case_id><file_ending>``.

    A missing prediction, a prediction without a reference case, an unreadable file or a
    prediction on another grid than its reference label are errors, so an evaluation never
    averages silently over a subset of the cases.

    Args:
        reference: the dataset holding the reference labels.
        prediction_dir: the folder of predicted label maps.
        stage: the stage name used in problem lines.
        file_ending: the suffix of prediction files.
    """
    prediction_dir = Path(prediction_dir)
    problems: list[Problem] = []
    reports = []
    labelled = {c.case_id: c for c in reference.labelled}
    for case_id, case in sorted(labelled.items()):
        before = len(problems)
        path = prediction_dir / f"{case_id}{file_ending}"
        geometry = None
        if not path.is_file():
            problems.append(Problem(stage, case_id, path, "no prediction for this reference case",
                                    "missing", "one prediction per labelled case"))
        else:
            geometry = _header_geometry(path, case_id, stage, problems)
            expected = _header_geometry(case.label, case_id, stage, problems)
            if geometry is not None and expected is not None:
                _compare_grids(case_id, path, geometry, "prediction", case.label, expected, "reference",
                               stage, problems)
        reports.append(CaseReport(case_id, ok=len(problems) == before, image_geometry=geometry))
    for path in sorted(prediction_dir.iterdir()) if prediction_dir.is_dir() else []:
        case_id = path.name[: -len(file_ending)]
        if path.name.endswith(file_ending) and case_id not in labelled:
            problems.append(Problem(stage, case_id, path, "prediction without a reference case"))
    return CheckReport(problems=problems, warnings=[], cases=reports)


def _load_checked(path: Path, role: str, case_id: str, stage: str, memory_limit_bytes: int | None,
                  problems: list[Problem], notes: list[str]) -> tuple[NiftiHeader, sitk.Image] | None:
    """Judge a file's header and stream; load it with SimpleITK only if they are sound."""
    info = _read_header(path, case_id, stage, problems)
    if info is None:
        return None
    found = _dimension_problems(info, role, case_id, stage, notes)
    if not found:
        # The orientation of a file that is not 3-D is meaningless; its dimension error suffices.
        found += orientation_problems(info, stage, case_id)[1]
    found += size_problems(info, stage, case_id, memory_limit_bytes)
    problems.extend(found)
    if any(p.severity == "error" for p in found):
        return None
    stream = verify_stream(info, stage, case_id, "intensities" if role == "image" else "label values")
    problems.extend(stream)
    if stream:
        return None
    try:
        return info, read_image(path, stage=stage, case=case_id)
    except KitspipeError as error:
        if info.version == 2:
            # SimpleITK 2.5 has no NIfTI-2 reader; say so rather than "unable to determine ImageIO".
            problems.append(Problem(stage, case_id, path, "NIfTI-2 is not readable by SimpleITK",
                                    f"NIfTI-2, SimpleITK {sitk.Version.VersionString()}", "NIfTI-1"))
        else:
            problems.extend(error.problems)
        return None


def _dimension_problems(info: NiftiHeader, role: str, case_id: str, stage: str, notes: list[str]) -> list[Problem]:
    ndim = len(info.shape)
    observed = f"{ndim}-D {info.dims_text()}"
    if ndim < 3:
        return [Problem(stage, case_id, info.path, "not a 3-D volume", observed, "3-D")]
    if any(extent > 1 for extent in info.shape[3:]):
        return [Problem(stage, case_id, info.path, "not a single 3-D volume", observed,
                        "3-D, or 4-D with one volume")]
    if ndim > 3:
        # Exporters often add a time axis of length 1; dropping it loses nothing.
        notes.append(f"{role}: {observed} has trailing singleton axes; read as 3-D")
    return []


def _check_image_values(array: np.ndarray, case: CaseFiles, stage: str, problems: list[Problem]) -> None:
    # NaN and infinities were counted in the raw stream: SimpleITK has replaced them with 0 here.
    low, high = float(array.min()), float(array.max())
    if low == high:
        problems.append(Problem(stage, case.case_id, case.image, "constant image", f"every voxel {low:g}",
                                "varying intensities", "warning"))
    elif low > AIR_HU_CEILING:
        problems.append(Problem(stage, case.case_id, case.image, "no air in the image: intensities may not be HU",
                                f"minimum {low:g}", "about -1000 HU (an unapplied 1024 offset?)", "warning"))


def _check_image_grid(geometry: Geometry, case: CaseFiles, stage: str, problems: list[Problem],
                      notes: list[str]) -> None:
    low, high = USUAL_SPACING_MM
    if any(not low <= s <= high for s in geometry.spacing):
        problems.append(Problem(stage, case.case_id, case.image, "unusual voxel spacing",
                                f"{format_vector(geometry.spacing)} mm", f"{low:g}-{high:g} mm", "warning"))
    try:
        reorientation_for(geometry)
    except ValueError:
        problems.append(Problem(stage, case.case_id, case.image, "direction has no nearest canonical axes",
                                format_vector(geometry.direction), "each index axis closest to a distinct world axis"))
        return
    magnitudes = np.abs(geometry.matrix())
    if np.any(np.minimum(magnitudes, np.abs(magnitudes - 1)) > OBLIQUE_TOL):
        notes.append("image: oblique direction; canonical arrays keep the residual rotation")


def _compare_grids(case_id: str, path: Path, grid: Geometry, role: str, reference_path: Path,
                   reference: Geometry, reference_role: str, stage: str, problems: list[Problem]) -> None:
    """A label (or prediction) must lie voxel for voxel on the grid of its image (or reference)."""
    if grid.size != reference.size:
        problems.append(Problem(stage, case_id, path, f"{role} shape differs from {reference_role} {reference_path}",
                                _dims(grid.size), _dims(reference.size)))
    # Sizes are reported above; compare the rest as if they agreed.
    differences = _tidy(reference).differences(_tidy(replace(grid, size=reference.size)))
    if differences:
        text = f"{role} grid differs from {reference_role} {reference_path}: " + "; ".join(differences)
        problems.append(Problem(stage, case_id, path, text, f"{role} LPS affine {_affine(grid)}",
                                f"{reference_role} LPS affine {_affine(reference)}"))


def _check_label_values(array: np.ndarray, case: CaseFiles, stage: str, problems: list[Problem],
                        notes: list[str]) -> dict[int, int]:
    values, counts = np.unique(array, return_counts=True)
    integral = np.ones(values.shape, dtype=bool)
    if array.dtype.kind == "f":
        integral = np.isfinite(values) & (values == np.round(values))
        if not integral.all():
            problems.append(Problem(stage, case.case_id, case.label, "non-integral label values",
                                    _value_counts(values[~integral], counts[~integral]), "integers 0, 1, 2"))
        else:
            notes.append(f"label: stored as {array.dtype.name} with integral values; read as integers")
    found = {int(v): int(c) for v, c in zip(values[integral], counts[integral])}
    outside = sorted(v for v in found if v not in ALLOWED_LABELS)
    if outside:
        problems.append(Problem(stage, case.case_id, case.label, "label values outside {0, 1, 2}",
                                _value_counts(outside, [found[v] for v in outside]), "0, 1, 2"))
    elif integral.all() and KIDNEY not in found and TUMOUR not in found:
        problems.append(Problem(stage, case.case_id, case.label, "label has no kidney or tumour voxels",
                                "background only", "some voxels labelled 1 or 2", "warning"))
    return found


def _read_header(path: Path, case_id: str, stage: str, problems: list[Problem]) -> NiftiHeader | None:
    try:
        return read_nifti_header(path, stage, case_id)
    except KitspipeError as error:
        problems.extend(error.problems)
    except OSError as error:
        problems.append(Problem(stage, case_id, path, "cannot read file", error.strerror or str(error)))
    return None


def _header_geometry(path: Path, case_id: str, stage: str, problems: list[Problem]) -> Geometry | None:
    """A file's grid from its header, after checking the header and the whole stream."""
    info = _read_header(path, case_id, stage, problems)
    if info is None:
        return None
    stream = verify_stream(info, stage, case_id)
    problems.extend(stream)
    if stream:
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        problems.append(Problem(stage, case_id, path, "unreadable image header", str(error).strip().splitlines()[-1]))
        return None
    size = tuple(int(v) for v in reader.GetSize())
    if len(size) != 3:
        problems.append(Problem(stage, case_id, path, "not a 3-D volume", f"{len(size)}-D {_dims(size)}", "3-D"))
        return None
    return Geometry(size, tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(reader.GetDirection()))


def _tidy(geometry: Geometry) -> Geometry:
    """The same grid with -0.0 turned into 0.0, so that messages print 0 rather than -0."""
    def clean(values):
        return tuple(float(v) + 0.0 for v in values)
    return Geometry(geometry.size, clean(geometry.spacing), clean(geometry.origin), clean(geometry.direction))


def _value_counts(values, counts) -> str:
    return ", ".join(f"{float(v):.6g}: {int(c)} voxels" for v, c in zip(values, counts))


def _dims(size) -> str:
    return "×".join(str(v) for v in size)


def _affine(geometry: Geometry) -> str:
    matrix = geometry.matrix() * np.asarray(geometry.spacing)
    rows = [list(matrix[i]) + [geometry.origin[i]] for i in range(3)]
    return "[" + "; ".join(" ".join(f"{v + 0.0:.4g}" for v in row) for row in rows) + "]"
