"""The static HTML report: every picture it shows exists, with relative links only."""

from __future__ import annotations

import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from kitspipe.cli import main
from kitspipe.evaluation import evaluate_pairs
from kitspipe.fingerprint import run_fingerprint
from kitspipe.report import build_report, overlay_montage
from kitspipe.synthetic import synthesize_dataset


class _Page(HTMLParser):
    """Collects image sources, tables and table headers of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.tables = 0
        self.headers: list[str] = []
        self._in_header = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"])
        self.tables += tag == "table"
        self._in_header = tag == "th"

    def handle_endtag(self, tag: str) -> None:
        self._in_header = False

    def handle_data(self, data: str) -> None:
        if self._in_header:
            self.headers.append(data.strip())


def _parse(index: Path) -> _Page:
    page = _Page()
    page.feed(index.read_text(encoding="utf-8"))
    return page


def _eroded_copy(label_path: Path, out: Path) -> None:
    """A prediction that is the reference shrunk by one voxel, so the metrics are not all perfect."""
    image = sitk.ReadImage(str(label_path))
    labels = sitk.GetArrayFromImage(image)
    eroded = np.where(ndimage.binary_erosion(labels > 0), labels, 0).astype(labels.dtype)
    prediction = sitk.GetImageFromArray(eroded)
    prediction.CopyInformation(image)
    sitk.WriteImage(prediction, str(out))


def _check_page(index: Path, cases: list[str]) -> _Page:
    page = _parse(index)
    report = index.parent
    for src in page.sources:
        assert not src.startswith(("/", "file:", "http:", "https:")) and not Path(src).is_absolute(), src
        assert (report / src).is_file(), src
    overlays = sorted(s for s in page.sources if s.startswith("overlays/"))
    assert overlays == [f"overlays/{case}.png" for case in cases]
    assert "kidney_dice" in page.headers and "composite_dice" in page.headers
    assert "fingerprint.png" in page.sources
    text = index.read_text(encoding="utf-8")
    assert "<script" not in text and "<link" not in text
    return page


def test_report_from_demo_like_work_folder(tmp_path: Path) -> None:
    data, work = tmp_path / "data", tmp_path / "work"
    cases = synthesize_dataset(data, 2, seed=0, size="small", progress=False)
    run_fingerprint(data, work, progress=False)
    predictions = work / "predictions"
    predictions.mkdir()
    shutil.copy(data / cases[0] / "segmentation.nii.gz", predictions / f"{cases[0]}.nii.gz")
    _eroded_copy(data / cases[1] / "segmentation.nii.gz", predictions / f"{cases[1]}.nii.gz")
    pairs = [(c, predictions / f"{c}.nii.gz", data / c / "segmentation.nii.gz") for c in cases]
    evaluate_pairs(pairs, work / "evaluation")

    # Everything discovered: predictions in WORK/predictions, images from the fingerprinted dataset.
    index = build_report(work)
    assert index == work / "report" / "index.html"
    page = _check_page(index, cases)
    assert page.tables >= 2  # the summary and the per-case table
    assert str(tmp_path) not in "".join(page.sources)

    # The CLI with explicit sources rebuilds the same page and records where the cases came from.
    (work / "report" / "overlays" / "case_99999.png").write_bytes(b"stale")
    assert main(["--no-progress", "report", str(work), "--data", str(data), "--predictions", str(predictions)]) == 0
    _check_page(index, cases)
    assert not (work / "report" / "overlays" / "case_99999.png").exists()
    assert (work / "report_sources.json").is_file()


def test_overlay_montage_without_reference_and_anisotropic_voxels(tmp_path: Path) -> None:
    image = np.full((10, 40, 30), -100.0, dtype=np.float32)
    prediction = np.zeros(image.shape, dtype=np.uint8)
    prediction[3:7, 10:20, 5:12] = 1
    prediction[4:6, 12:15, 6:9] = 2
    path = tmp_path / "montage.png"
    overlay_montage(image, None, prediction, (5.0, 1.0, 1.0), path, "case_x")
    assert path.read_bytes().startswith(b"\x89PNG")
    # Coronal and sagittal panels span z at 5 mm a slice; an empty prediction still draws.
    overlay_montage(image, prediction, np.zeros_like(prediction), (5.0, 1.0, 1.0), path, "case_y")
    assert path.stat().st_size > 0
