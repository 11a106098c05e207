"""Synthetic abdominal CT in the KiTS19 layout: the built-in dataset of demos, tests and benchmarks.

``synthesize_dataset`` writes ``OUT/case_XXXXX/imaging.nii.gz`` (int16 HU) and
``segmentation.nii.gz`` (uint8: 0 background, 1 kidney, 2 tumour), with exactly the header
geometry of the KiTS19 files: the NIfTI array is (slices, rows, cols), the affine is
``[[0, 0, -px, 0], [0, -px, 0, 0], [-slice, 0, 0, 0], [0, 0, 0, 1]]`` (axis codes I-P-L) and
the origin is zero. Seen from SimpleITK (LPS), index axis 0 runs along the slices towards the
feet, so the direction matrix is ``[0, 0, 1, 0, 1, 0, -1, 0, 0]`` and the spacing is
``(slice, px, px)``.

A patient (:mod:`kitspipe.synthetic_anatomy`) is drawn from ``(seed, case_index)`` alone; the
scan of it also depends on the size preset:

* ``full``: 512 x 512 pixels of 0.6-1.0 mm, clinical slice thicknesses of 1.25-5 mm, and
  200-350 mm along the body axis (at most 160 slices) with the kidneys anywhere inside.
* ``small``: the *same physical anatomy* sampled coarsely, for tests and CPU demos:
  128 x 128 pixels of 2.4-3.2 mm, slices of 2.5-5 mm and 180-240 mm centred on the
  kidneys (36-96 slices).

The pixel size is never drawn so small that the body would leave the field of view. Every
case is independent of the others, so a dataset can be generated in pieces. The renal sinus
and pelvis inside the kidney outline are labelled kidney; the hilum notch is background.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from kitspipe.imageio import write_image_atomic
from kitspipe.synthetic_anatomy import (AIR_HU, KIDNEY, TUMOUR, TUMOUR_HU_RANGE, Anatomy,
                                        Ellipsoid, Kidney, Scan, Tumour, sample_anatomy,
                                        smooth_noise)

# SimpleITK direction (rows: LPS world axes, columns: index axes) of every KiTS19 file.
KITS_DIRECTION = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0)
# The aorta divides into the iliac arteries about two vertebrae below the kidneys.
AORTA_BIFURCATION_Z = -110.0
CSF_HU = 15.0


@dataclass(frozen=True)
class SizePreset:
    """How finely a patient is sampled; lengths in millimetres."""

    name: str
    code: int
    in_plane: int
    pixel_mm: tuple[float, float]
    slice_choices_mm: tuple[float, ...]
    coverage_mm: tuple[float, float]
    max_slices: int
    centred: bool


SIZE_PRESETS = {
    "small": SizePreset("small", code=0, in_plane=128, pixel_mm=(2.4, 3.2),
                        slice_choices_mm=(2.5, 3.0, 4.0, 5.0), coverage_mm=(180.0, 240.0),
                        max_slices=96, centred=True),
    "full": SizePreset("full", code=1, in_plane=512, pixel_mm=(0.6, 1.0),
                       slice_choices_mm=(1.25, 2.5, 3.0, 5.0), coverage_mm=(200.0, 350.0),
                       max_slices=160, centred=False),
}


def size_preset(size: str) -> SizePreset:
    """The preset called ``size``.

    Args:
        size: ``"small"`` or ``"full"``; anything else raises ``ValueError``.
    """
    if size not in SIZE_PRESETS:
        raise ValueError(f"unknown synthetic size {size!r}; choose one of {sorted(SIZE_PRESETS)}")
    return SIZE_PRESETS[size]


@dataclass(frozen=True)
class SyntheticCase:
    """The drawn patient and the scan of it, before any voxel is painted."""

    case_index: int
    seed: int
    size: str
    anatomy: Anatomy
    scan: Scan


def sample_case(case_index: int, seed: int, size: str = "small") -> SyntheticCase:
    """Draw the anatomy of case ``case_index`` and the scan geometry for ``size``.

    Args:
        case_index: non-negative case number.
        seed: non-negative dataset seed.
        size: ``"small"`` or ``"full"``.
    """
    preset = size_preset(size)
    if case_index < 0 or seed < 0:
        raise ValueError(f"case_index and seed must be non-negative, got {case_index} and {seed}")
    anatomy = sample_anatomy(np.random.default_rng([seed, case_index]))
    rng = np.random.default_rng([seed, case_index, preset.code, 1])

    widest = max(2 * anatomy.body_half_width, anatomy.body_front + anatomy.body_back) + 20.0
    pixel = rng.uniform(max(preset.pixel_mm[0], widest / preset.in_plane), preset.pixel_mm[1])
    field = preset.in_plane * pixel
    slack_x = max(0.0, (field - 2 * anatomy.body_half_width) / 2 - 5)
    slack_y = max(0.0, (field - anatomy.body_front - anatomy.body_back) / 2 - 5)
    x0 = -(preset.in_plane - 1) / 2 * pixel + rng.uniform(-1, 1) * min(10.0, slack_x)
    y0 = ((anatomy.body_back - anatomy.body_front) / 2 - (preset.in_plane - 1) / 2 * pixel
          + rng.uniform(-1, 1) * min(10.0, slack_y))

    thickness = float(rng.choice(preset.slice_choices_mm))
    low, high = anatomy.z_range_of_interest()
    coverage = max(rng.uniform(*preset.coverage_mm), high - low)
    slices = min(preset.max_slices, int(np.ceil(coverage / thickness)) + 1)
    length = (slices - 1) * thickness
    if preset.centred or low + length < high:
        z0 = (low + high) / 2 + length / 2
    else:
        z0 = rng.uniform(high, low + length)
    scan = Scan(shape=(slices, preset.in_plane, preset.in_plane), pixel_mm=float(pixel),
                slice_mm=thickness, origin=(float(x0), float(y0), float(z0)),
                noise_hu=rng.uniform(10, 20), blur_voxels=rng.uniform(0.5, 1.0))
    return SyntheticCase(case_index, seed, size, anatomy, scan)


def _paint_body(hu: np.ndarray, anatomy: Anatomy, scan: Scan,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Skin fat, muscle wall and bowel; returns the masks below the skin fat and the muscle."""
    _, x, y, z = scan.axes()
    p = anatomy.body_exponent
    # The superellipse level is homogeneous of degree p, so a body that swells and narrows
    # along z only rescales the threshold of one 2-D map per layer.
    limit = (1 + anatomy.body_wobble * np.sin(2 * np.pi * z / 250 + anatomy.body_wobble_phase)) ** p

    def inside(shrink: float) -> np.ndarray:
        depth = np.where(y < 0, y / (anatomy.body_front - shrink), y / (anatomy.body_back - shrink))
        return (np.abs(x / (anatomy.body_half_width - shrink)) ** p + np.abs(depth) ** p) <= limit

    under_skin, cavity = inside(anatomy.fat_mm), inside(anatomy.fat_mm + anatomy.muscle_mm)
    np.copyto(hu, np.float32(anatomy.hu["fat"]), where=inside(0.0))
    np.copyto(hu, np.float32(anatomy.hu["muscle"]), where=under_skin)
    tissue = smooth_noise(rng, scan.shape, scan.spacing, 15.0)
    bowel = np.float32(anatomy.hu["bowel"]) + np.float32(12.0) * tissue
    np.copyto(bowel, np.float32(anatomy.hu["fat"]), where=tissue < -1.1)  # mesenteric fat
    gas = smooth_noise(rng, scan.shape, scan.spacing, 10.0) > 1.9
    np.copyto(bowel, np.float32(AIR_HU + 50), where=gas)
    np.copyto(hu, bowel, where=cavity)
    return under_skin, cavity


