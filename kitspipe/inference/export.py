"""From probabilities on the plan's grid back to a label file on the input's own grid."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from kitspipe.atomic import atomic_write_bytes
from kitspipe.geometry import CanonicalGeometry
from kitspipe.imageio import Volume, array_to_source_image, write_image_atomic
from kitspipe.postprocessing import PostprocessingSettings, postprocess
from kitspipe.resampling import Box, resample, sub_grid


def to_source_grid(channels: np.ndarray, grid: CanonicalGeometry, image: Volume, crop: Box) -> np.ndarray:
    """Linear resampling of (C, z, y, x) probabilities onto the canonical source grid.

    Only the cropped body box is resampled; everything outside it is background (0).
    """
    target = sub_grid(image.grid, crop)
    out = np.zeros((channels.shape[0],) + tuple(image.grid.shape), dtype=np.float32)
    for index, channel in enumerate(channels):
        out[(index,) + crop.slices()] = resample(channel, grid, target, "linear", default=0.0)
    return out


def labels_from_probabilities(regions: np.ndarray, low: np.ndarray | None, spacing, settings: PostprocessingSettings) -> np.ndarray:
    if low is None and settings.low_resolution_mask:
        settings = PostprocessingSettings(**{**settings.to_dict(), "low_resolution_mask": False})
    return postprocess(regions, spacing, settings, low)


def write_prediction(labels: np.ndarray, image: Volume, path: Path) -> None:
    """Write canonical labels as uint8 NIfTI with exactly the input's size, spacing, origin, direction."""
    import SimpleITK as sitk

    label_image = array_to_source_image(labels.astype(np.uint8), image.source, image.reorientation)
    write_image_atomic(sitk.Cast(label_image, sitk.sitkUInt8), path)


def write_probabilities(regions: np.ndarray, low: np.ndarray | None, path: Path) -> None:
    """Probabilities as float16 ``.npz`` in canonical (z, y, x) order (documented in docs/inference.md)."""
    buffer = io.BytesIO()
    arrays = {"regions": regions.astype(np.float16)}
    if low is not None:
        arrays["low_resolution"] = low.astype(np.float16)
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
