"""Evaluation of predicted label maps against references: NIfTI files in, tables out.

Strictness (a summary must never average silently over a subset of the cases):

- every prediction must have the reference's size, spacing, origin and direction; spacing
  and origin may differ by float noise (relative 1e-4, plus 1e-4 mm absolute so that a zero
  origin compares sensibly), direction cosines by 1e-4;
- a missing prediction is an error; so is an extra prediction without a reference, unless
  ``allow_extra=True``, which turns it into a logged warning;
- every problem found is collected first and raised together in one
  :class:`~kitspipe.errors.KitspipeError`, one line per problem; nothing is written then.

Headers of all cases are checked before any volume is read, so a geometry mistake is
reported in seconds rather than after the metrics of the other cases were computed.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk

from kitspipe.atomic import TEMP_PREFIX, atomic_write_bytes, atomic_write_json, atomic_write_text
from kitspipe.errors import KitspipeError, Problem
from kitspipe.metrics import METRIC_NAMES, describe_invalid_labels, kits_case_metrics

logger = logging.getLogger(__name__)

PER_CASE_CSV = "metrics_per_case.csv"
SUMMARY_JSON = "summary.json"
PREDICTION_SUFFIX = ".nii.gz"
CASE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

SPACING_ORIGIN_RTOL = 1e-4
SPACING_ORIGIN_ATOL_MM = 1e-4
DIRECTION_ATOL = 1e-4


@dataclass(frozen=True)
class _Header:
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int


def _read_header(path: Path) -> _Header:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return _Header(
        size=reader.GetSize(),
        spacing=reader.GetSpacing(),
        origin=reader.GetOrigin(),
        direction=reader.GetDirection(),
        components=reader.GetNumberOfComponents(),
    )


def _error_summary(error: Exception) -> str:
    """The last non-empty line of a SimpleITK error, which says what went wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _header_problems(case: str, pred_path: Path, ref_path: Path, stage: str) -> list[Problem]:
    headers = {}
    problems = []
    for role, path in (("prediction", pred_path), ("reference", ref_path)):
        if not Path(path).is_file():
            problems.append(Problem(stage, case, path, f"{role} file not found"))
            continue
        try:
            header = _read_header(Path(path))
        except RuntimeError as error:
            problem = f"cannot read {role} image header"
            problems.append(Problem(stage, case, path, problem, _error_summary(error), "a readable image"))
            continue
        if len(header.size) != 3 or header.components != 1:
            observed = f"size {header.size}, {header.components} components"
            problems.append(Problem(stage, case, path, f"{role} is not a 3D scalar image", observed))
            continue
        headers[role] = header
    if len(headers) < 2:
        return problems
    pred, ref = headers["prediction"], headers["reference"]
    tolerance = dict(rtol=SPACING_ORIGIN_RTOL, atol=SPACING_ORIGIN_ATOL_MM)
    checks = (
        ("size", pred.size == ref.size),
        ("spacing", np.allclose(pred.spacing, ref.spacing, **tolerance)),
        ("origin", np.allclose(pred.origin, ref.origin, **tolerance)),
        ("direction", np.allclose(pred.direction, ref.direction, rtol=0.0, atol=DIRECTION_ATOL)),
    )
    for name, agrees in checks:
        if not agrees:
            problems.append(
                Problem(
                    stage, case, pred_path, f"prediction {name} differs from reference {ref_path}",
                    observed=str(getattr(pred, name)), expected=str(getattr(ref, name)),
                )
            )
    return problems


def _case_metrics(
    case: str, pred_path: Path, ref_path: Path, tolerance_mm: float, stage: str
) -> tuple[dict[str, float] | None, list[Problem]]:
    images = {}
    problems = []
    for role, path in (("prediction", pred_path), ("reference", ref_path)):
        try:
            images[role] = sitk.ReadImage(str(path))
        except RuntimeError as error:
            problem = f"cannot read {role} image"
            problems.append(Problem(stage, case, path, problem, _error_summary(error), "a readable image"))
            continue
        invalid = describe_invalid_labels(sitk.GetArrayViewFromImage(images[role]))
        if invalid:
            problems.append(Problem(stage, case, path, f"{role} has invalid labels", invalid, "0, 1, 2 only"))
    if problems:
        return None, problems
    # SimpleITK lists spacing as (x, y, z); its arrays are (z, y, x).
    spacing = tuple(reversed(images["reference"].GetSpacing()))
    pred = sitk.GetArrayFromImage(images["prediction"])
    ref = sitk.GetArrayFromImage(images["reference"])
    return kits_case_metrics(pred, ref, spacing, tolerance_mm), []


