"""Reading and writing NIfTI volumes with their geometry kept.

SimpleITK does the reading (it applies ``scl_slope``/``scl_inter``, so intensities arrive
in true HU) and every image is brought into the canonical (z, y, x) frame described in
``kitspipe.geometry``. Writing goes the other way, onto the exact grid of a reference file.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from kitspipe import preflight
from kitspipe.atomic import disk_full_error, temporary_beside
from kitspipe.errors import KitspipeError, Problem
from kitspipe.geometry import CanonicalGeometry, Geometry, Reorientation, canonical_geometry, reorientation_for


@dataclass(frozen=True)
class Volume:
    """A volume in canonical (z, y, x) order together with the grid it came from."""

    array: np.ndarray
    grid: CanonicalGeometry
    source: Geometry
    reorientation: Reorientation


def read_header(path: str | Path, stage: str = "read", case: str = "-") -> tuple[Geometry, str, int]:
    """Geometry, pixel type and dimension from the header alone, without loading voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise KitspipeError(Problem(stage, case, path, "unreadable image header", _first_line(error), "NIfTI-1/2")) from None
    size = reader.GetSize()
    if len(size) != 3:
        return Geometry(tuple(size) + (1,) * max(0, 3 - len(size)), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                        (1, 0, 0, 0, 1, 0, 0, 0, 1)), sitk.GetPixelIDValueAsString(reader.GetPixelID()), len(size)
    geometry = Geometry(tuple(int(v) for v in size), tuple(float(v) for v in reader.GetSpacing()),
                        tuple(float(v) for v in reader.GetOrigin()), tuple(float(v) for v in reader.GetDirection()))
    return geometry, sitk.GetPixelIDValueAsString(reader.GetPixelID()), len(size)


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:160] if lines else type(error).__name__


def read_image(path: str | Path, stage: str = "read", case: str = "-") -> sitk.Image:
    """Read an image fully (decompressing all of it, so a truncated file fails here)."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise KitspipeError(Problem(stage, case, path, "unreadable image", _first_line(error), "NIfTI-1/2")) from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        # A trailing singleton time axis is a common export artefact; dropping it loses nothing.
        image = image[:, :, :, 0]
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise KitspipeError(Problem(stage, case, path, "not a single 3-D volume",
                                    f"{image.GetDimension()}-D size {image.GetSize()}", "3-D"))
    return image


def to_canonical(image: sitk.Image, dtype: np.dtype | None = None) -> Volume:
    """Turn a SimpleITK image into a canonical (z, y, x) ``Volume``."""
    source = Geometry.of(image)
    reorientation = reorientation_for(source)
    array = sitk.GetArrayFromImage(image)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return Volume(reorientation.to_canonical(array), canonical_geometry(source, reorientation), source, reorientation)


def read_volume(path: str | Path, dtype: np.dtype | None = None, stage: str = "read", case: str = "-") -> Volume:
    return to_canonical(read_image(path, stage=stage, case=case), dtype=dtype)


def array_to_source_image(canonical_array: np.ndarray, source: Geometry, reorientation: Reorientation) -> sitk.Image:
    """Put a canonical array back on the exact grid (size, spacing, origin, direction) of its source file."""
    array = reorientation.from_canonical(canonical_array)
    image = sitk.GetImageFromArray(array)
    return source.apply_to(image)


def write_image_atomic(image: sitk.Image, path: str | Path, compress: bool = True) -> None:
    """Write a NIfTI via a temporary file in the same folder, renamed into place only when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    # Uncompressed voxels plus the header: what a full disk is reported to need.
    bound = preflight.NIFTI_HEADER_BYTES + image.GetNumberOfPixels() * image.GetSizeOfPixelComponent() * \
        image.GetNumberOfComponentsPerPixel()
    with temporary_beside(path, suffix) as (fd, tmp_name):
        os.close(fd)
        try:
            sitk.WriteImage(image, str(tmp_name), useCompression=compress)
            with open(tmp_name, "rb") as handle:
                os.fsync(handle.fileno())
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, path)
        except BaseException as error:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)  # before the free space is measured
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full_error(path, bound, upper_bound=True) from None
            # SimpleITK reports a failed write as a RuntimeError without errno; too little free
            # space for the uncompressed volume is then the likely cause, and is what to report.
            free = preflight.free_bytes(path.parent) if isinstance(error, RuntimeError) else None
            if free is not None and free < bound:
                raise disk_full_error(path, bound, upper_bound=True) from None
            raise