def _paint_ellipsoid(hu: np.ndarray, scan: Scan, shape: Ellipsoid, value: float,
                     within: np.ndarray) -> None:
    window, x, y, z = scan.axes(shape.centre, shape.half_extent())
    hu[window][(shape.radius(x, y, z) <= 1) & within[window]] = value


def _spine_window(anatomy: Anatomy, scan: Scan):
    """Window around the spine and the great vessels in front of it, over all slices."""
    return scan.axes(np.array([0.0, anatomy.spine_y + 35, 0.0]), np.array([100.0, 60.0, 1e4]))


def _paint_back(hu: np.ndarray, anatomy: Anatomy, scan: Scan, under_skin: np.ndarray) -> None:
    """Psoas and back muscles, then vertebrae: bodies, discs and the arch round the canal."""
    w, d, sy = anatomy.vertebra_half_width, anatomy.vertebra_half_depth, anatomy.spine_y
    window, x, y, z = _spine_window(anatomy, scan)
    view, within = hu[window], under_skin[window]
    # The psoas muscles start near the upper kidney poles and thicken towards the pelvis.
    psoas_r = np.clip(6 + 0.1 * (60 - z), 0, 24) * (z < 60)
    safe_r = np.maximum(psoas_r, 1e-3)
    for side in (-1, 1):
        psoas = ((x - side * (w + 0.8 * psoas_r + 2)) / safe_r) ** 2 \
            + ((y - sy + 2) / (0.8 * safe_r)) ** 2 <= 1
        back_muscle = ((x - side * (w + 14)) / 26) ** 2 + ((y - sy - d - 30) / 22) ** 2 <= 1
        view[((psoas & (psoas_r > 0)) | back_muscle) & within] = anatomy.hu["muscle"]

    level = np.mod(z - anatomy.vertebra_phase, anatomy.vertebra_period)
    disc = level < 0.28 * anatomy.vertebra_period
    arch_level = (level > 0.4 * anatomy.vertebra_period) & (level < 0.9 * anatomy.vertebra_period)
    body = (x / w) ** 2 + ((y - sy) / d) ** 2
    canal = x**2 + (y - sy - d - 9) ** 2
    lamina = canal <= 15**2
    spinous = (x / 4) ** 2 + ((y - sy - d - 30) / 15) ** 2 <= 1
    transverse = (np.abs(x) < w + 22) & (np.abs(y - sy - d - 8) < 4)
    view[(body <= 1) & ~disc] = anatomy.hu["bone"]
    view[(body <= 1) & (body > (1 - 2.5 / d) ** 2) & ~disc] = anatomy.hu["cortical_bone"]
    view[(body <= 1) & disc] = anatomy.hu["disc"]
    view[(lamina | spinous | transverse) & (body > 1) & arch_level & within] = \
        0.8 * anatomy.hu["cortical_bone"]
    view[(canal <= 8**2) & arch_level] = CSF_HU