def evaluate_pairs(
    pairs: Sequence[tuple[str, Path, Path]],
    out_dir: Path,
    tolerance_mm: float = 2.0,
    stage: str = "evaluate",
) -> pd.DataFrame:
    """Compute :data:`~kitspipe.metrics.METRIC_NAMES` per case and write the tables.

    Writes ``out_dir/metrics_per_case.csv`` (one row per case, sorted by case id) and
    ``out_dir/summary.json`` (see :func:`summarize_metrics`), both atomically, and only if
    every case could be evaluated.

    Args:
        pairs: (case id, prediction path, reference path) per case.
        out_dir: folder for the tables; created if needed.
        tolerance_mm: tolerance of the surface Dice.
        stage: stage name used in error lines.

    Raises:
        KitspipeError: listing every problem found (unreadable or missing file, geometry
            mismatch, invalid labels, duplicate case id, no cases).
    """
    if not pairs:
        raise KitspipeError(Problem(stage, "-", out_dir, "no cases to evaluate"))
    problems = []
    seen = set()
    for case, pred_path, _ in pairs:
        if case in seen:
            problems.append(Problem(stage, case, pred_path, "case listed more than once"))
        seen.add(case)
    for case, pred_path, ref_path in pairs:
        problems += _header_problems(case, Path(pred_path), Path(ref_path), stage)
    if problems:
        raise KitspipeError(problems)

    rows = []
    for case, pred_path, ref_path in sorted(pairs, key=lambda pair: pair[0]):
        metrics, case_problems = _case_metrics(case, Path(pred_path), Path(ref_path), tolerance_mm, stage)
        problems += case_problems
        if metrics is not None:
            rows.append({"case": case, **metrics})
    if problems:
        raise KitspipeError(problems)

    table = pd.DataFrame(rows, columns=["case", *METRIC_NAMES])
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / PER_CASE_CSV, table.to_csv(index=False))
    atomic_write_json(out_dir / SUMMARY_JSON, summarize_metrics(table, tolerance_mm))
    logger.info("evaluated %d cases: mean composite Dice %.4f", len(table), table["composite_dice"].mean())
    return table


def _json_number(value: float) -> float | None:
    """JSON has no inf or NaN; they become null (``n_infinite`` says which it was)."""
    return float(value) if np.isfinite(value) else None


def summarize_metrics(table: pd.DataFrame, tolerance_mm: float) -> dict:
    """Mean, median, population std (ddof 0) and count of infinite values per metric.

    Statistics run over all cases: an infinite HD95 (one mask empty) makes the mean infinite,
    written as null, rather than being skipped.
    """
    metrics = {}
    for name in METRIC_NAMES:
        values = table[name].to_numpy(dtype=float)
        with np.errstate(invalid="ignore"):
            metrics[name] = {
                "mean": _json_number(np.mean(values)),
                "median": _json_number(np.median(values)),
                "std": _json_number(np.std(values)),
                "n_infinite": int(np.count_nonzero(np.isinf(values))),
            }
    return {"n_cases": int(len(table)), "surface_dice_tolerance_mm": float(tolerance_mm), "metrics": metrics}


def pair_predictions(
    pred_dir: Path,
    references: Mapping[str, Path],
    stage: str = "evaluate",
    allow_extra: bool = False,
) -> list[tuple[str, Path, Path]]:
    """Match ``pred_dir/<case>.nii.gz`` files to references by case id.

    Files not ending in ``.nii.gz``, hidden files and temporaries of interrupted writes are
    ignored. A missing prediction is an error; a prediction without a reference is an error
    too, or a logged warning with ``allow_extra=True``. A file name that is not a valid case
    id, or a prediction that is not a regular file (folder, dangling link), is an error.

    Args:
        pred_dir: folder of predicted label maps.
        references: case id -> reference label map path.
        stage: stage name used in error lines.
        allow_extra: accept predictions without a reference (they are then not evaluated).

    Returns:
        (case id, prediction path, reference path) for every reference, sorted by case id.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise KitspipeError(Problem(stage, "-", pred_dir, "prediction folder not found"))
    problems = []
    found: dict[str, Path] = {}
    for entry in sorted(pred_dir.iterdir()):
        name = entry.name
        if not name.endswith(PREDICTION_SUFFIX) or name.startswith((".", TEMP_PREFIX)):
            continue
        case = name[: -len(PREDICTION_SUFFIX)]
        if not CASE_ID_PATTERN.fullmatch(case):
            problem = "file name is not a valid case id"
            problems.append(Problem(stage, "-", entry, problem, repr(case), CASE_ID_PATTERN.pattern))
        elif not entry.is_file():
            problems.append(Problem(stage, case, entry, "prediction is not a regular file"))
        else:
            found[case] = entry
    for case in sorted(references):
        if case not in found:
            expected_path = pred_dir / f"{case}{PREDICTION_SUFFIX}"
            problems.append(Problem(stage, case, expected_path, "prediction missing"))
    for case in sorted(set(found) - set(references)):
        severity = "warning" if allow_extra else "error"
        problems.append(Problem(stage, case, found[case], "prediction has no reference", severity=severity))
    if any(problem.severity == "error" for problem in problems):
        raise KitspipeError(problems)
    for problem in problems:
        logger.warning(problem.line())
    return [(case, found[case], Path(references[case])) for case in sorted(references)]


def plot_per_case_dice(table: pd.DataFrame, png_path: Path) -> None:
    """Bar plot of kidney and tumour Dice per case, written atomically as a PNG.

    Uses matplotlib's Agg canvas directly, so no global backend is switched and no display
    is needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    missing = {"case", "kidney_dice", "tumour_dice"} - set(table.columns)
    if missing:
        raise ValueError(f"table lacks column(s) {sorted(missing)}")
    n = len(table)
    figure = Figure(figsize=(max(6.0, 0.3 * n + 2.0), 4.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = np.arange(n)
    width = 0.4
    for offset, region in ((-width / 2, "kidney"), (width / 2, "tumour")):
        values = table[f"{region}_dice"].to_numpy(dtype=float)
        axes.bar(positions + offset, values, width, label=f"{region} (mean {np.mean(values):.3f})")
    axes.set_xticks(positions, [str(case) for case in table["case"]], rotation=90, fontsize=7)
    axes.set_ylim(0.0, 1.05)
    axes.set_ylabel("Dice")
    axes.set_title(f"Per-case Dice, {n} cases")
    axes.legend(loc="lower right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(png_path, buffer.getvalue())
