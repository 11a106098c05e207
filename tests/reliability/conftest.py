"""Tiny synthetic NIfTI files (a few kB) for the input-file reliability tests.

Headers mimic KiTS19 where it matters: the data array is (slices, rows, cols), the affine
a signed permutation ``[[0, 0, -px, 0], [0, -px, 0, 0], [-slice, 0, 0, 0]]`` with zero
origin (axis codes I-P-L), images int16 with an sform only, labels uint8 with an sform
only or uint16 with a qform only.
"""

from __future__ import annotations

import gzip
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


KITS_PIXEL_MM = 0.78125
KITS_SLICE_MM = 3.0
SHAPE = (4, 8, 8)  # slices, rows, cols


def kits_affine(pixel_mm: float = KITS_PIXEL_MM, slice_mm: float = KITS_SLICE_MM,
                origin: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """The KiTS19 voxel-to-RAS affine: array axes (slices, rows, cols) run to I, P and L."""
    affine = np.array([[0, 0, -pixel_mm, 0], [0, -pixel_mm, 0, 0], [-slice_mm, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    affine[:3, 3] = origin
    return affine


def ct_data(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """int16 HU values from air (-1024) to bone, so no intensity warning fires."""
    return (np.arange(int(np.prod(shape))) % 1400 - 1024).astype(np.int16).reshape(shape)


def label_data(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Background with a small kidney (1) containing a tumour (2)."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[1:3, 2:6, 2:6] = 1
    labels[1:3, 3:5, 3:5] = 2
    return labels


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None, *, sform_code: int = 2,
                qform_code: int = 0, qform_affine: np.ndarray | None = None, slope: float | None = None,
                inter: float | None = None, version: int = 1) -> Path:
    """Write ``data`` with exactly the requested sform/qform codes and scaling.

    Args:
        path: the file to write (``.nii`` or ``.nii.gz``).
        data: the voxel array, in the dtype to store.
        affine: the sform (and, unless ``qform_affine`` is given, the qform); KiTS19 by default.
        sform_code: 0 leaves the sform unset.
        qform_code: 0 leaves the qform unset.
        qform_affine: a qform different from the sform.
        slope: ``scl_slope`` to store.
        inter: ``scl_inter`` to store.
        version: 2 writes NIfTI-2, whose pixdim and affines are float64.
    """
    affine = kits_affine() if affine is None else affine
    image_class = nib.Nifti2Image if version == 2 else nib.Nifti1Image
    image = image_class(data, affine)
    header = image.header
    header.set_qform(qform_affine if qform_affine is not None else affine, code=qform_code)
    header.set_sform(affine, code=sform_code)
    if qform_code == 0:
        header["qform_code"] = 0
    if sform_code == 0:
        header["sform_code"] = 0
    nib.save(image_class(np.asanyarray(data), None, header), path)
    # nibabel chooses its own scaling on save, so the requested one is patched in afterwards.
    scaling = {k: v for k, v in (("scl_slope", slope), ("scl_inter", inter)) if v is not None}
    if scaling:
        rewrite_header(path, **scaling)
    return path


def rewrite_header(path: Path, **fields) -> Path:
    """Overwrite raw NIfTI-1 header fields in place, bypassing nibabel's consistency fixes.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file written by ``write_nifti``.
        fields: header field names and their new values, e.g. ``pixdim=[...]``.
    """
    compressed = path.name.endswith(".gz")
    raw = gzip.decompress(path.read_bytes()) if compressed else path.read_bytes()
    header = nib.Nifti1Header(binaryblock=raw[:348], check=False)
    for name, value in fields.items():
        header[name] = value
    data = header.binaryblock + raw[348:]
    path.write_bytes(gzip.compress(data) if compressed else data)
    return path


class KitsFactory:
    """Build KiTS-layout datasets under one temporary root."""

    affine = staticmethod(kits_affine)
    ct = staticmethod(ct_data)
    labels = staticmethod(label_data)
    write = staticmethod(write_nifti)
    rewrite_header = staticmethod(rewrite_header)

    def __init__(self, root: Path):
        self.root = root

    def case(self, case_id: str = "case_00000", image: np.ndarray | None = None, label: np.ndarray | None = None,
             with_label: bool = True, image_kwargs: dict | None = None, label_kwargs: dict | None = None) -> Path:
        """Write ``<root>/<case_id>/imaging.nii.gz`` and, if wanted, ``segmentation.nii.gz``; return the folder."""
        folder = self.root / case_id
        folder.mkdir(parents=True, exist_ok=True)
        write_nifti(folder / "imaging.nii.gz", ct_data() if image is None else image, **(image_kwargs or {}))
        if with_label:
            write_nifti(folder / "segmentation.nii.gz", label_data() if label is None else label,
                        **(label_kwargs or {}))
        return folder


@pytest.fixture
def kits(tmp_path: Path) -> KitsFactory:
    return KitsFactory(tmp_path / "kits")



@pytest.fixture
def small_plans():
    """The cpu preset with a tiny depth-1 network (24 -> 20 voxels) on 1 mm / 4 mm grids: a plain
    ``UNet3D(1, 2, 4, 1)`` and the data loader fit it, and a few-centimetre volume needs several
    training-size tiles. Fast tiling, 8 M voxels a tile; intensity mean 50, std 100 HU."""
    from kitspipe.networks.sizes import output_size
    from kitspipe.plans import ResolutionPlan, load_preset

    base = load_preset("cpu")
    patch = ((24,) * 3, (output_size(24, 1),) * 3)
    return replace(base, high=ResolutionPlan((1.0,) * 3, 4, 1, *patch), low=ResolutionPlan((4.0,) * 3, 4, 1, *patch),
                   intensity=replace(base.intensity, mean=50.0, std=100.0), training=replace(base.training, batch_size=1),
                   inference=replace(base.inference, tile_mode="fast", max_tile_voxels=8_000_000))


@pytest.fixture
def one_torch_thread():
    """Tiny convolutions split over threads run many times slower on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