def _paint_vessels(hu: np.ndarray, anatomy: Anatomy, scan: Scan, under_skin: np.ndarray) -> None:
    """Contrast-filled aorta (splitting into the iliac arteries) and the vena cava."""
    window, x, y, z = _spine_window(anatomy, scan)
    view, within = hu[window], under_skin[window]
    ax, ay, ar = anatomy.aorta
    split = np.maximum(AORTA_BIFURCATION_Z - z, 0) * 0.4
    radius = np.where(z < AORTA_BIFURCATION_Z, 0.75 * ar, ar)
    aorta = np.minimum((x - ax - split) ** 2, (x - ax + split) ** 2) + (y - ay) ** 2 <= radius**2
    ix, iy, ir = anatomy.ivc
    view[(((x - ix) / ir) ** 2 + ((y - iy) / (0.7 * ir)) ** 2 <= 1) & within] = anatomy.hu["ivc"]
    view[aorta & within] = anatomy.hu["aorta"]


def _blob(u: np.ndarray, v: np.ndarray, w: np.ndarray, v_centre: float,
          semi_axes: np.ndarray) -> np.ndarray:
    """Inside an axis-aligned ellipsoid of a kidney's frame, centred on its v axis."""
    a = semi_axes
    return (u / a[0]) ** 2 + ((v - v_centre) / a[1]) ** 2 + (w / a[2]) ** 2 <= 1


def _kidney_mask(kidney: Kidney, scan: Scan):
    """Window, local coordinates and mask of the bean shape, with room for the fat around it."""
    shape = kidney.shape
    a = shape.semi_axes
    half = shape.half_extent() + kidney.bend * a[1] + kidney.fat_mm + 2 * max(scan.spacing)
    window, x, y, z = scan.axes(shape.centre, half)
    u, v, w = shape.local(x, y, z)
    # Bending v towards the hilum at the poles turns the ellipsoid into a bean.
    bent = v - kidney.bend * a[1] * (u / a[0]) ** 2
    mask = _blob(u, bent, w, 0.0, a) & ~_blob(u, v, w, a[1], a * (0.35, 0.5, 0.55))
    return window, (u, v, w, bent), mask


