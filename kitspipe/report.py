"""``kitspipe report``: one static HTML page that summarises a work folder.

``WORK/report/index.html`` shows whichever of these artefacts exist:

1. the dataset fingerprint (histograms and the text table);
2. the key fields of ``WORK/plans.json``;
3. the training curves of every ``WORK/fold_*/<Trainer>/`` and the last row of its log;
4. the per-case metric tables of ``WORK/evaluation/`` and ``WORK/cv/<Trainer>/``;
5. one overlay montage per predicted case: axial, coronal and sagittal CT slices through a
   kidney, with reference contours in green and predicted contours in magenta (solid:
   kidney including tumour, dashed: tumour).

Every picture is written into ``WORK/report/`` and referenced by a relative path, so the
folder can be copied or zipped and opened from a file browser; the page loads nothing from
anywhere else. Everything is written atomically, like every other kitspipe artefact.

Where the predicted cases come from: the arguments of ``build_report``; else
``WORK/report_sources.json``, which the last call given them wrote so that a plain
``kitspipe report WORK`` shows the same cases again; else ``WORK/predictions/`` (or the
cross-validation predictions) matched by case id against the fingerprinted dataset.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pandas as pd

from kitspipe import __version__
from kitspipe.atomic import TEMP_PREFIX, atomic_write_bytes, atomic_write_json, atomic_write_text
from kitspipe.errors import KitspipeError, Problem
from kitspipe.evaluation import PER_CASE_CSV, SUMMARY_JSON
from kitspipe.overlays import overlay_montage, WINDOW_HU

log = logging.getLogger(__name__)

REPORT_DIR = "report"
SOURCES_JSON = "report_sources.json"

# (case id, CT image, reference label map or None, predicted label map)
Case = tuple[str, Path, Path | None, Path]


def _resolve_sources(work: Path, given: dict[str, Path | None]) -> dict[str, Path | None]:
    """Merge explicit sources with the recorded ones; record the merge when anything was given."""
    record = work / SOURCES_JSON
    recorded: dict = {}
    if record.is_file():
        try:
            recorded = json.loads(record.read_text(encoding="utf-8"))
        except ValueError as error:
            log.warning("report: ignoring unreadable %s (%s)", record, error)
    sources = {key: Path(value) if value is not None else
               (work / recorded[key] if isinstance(recorded.get(key), str) else None)
               for key, value in given.items()}
    if any(value is not None for value in given.values()):
        # Stored relative to WORK, so a demo folder moved as a whole keeps its report sources.
        atomic_write_json(record, {key: os.path.relpath(path.resolve(), work.resolve())
                                   for key, path in sources.items() if path is not None})
    return sources


def discover_cases(work: Path, data: Path | None = None, predictions: Path | None = None) -> list[Case]:
    """Pair predicted label maps with the images and reference labels of the same case ids.

    Args:
        work: the work folder.
        data: dataset holding the predicted cases (default: the fingerprinted dataset).
        predictions: folder of ``<case>.nii.gz`` (default: ``WORK/predictions``, else the
            cross-validation predictions ``WORK/cv/*/fold_*/predictions``).

    Returns:
        (case id, image, reference or None, prediction) per case, sorted by case id; cases
        whose image cannot be found are logged and left out.
    """
    from kitspipe.dataset import discover
    from kitspipe.fingerprint import load_fingerprint

    if predictions is not None:
        folders = [Path(predictions)]
    elif (work / "predictions").is_dir():
        folders = [work / "predictions"]
    else:
        folders = sorted(work.glob("cv/*/fold_*/predictions"))
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(folder.glob("*.nii.gz")):
            if not path.name.startswith((".", TEMP_PREFIX)):
                found.setdefault(path.name[: -len(".nii.gz")], path)
    if not found:
        return []
    try:
        root = Path(data) if data is not None else Path(load_fingerprint(work)["dataset_root"])
        by_id = discover(root, stage="report").by_id()
    except KitspipeError as error:
        log.warning("report: no overlays, the images of the predicted cases were not found:\n%s", error)
        return []
    missing = sorted(set(found) - set(by_id))
    if missing:
        log.warning("report: %d predicted case(s) are not in %s and get no overlay: %s", len(missing), root,
                    ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    return [(case, by_id[case].image, by_id[case].label, found[case]) for case in sorted(found) if case in by_id]


def _evaluation_folders(work: Path, evaluation: Path | None) -> list[Path]:
    candidates = ([Path(evaluation)] if evaluation is not None else []) + [work / "evaluation"]
    candidates += sorted(p.parent for p in work.glob(f"cv/*/{PER_CASE_CSV}"))
    folders: list[Path] = []
    for folder in candidates:
        if (folder / PER_CASE_CSV).is_file() and folder.resolve() not in [f.resolve() for f in folders]:
            folders.append(folder)
    return folders


# --------------------------------------------------------------------------- sections

def _img(out: Path, png: Path, alt: str) -> str:
    return f'<img src="{quote(png.relative_to(out).as_posix())}" alt="{html.escape(alt)}">'


def _table(frame: pd.DataFrame) -> str:
    # Wrapped so that a table with many metric columns scrolls by itself, not the whole page.
    table = frame.to_html(index=False, escape=True, border=0, na_rep="–", classes="data",
                          float_format=lambda v: f"{v:.4f}")
    return f'<div class="scroll">{table}</div>'


def _fingerprint_section(work: Path, out: Path) -> str:
    from kitspipe.fingerprint import load_fingerprint
    from kitspipe.fingerprint_report import fingerprint_text, plot_fingerprint

    if not (work / "fingerprint.json").is_file():
        return ""
    try:
        fingerprint = load_fingerprint(work)
    except KitspipeError as error:
        log.warning("report: fingerprint section left out: %s", error)
        return ""
    plot_fingerprint(fingerprint, out / "fingerprint.png")
    return (f'<h2 id="fingerprint">Dataset fingerprint</h2>\n{_img(out, out / "fingerprint.png", "fingerprint")}\n'
            f"<pre>{html.escape(fingerprint_text(fingerprint))}</pre>")


def _field(plans: dict, dotted: str) -> str:
    value = plans
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, list):
        return " × ".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in value)
    return "–" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


PLAN_ROWS = (("preset", "preset"), ("description", "description"),
             ("high-res spacing (mm, z y x)", "high.spacing_mm"), ("high-res input patch", "high.input_patch"),
             ("high-res output patch", "high.output_patch"), ("low-res spacing (mm, z y x)", "low.spacing_mm"),
             ("low-res input patch", "low.input_patch"), ("low-res output patch", "low.output_patch"),
             ("HU clip", "intensity.clip_hu"), ("trainer", "training.trainer"),
             ("max epochs", "training.max_epochs"), ("steps per epoch", "training.steps_per_epoch"),
             ("time budget (min)", "training.max_minutes"), ("folds", "training.n_folds"),
             ("tiling", "inference.tile_mode"))


def _plans_section(work: Path) -> str:
    path = work / "plans.json"
    if not path.is_file():
        return ""
    try:
        plans = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        log.warning("report: plans section left out, %s is unreadable (%s)", path, error)
        return ""
    rows = pd.DataFrame([(name, _field(plans, dotted)) for name, dotted in PLAN_ROWS], columns=["field", "value"])
    return f'<h2 id="plans">Plans</h2>\n{_table(rows)}'


def _training_section(work: Path, out: Path) -> str:
    parts = []
    for folder in sorted(p for p in work.glob("fold_*/*") if p.is_dir()):
        png, csv = folder / "progress.png", folder / "training_log.csv"
        if not (png.is_file() or csv.is_file()):
            continue
        name = f"{folder.parent.name} / {folder.name}"
        parts.append(f"<h3>{html.escape(name)}</h3>")
        if png.is_file():
            copy = out / "training" / f"{folder.parent.name}_{folder.name}.png"
            atomic_write_bytes(copy, png.read_bytes())
            parts.append(_img(out, copy, f"training curves {name}"))
        if csv.is_file():
            try:
                last = pd.read_csv(csv).tail(1)
            except (pd.errors.EmptyDataError, pd.errors.ParserError) as error:
                log.warning("report: %s unreadable (%s)", csv, error)
                continue
            parts.append(f"<p>last epoch of {html.escape(csv.name)}:</p>\n{_table(last)}")
    return '<h2 id="training">Training</h2>\n' + "\n".join(parts) if parts else ""


def _evaluation_section(work: Path, out: Path, folder: Path, table: pd.DataFrame, number: int) -> str:
    try:
        name = folder.resolve().relative_to(work.resolve()).as_posix()
    except ValueError:
        name = folder.name
    parts = [f'<h2 id="evaluation-{number}">Metrics: {html.escape(name)}</h2>']
    summary_path = folder / SUMMARY_JSON
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        rows = [{"metric": metric, **values} for metric, values in summary.get("metrics", {}).items()]
        frame = pd.DataFrame(rows, columns=["metric", "mean", "median", "std", "n_infinite"])
        parts.append(f"<p>{summary.get('n_cases', '?')} cases; surface Dice tolerance "
                     f"{summary.get('surface_dice_tolerance_mm', '?')} mm.</p>\n{_table(frame)}")
    if (folder / "per_case_dice.png").is_file():
        copy = out / "evaluation" / f"per_case_dice_{number}.png"
        atomic_write_bytes(copy, (folder / "per_case_dice.png").read_bytes())
        parts.append(_img(out, copy, "per-case Dice"))
    parts.append(f"<h3>Per case</h3>\n{_table(table)}")
    return "\n".join(parts)


def _is_fresh(png: Path, inputs: list[Path]) -> bool:
    """An overlay newer than its inputs is kept: decompressing full-size CT takes seconds a case."""
    return png.is_file() and all(png.stat().st_mtime >= p.stat().st_mtime for p in inputs)


def _overlay_section(out: Path, cases: list[Case], tables: list[tuple[Path, pd.DataFrame]]) -> str:
    from kitspipe.imageio import read_volume

    figures = []
    for case, image_path, reference_path, prediction_path in cases:
        png = out / "overlays" / f"{case}.png"
        rows = [(folder, t[t["case"] == case].iloc[0]) for folder, t in tables if (t["case"] == case).any()]
        title = case
        if rows:
            row = rows[0][1]
            title += f": kidney Dice {row['kidney_dice']:.3f}, tumour Dice {row['tumour_dice']:.3f}"
        inputs = [p for p in (image_path, reference_path, prediction_path) if p is not None]
        inputs += [folder / PER_CASE_CSV for folder, _ in rows[:1]]
        if not _is_fresh(png, inputs):
            image = read_volume(image_path, dtype=np.float32, stage="report", case=case)
            reference = (read_volume(reference_path, stage="report", case=case).array
                         if reference_path is not None else None)
            prediction = read_volume(prediction_path, stage="report", case=case).array
            try:
                overlay_montage(image.array, reference, prediction, image.grid.spacing, png, title)
            except ValueError as error:
                log.warning("report: no overlay for %s: %s", case, error)
                continue
        # The title with the Dice values is part of the picture, so the figure needs no caption.
        figures.append(f'<figure id="overlay-{html.escape(case)}">{_img(out, png, title)}</figure>')
    if not figures:
        return ""
    legend = ("reference green, prediction magenta; solid: kidney including tumour, dashed: tumour; "
              f"CT window [{WINDOW_HU[0]:g}, {WINDOW_HU[1]:g}] HU")
    return f'<h2 id="overlays">Overlays</h2>\n<p>{legend}</p>\n' + "\n".join(figures)


# --------------------------------------------------------------------------- the page

STYLE = """body{font-family:sans-serif;max-width:1250px;margin:1em auto;padding:0 1em;color:#222}
h2{border-bottom:1px solid #ccc;margin-top:1.6em}img{max-width:100%;height:auto}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:12px}
table.data{border-collapse:collapse;font-size:13px;margin:.4em 0}
table.data th,table.data td{border:1px solid #ddd;padding:2px 6px;text-align:left;max-width:50em}
.scroll{overflow-x:auto}table.data td{font-variant-numeric:tabular-nums}
figure{margin:1em 0}nav a{margin-right:1em}"""


def _page(work: Path, sections: list[str]) -> str:
    links = [(m.group(1), re.sub("<[^>]+>", "", m.group(2))) for s in sections
             for m in [re.search(r'<h2 id="([^"]+)">(.*?)</h2>', s)] if m]
    nav = " ".join(f'<a href="#{anchor}">{text}</a>' for anchor, text in links)
    body = "\n".join(sections) if sections else "<p>No artefacts found in this work folder yet.</p>"
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>kitspipe report: {html.escape(work.name)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<h1>kitspipe report</h1>\n<p>work folder {html.escape(str(work))}, kitspipe {__version__}</p>\n"
            f"<nav>{nav}</nav>\n{body}\n</body>\n</html>\n")


def _remove_unreferenced_pictures(out: Path, page: str) -> None:
    """Drop PNGs of earlier builds (cases or folds no longer present) that the page no longer shows."""
    keep = {(out / unquote(src)).resolve() for src in re.findall(r'src="([^"]+)"', page)}
    for png in out.rglob("*.png"):
        if png.resolve() not in keep:
            png.unlink()


def build_report(work: str | Path, data: str | Path | None = None, predictions: str | Path | None = None,
                 evaluation: str | Path | None = None, cases: list[Case] | None = None) -> Path:
    """(Re)build ``WORK/report/index.html`` and the pictures it shows.

    Args:
        work: the work folder.
        data: dataset holding the images and reference labels of the predicted cases
            (default: recorded in ``WORK/report_sources.json``, else the fingerprinted dataset).
        predictions: folder of predicted ``<case>.nii.gz`` (default: recorded, else
            ``WORK/predictions`` or the cross-validation predictions).
        evaluation: folder with ``metrics_per_case.csv`` and ``summary.json``; shown in
            addition to ``WORK/evaluation`` and ``WORK/cv/*`` when those exist.
        cases: explicit (case id, image, reference or None, prediction) list for the
            overlays, instead of discovering them from ``data`` and ``predictions``.

    Returns:
        The path of ``index.html``.
    """
    work = Path(work)
    if not work.is_dir():
        raise KitspipeError(Problem("report", "-", work, "work folder does not exist"))
    out = work / REPORT_DIR
    given = {"data": data, "predictions": predictions, "evaluation": evaluation}
    sources = _resolve_sources(work, {k: Path(v) if v is not None else None for k, v in given.items()})
    folders = _evaluation_folders(work, sources["evaluation"])
    tables = [(folder, pd.read_csv(folder / PER_CASE_CSV, dtype={"case": str})) for folder in folders]
    if cases is None:
        cases = discover_cases(work, sources["data"], sources["predictions"])
    sections = [_fingerprint_section(work, out), _plans_section(work), _training_section(work, out)]
    sections += [_evaluation_section(work, out, folder, table, k) for k, (folder, table) in enumerate(tables)]
    sections.append(_overlay_section(out, cases, tables))
    page = _page(work, [s for s in sections if s])
    _remove_unreferenced_pictures(out, page)
    atomic_write_text(out / "index.html", page)
    log.info("report: %d evaluation table(s), %d overlay(s)", len(folders), len(cases))
    return out / "index.html"
