"""Overlay montages: axial, coronal and sagittal CT slices through a kidney with the reference
contours in green and the predicted contours in magenta (solid: kidney including tumour,
dashed: tumour), each panel at its physical aspect ratio."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from kitspipe.atomic import atomic_write_bytes
from kitspipe.labels import TUMOUR

WINDOW_HU = (-200.0, 300.0)
REFERENCE_COLOUR = "#00e000"
PREDICTION_COLOUR = "#ff00ff"
MARGIN_MM = 30.0
PANEL_HEIGHT_INCHES = 3.6



def _kidney_point(labels: np.ndarray | None, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Centroid of one kidney: the one holding most tumour, else the largest.

    One kidney rather than both, because the centroid of both lies on the spine and a
    sagittal slice there would show neither. Without any foreground, the volume centre.
    """
    from scipy import ndimage

    if labels is None or not (labels > 0).any():
        return tuple(n // 2 for n in shape)
    box = _bounding_box([labels], (1.0, 1.0, 1.0), shape, margin_mm=0.0)
    crop = labels[box]
    components, count = ndimage.label(crop > 0)
    index = np.arange(1, count + 1)
    tumour = ndimage.sum(crop == TUMOUR, components, index)
    size = ndimage.sum(crop > 0, components, index)
    best = index[np.lexsort((size, tumour))[-1]]
    centre = ndimage.center_of_mass(components == best)
    return tuple(int(round(c)) + s.start for c, s in zip(centre, box))


def _bounding_box(masks: list[np.ndarray], spacing, shape, margin_mm: float = MARGIN_MM) -> tuple[slice, ...]:
    """Box around the foreground of all masks plus a margin; the whole volume if there is none."""
    foreground = np.zeros(shape, dtype=bool)
    for mask in masks:
        foreground |= mask > 0
    if not foreground.any():
        return tuple(slice(0, n) for n in shape)
    box = []
    for axis in range(3):
        present = np.flatnonzero(foreground.any(axis=tuple(a for a in range(3) if a != axis)))
        margin = int(np.ceil(margin_mm / spacing[axis]))
        box.append(slice(max(0, present[0] - margin), min(shape[axis], present[-1] + 1 + margin)))
    return tuple(box)


def _sections(volume: np.ndarray, point: tuple[int, int, int], box: tuple[slice, ...]) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices in radiological display order.

    Canonical arrays run towards superior (z), posterior (y) and the patient's left (x), so an
    axial slice already shows anterior at the top and the patient's left on the right; the
    coronal and sagittal slices are flipped vertically to put superior at the top.
    """
    z, y, x = point
    bz, by, bx = box
    return [volume[z, by, bx], volume[bz, y, bx][::-1], volume[bz, by, x][::-1]]


def _draw_contours(ax, labels: np.ndarray | None, colour: str, width: float) -> None:
    if labels is None:
        return
    for mask, style in ((labels > 0, "solid"), (labels == TUMOUR, "dashed")):
        # A mask that is empty (or full) in this slice has no boundary to draw.
        if 0 < np.count_nonzero(mask) < mask.size:
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linestyles=style, linewidths=width)


def overlay_montage(image: np.ndarray, reference: np.ndarray | None, prediction: np.ndarray,
                    spacing: tuple[float, float, float], path: str | Path, title: str) -> None:
    """Write a PNG of axial, coronal and sagittal slices with reference and predicted contours.

    The slices pass through the centroid of one reference kidney (of the prediction when the
    reference is empty or missing), the view is cropped to the foreground plus a 30 mm margin,
    and every panel keeps the physical aspect ratio of its voxels.

    Args:
        image: CT in HU, canonical (z, y, x) array; shown in the window [-200, 300] HU.
        reference: reference label map on the same grid, or None for a case without one.
        prediction: predicted label map on the same grid.
        spacing: voxel size in mm, (z, y, x).
        path: the PNG file to write.
        title: text above the panels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    for name, labels in (("reference", reference), ("prediction", prediction)):
        if labels is not None and labels.shape != image.shape:
            raise ValueError(f"{name} shape {labels.shape} differs from image shape {image.shape}")
    has_reference = reference is not None and bool((reference > 0).any())
    point = _kidney_point(reference if has_reference else prediction, image.shape)
    box = _bounding_box([m for m in (reference, prediction) if m is not None], spacing, image.shape)
    # Each panel's (row, column) voxel size: axial (y, x), coronal (z, x), sagittal (z, y).
    pixel = [(spacing[1], spacing[2]), (spacing[0], spacing[2]), (spacing[0], spacing[1])]
    images = _sections(image, point, box)
    widths = [a.shape[1] * col / (a.shape[0] * row) for a, (row, col) in zip(images, pixel)]

    figure = Figure(figsize=(PANEL_HEIGHT_INCHES * sum(widths) + 0.4, PANEL_HEIGHT_INCHES + 1.1))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3, gridspec_kw={"width_ratios": widths})
    references = _sections(reference, point, box) if reference is not None else [None] * 3
    predictions = _sections(prediction, point, box)
    names = (f"axial z={point[0]}", f"coronal y={point[1]}", f"sagittal x={point[2]}")
    # Orientation letters at the top and left edge of each panel.
    edges = (("A", "R"), ("S", "R"), ("S", "A"))
    for k, ax in enumerate(axes):
        row, col = pixel[k]
        ax.imshow(images[k], cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=row / col,
                  interpolation="nearest")
        # The reference is drawn wider and underneath, so it still shows where the contours coincide.
        _draw_contours(ax, references[k], REFERENCE_COLOUR, 2.4)
        _draw_contours(ax, predictions[k], PREDICTION_COLOUR, 1.2)
        ax.set_title(names[k], fontsize=9)
        ax.set_axis_off()
        for text, xy, align in ((edges[k][0], (0.5, 0.98), ("center", "top")),
                                (edges[k][1], (0.02, 0.5), ("left", "center"))):
            ax.text(*xy, text, transform=ax.transAxes, color="yellow", fontsize=8, ha=align[0], va=align[1],
                    bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "linewidth": 0})
    handles = [Line2D([], [], color=PREDICTION_COLOUR, ls="-", lw=1.2, label="prediction: kidney + tumour"),
               Line2D([], [], color=PREDICTION_COLOUR, ls="--", lw=1.2, label="prediction: tumour")]
    if reference is not None:
        handles = [Line2D([], [], color=REFERENCE_COLOUR, ls="-", lw=2.4, label="reference: kidney + tumour"),
                   Line2D([], [], color=REFERENCE_COLOUR, ls="--", lw=2.4, label="reference: tumour")] + handles
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    figure.suptitle(title if reference is not None else f"{title} (no reference)", fontsize=10)
    figure.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.1, wspace=0.04)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------- finding inputs