def _paint_kidney(hu: np.ndarray, label: np.ndarray, kidney: Kidney, anatomy: Anatomy,
                  scan: Scan, window, local, mask: np.ndarray) -> None:
    """Cortex, medullary pyramids, sinus fat and pelvis; all of it is labelled kidney."""
    u, v, w, bent = local
    a = kidney.shape.semi_axes
    depth = ndimage.distance_transform_edt(mask, sampling=scan.spacing)
    # Columns of Bertin: cortex reaching inwards between the medullary pyramids.
    angle = np.arctan2(u / a[0], bent / a[1])
    columns = np.cos(kidney.column_count * angle + kidney.column_phase) > 0.6
    cortex = (depth <= kidney.cortex_mm) | columns
    tissue = np.where(cortex, anatomy.hu["cortex"], anatomy.hu["medulla"]).astype(np.float32)
    tissue[_blob(u, v, w, 0.45 * a[1], a * (0.6, 0.45, 0.5))] = anatomy.hu["sinus"]
    tissue[_blob(u, v, w, 0.7 * a[1], a * (0.25, 0.25, 0.3))] = anatomy.hu["pelvis"]
    hu[window][mask] = tissue[mask]
    label[window][mask] = KIDNEY


def _paint_tumour(hu: np.ndarray, label: np.ndarray, tumour: Tumour, scan: Scan,
                  under_skin: np.ndarray, rng: np.random.Generator) -> None:
    """A lobulated mass with a smooth texture and, when large, a necrotic core."""
    shape = tumour.shape
    # Room for bumps of up to three standard deviations of the lobulation field.
    window, x, y, z = scan.axes(shape.centre, shape.half_extent() / (1 - 3 * tumour.lobulation))
    radius = shape.radius(x, y, z)
    if radius.size == 0:
        return
    bumps = smooth_noise(rng, radius.shape, scan.spacing, max(6.0, 0.6 * tumour.radius_mm))
    # A big exophytic mass pushes the abdominal wall aside rather than breaking through it.
    mask = (radius * (1 + tumour.lobulation * bumps) <= 1) & under_skin[window]
    texture = smooth_noise(rng, radius.shape, scan.spacing, 6.0)
    values = tumour.base_hu + tumour.texture_hu * texture
    if tumour.necrotic_core > 0:
        necrosis = np.clip((tumour.necrotic_core - radius) / 0.15 + 0.5, 0, 1)
        values = (1 - necrosis) * values + necrosis * tumour.necrosis_hu
    values = np.clip(values, *TUMOUR_HU_RANGE)
    hu[window][mask] = values[mask]
    label[window][mask] = TUMOUR


def _drop_specks(label: np.ndarray) -> None:
    """Unlabel stray fragments (a pole tip or tumour lobule caught by a single voxel).

    Annotators do not label isolated voxels, and a kidney with its tumours is one piece.
    """
    labelled = label > 0
    if not labelled.any():
        return
    # Only the box around the kidneys needs labelling; the rest of the volume is background.
    box = []
    for axis in range(3):
        hits = np.flatnonzero(labelled.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(hits[0], hits[-1] + 1))
    box = tuple(box)
    components, count = ndimage.label(labelled[box])
    if count <= 2:
        return
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    specks = np.flatnonzero(sizes < 0.02 * sizes.max())
    label[box][np.isin(components, specks)] = 0


def render(case: SyntheticCase, degrade: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Paint a drawn case: HU (int16) and label (uint8) arrays shaped (slices, rows, cols).

    Structures are painted from the outside in, each overwriting what lies beneath it, so no
    organ has to know its neighbours.

    Args:
        case: the drawn anatomy and scan.
        degrade: apply the scanner's blur and noise (to the image only); without them every
            tissue keeps its nominal intensity, which tests use as a ground truth.
    """
    anatomy, scan = case.anatomy, case.scan
    rng = np.random.default_rng([case.seed, case.case_index, size_preset(case.size).code, 2])
    hu = np.full(scan.shape, AIR_HU, dtype=np.float32)
    label = np.zeros(scan.shape, dtype=np.uint8)
    under_skin, cavity = _paint_body(hu, anatomy, scan, rng)
    _paint_ellipsoid(hu, scan, anatomy.liver, anatomy.hu["liver"], cavity)
    _paint_ellipsoid(hu, scan, anatomy.spleen, anatomy.hu["spleen"], cavity)
    kidneys = [_kidney_mask(kidney, scan) for kidney in anatomy.kidneys]
    for kidney, (window, _, mask) in zip(anatomy.kidneys, kidneys):
        # Perirenal fat first, so that the spine, psoas and vessels painted next stay whole.
        around = ndimage.distance_transform_edt(~mask, sampling=scan.spacing)
        perirenal = (around > 0) & (around <= kidney.fat_mm) & under_skin[window]
        hu[window][perirenal] = anatomy.hu["fat"]
    _paint_back(hu, anatomy, scan, under_skin)
    _paint_vessels(hu, anatomy, scan, under_skin)
    for kidney, (window, local, mask) in zip(anatomy.kidneys, kidneys):
        _paint_kidney(hu, label, kidney, anatomy, scan, window, local, mask)
    for tumour in anatomy.tumours:
        _paint_tumour(hu, label, tumour, scan, under_skin, rng)
    _drop_specks(label)
    if not degrade:
        return np.rint(hu).astype(np.int16), label

    sigma = (0.5, scan.blur_voxels, scan.blur_voxels)
    hu = ndimage.gaussian_filter(hu, sigma)
    hu += scan.noise_hu * rng.standard_normal(scan.shape, dtype=np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), label


def to_image(array: np.ndarray, scan: Scan) -> sitk.Image:
    """SimpleITK image with KiTS19 geometry.

    Args:
        array: voxel values shaped (slices, rows, cols), as nibabel shows a KiTS19 file.
        scan: the grid the array was painted on, for its spacing.
    """
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(scan.spacing)
    image.SetOrigin((0.0, 0.0, 0.0))
    image.SetDirection(KITS_DIRECTION)
    return image


def synthesize_case(case_index: int, seed: int,
                    size: str = "small") -> tuple[sitk.Image, sitk.Image]:
    """Image (int16 HU) and label (uint8) with KiTS19-like anatomy and geometry.

    Deterministic in ``(case_index, seed, size)``; ``small`` and ``full`` of the same
    ``(case_index, seed)`` show the same patient.

    Args:
        case_index: non-negative case number.
        seed: non-negative dataset seed.
        size: ``"small"`` (fast, coarse) or ``"full"`` (clinical resolution).
    """
    case = sample_case(case_index, seed, size)
    hu, label = render(case)
    return to_image(hu, case.scan), to_image(label, case.scan)


def synthesize_dataset(out_dir: str | Path, n_cases: int, seed: int = 0, size: str = "small",
                       first_index: int = 0, with_labels: bool = True,
                       progress: bool = True) -> list[str]:
    """Write ``out_dir/case_XXXXX/{imaging,segmentation}.nii.gz`` for a range of cases.

    Args:
        out_dir: dataset folder, created if missing; existing cases are overwritten.
        n_cases: how many cases to write.
        seed: dataset seed.
        size: ``"small"`` or ``"full"``.
        first_index: index of the first case; cases are numbered consecutively from it.
        with_labels: also write ``segmentation.nii.gz``.
        progress: show a progress bar (only when stdout is a terminal).

    Returns:
        The case ids written, such as ``case_00000``.
    """
    size_preset(size)
    if n_cases < 0 or first_index < 0:
        raise ValueError("n_cases and first_index must be non-negative, "
                         f"got {n_cases} and {first_index}")
    out_dir = Path(out_dir)
    indices = range(first_index, first_index + n_cases)
    case_ids = []
    for index in tqdm(indices, desc=f"synthesizing {size} cases", unit="case",
                      disable=not progress or not sys.stdout.isatty()):
        image, label = synthesize_case(index, seed, size)
        case_id = f"case_{index:05d}"
        folder = out_dir / case_id
        folder.mkdir(parents=True, exist_ok=True)
        write_image_atomic(image, folder / "imaging.nii.gz")
        if with_labels:
            write_image_atomic(label, folder / "segmentation.nii.gz")
        case_ids.append(case_id)
    return case_ids
