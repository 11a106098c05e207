"""Reliability checklist 5.1: every bad input file is refused with one precise line.

Test names carry the checklist item number (``test_item_NN_<what>``) so the docs table
can point at them. Each test writes a few-kB synthetic NIfTI under ``tmp_path``.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from kitspipe import validation
from kitspipe.dataset import CaseFiles, discover
from kitspipe.errors import KitspipeError, Problem
from kitspipe.imageio import read_volume
from kitspipe.nifti_header import available_memory_bytes
from kitspipe.validation import CaseReport, check_case, check_dataset, check_predictions

NIFTI_EXPECTED = "sizeof_hdr 348 with magic n+1, or 540 with n+2"


def run_case(folder: Path) -> tuple[CaseReport, list[str], list[str]]:
    """Check one KiTS case folder; return its report, error lines and warning lines."""
    label = folder / "segmentation.nii.gz"
    case = CaseFiles(folder.name, folder / "imaging.nii.gz", label if label.exists() else None)
    report, problems = check_case(case)
    return report, _lines(problems, "error"), _lines(problems, "warning")


def _lines(problems: list[Problem], severity: str) -> list[str]:
    return [p.line() for p in problems if p.severity == severity]


def test_item_01_training_case_without_segmentation(kits):
    kits.case("case_00000")
    unlabeled = kits.case("case_00001", with_label=False)
    dataset = discover(kits.root)

    training = check_dataset(dataset, require_labels=True, progress=False)
    assert [p.line() for p in training.problems] == [
        f"kitspipe: check: case_00001 {unlabeled}: training case without a label file "
        "(no segmentation vs segmentation.nii.gz)"]
    with pytest.raises(KitspipeError, match="case_00001 .*training case without a label file"):
        discover(kits.root, require_labels=True)

    inference = check_dataset(dataset, progress=False)
    assert inference.ok and not inference.warnings
    assert inference.cases[1].case_id == "case_00001" and inference.cases[1].label_values == {}


@pytest.mark.parametrize("damage, expected", [
    ("zero_bytes", "empty file (0 bytes vs a NIfTI-1/2 image)"),
    # Chopping the 8-byte gzip trailer leaves every voxel readable by SimpleITK; only
    # decompressing the whole stream to its end notices.
    ("no_trailer", "truncated gzip stream (Compressed file ended before the end-of-stream marker was reached"
                   " vs a complete gzip file)"),
    ("half", "truncated gzip stream (Compressed file ended before the end-of-stream marker was reached"
             " vs a complete gzip file)"),
    ("crc", "corrupt gzip stream (CRC check failed"),
])
def test_item_02_zero_byte_or_truncated_image(kits, damage, expected):
    folder = kits.case()
    image = folder / "imaging.nii.gz"
    raw = image.read_bytes()
    damaged = {"zero_bytes": b"", "no_trailer": raw[:-8], "half": raw[: len(raw) // 2],
               "crc": raw[:-8] + bytes([raw[-8] ^ 0xFF]) + raw[-7:]}[damage]
    image.write_bytes(damaged)
    before = sorted(os.listdir(folder))

    report, errors, _ = run_case(folder)

    assert len(errors) == 1 and errors[0].startswith(f"kitspipe: check: case_00000 {image}: {expected}")
    assert not report.ok and report.image_geometry is None
    assert sorted(os.listdir(folder)) == before  # the check writes nothing


@pytest.mark.parametrize("content, observed", [
    (b"just some text, not an image\n" * 20, "sizeof_hdr 1953723754, magic b'age\\n'"),
    (gzip.compress(b"just some text, not an image\n" * 20), "sizeof_hdr 1953723754, magic b'age\\n'"),
    (b"NO", "only 2 bytes"),
    ("sizeof_hdr", "sizeof_hdr 123, magic b'n+1\\x00'"),
    ("magic", "sizeof_hdr 348, magic b'xyz\\x00'"),
])
def test_item_03_not_nifti(kits, content, observed):
    folder = kits.case()
    image = folder / "imaging.nii.gz"
    if content == "sizeof_hdr":
        raw = bytearray(gzip.decompress(image.read_bytes()))
        raw[:4] = (123).to_bytes(4, "little")
        content = gzip.compress(bytes(raw))
    elif content == "magic":
        raw = bytearray(gzip.decompress(image.read_bytes()))
        raw[344:348] = b"xyz\x00"
        content = gzip.compress(bytes(raw))
    image.write_bytes(content)

    _, errors, _ = run_case(folder)

    expected = "a 348- or 540-byte header" if observed.startswith("only") else NIFTI_EXPECTED
    assert errors == [f"kitspipe: check: case_00000 {image}: not NIfTI-1/2 ({observed} vs {expected})"]


def test_item_03_nifti2_refused_with_a_clear_reason(kits):
    folder = kits.case()
    image = kits.write(folder / "imaging.nii.gz", kits.ct(), version=2)

    _, errors, _ = run_case(folder)

    # SimpleITK 2.5 cannot read NIfTI-2; if a later version can, the case simply passes.
    assert errors in ([], [f"kitspipe: check: case_00000 {image}: NIfTI-2 is not readable by SimpleITK "
                           f"(NIfTI-2, SimpleITK {sitk.Version.VersionString()} vs NIfTI-1)"])


def test_item_04_shape_mismatch(kits):
    folder = kits.case(label=kits.labels((5, 8, 6)))

    _, errors, _ = run_case(folder)

    assert errors == [f"kitspipe: check: case_00000 {folder / 'segmentation.nii.gz'}: label shape differs from "
                      f"image {folder / 'imaging.nii.gz'} (5×8×6 vs 4×8×8)"]


def test_item_05_spacing_mismatch_beyond_tolerance(kits):
    folder = kits.case(label_kwargs={"affine": kits.affine(slice_mm=3.5)})

    _, errors, _ = run_case(folder)

    assert len(errors) == 1
    assert errors[0].startswith(
        f"kitspipe: check: case_00000 {folder / 'segmentation.nii.gz'}: label grid differs from image "
        f"{folder / 'imaging.nii.gz'}: spacing (3.5, 0.78125, 0.78125) vs (3, 0.78125, 0.78125) (label LPS affine [")


def test_item_05_spacing_float32_noise_passes(kits):
    # 0.7050781 and 0.705078125 are one and the same float32; three float32 steps above it
    # the header really stores a different spacing (relative difference 2.5e-7).
    noisy = float(np.float32(0.7050781) + 3 * np.spacing(np.float32(0.7050781)))
    folder = kits.case(image_kwargs={"affine": kits.affine(pixel_mm=0.705078125)},
                       label_kwargs={"affine": kits.affine(pixel_mm=noisy)})
    stored = [nib.load(folder / name).header["pixdim"][2] for name in ("imaging.nii.gz", "segmentation.nii.gz")]
    assert stored[0] != stored[1]

    report, errors, warnings = run_case(folder)

    assert errors == [] and warnings == [] and report.ok


@pytest.mark.parametrize("label_affine, difference", [
    (np.array([[0, 0, -0.78125, 100], [0, -0.78125, 0, 0], [-3, 0, 0, 0], [0, 0, 0, 1]]),
     "origin (-100, 0, 0) vs (0, 0, 0)"),
    (np.array([[0, 0, 0.78125, 0], [0, -0.78125, 0, 0], [-3, 0, 0, 0], [0, 0, 0, 1]]),
     "direction (0, 0, -1, 0, 1, 0, -1, 0, 0) vs (0, 0, 1, 0, 1, 0, -1, 0, 0)"),
])
def test_item_06_origin_or_direction_mismatch(kits, label_affine, difference):
    folder = kits.case(label_kwargs={"affine": label_affine})

    _, errors, _ = run_case(folder)

    label, image = folder / "segmentation.nii.gz", folder / "imaging.nii.gz"
    assert len(errors) == 1
    assert errors[0].startswith(f"kitspipe: check: case_00000 {label}: label grid differs from image {image}: "
                                f"{difference} (label LPS affine [")
    assert " vs image LPS affine [0 0 0.7812 0; 0 0.7812 0 0; -3 0 0 0])" in errors[0]


@pytest.mark.parametrize("value, dtype", [(3, np.uint8), (-1, np.int16), (255, np.uint8)])
def test_item_07_label_values_outside_range(kits, value, dtype):
    labels = kits.labels().astype(dtype)
    labels[0, 0, :5] = value
    folder = kits.case(label=labels)

    report, errors, _ = run_case(folder)

    assert errors == [f"kitspipe: check: case_00000 {folder / 'segmentation.nii.gz'}: label values outside "
                      f"{{0, 1, 2}} ({value}: 5 voxels vs 0, 1, 2)"]
    assert report.label_values[value] == 5


def test_item_08_non_integral_labels(kits):
    labels = kits.labels().astype(np.float32)
    labels[0, 0, :3] = 1.5
    labels[0, 1, :2] = 0.9999
    folder = kits.case(label=labels)

    _, errors, _ = run_case(folder)

    assert errors == [f"kitspipe: check: case_00000 {folder / 'segmentation.nii.gz'}: non-integral label values "
                      "(0.9999: 2 voxels, 1.5: 3 voxels vs integers 0, 1, 2)"]


def test_item_08_integral_float_labels_accepted(kits):
    folder = kits.case(label=kits.labels().astype(np.float32))

    report, errors, warnings = run_case(folder)

    assert errors == [] and warnings == []
    assert report.label_values == {0: 224, 1: 24, 2: 8}
    assert "label: stored as float32 with integral values; read as integers" in report.notes


@pytest.mark.parametrize("role", ["image", "label"])
def test_item_09_non_finite_values(kits, role):
    data = (kits.ct() if role == "image" else kits.labels()).astype(np.float32)
    data[0, 0, :2] = np.nan
    data[1, 0, 0] = np.inf
    data[2, 0, :3] = -np.inf
    # SimpleITK (its NIfTI C library) loads these as 0, so only the raw stream shows them.
    folder = kits.case(**{role: data})

    _, errors, _ = run_case(folder)

    name, values = ("imaging.nii.gz", "intensities") if role == "image" else ("segmentation.nii.gz", "label values")
    assert errors == [f"kitspipe: check: case_00000 {folder / name}: non-finite {values} "
                      "(2 NaN, 1 +Inf, 3 -Inf vs finite values only)"]


@pytest.mark.parametrize("shape, expected", [
    ((8, 8), "not a 3-D volume (2-D 8×8 vs 3-D)"),
    ((4, 8, 8, 2), "not a single 3-D volume (4-D 4×8×8×2 vs 3-D, or 4-D with one volume)"),
])
def test_item_10_wrong_dimensionality(kits, shape, expected):
    folder = kits.case(image=kits.ct(shape))
    _, errors, _ = run_case(folder)
    assert errors == [f"kitspipe: check: case_00000 {folder / 'imaging.nii.gz'}: {expected}"]


def test_item_10_trailing_singleton_accepted(kits):
    folder = kits.case(image=kits.ct((4, 8, 8, 1)))

    report, errors, warnings = run_case(folder)

    assert errors == [] and warnings == []
    assert report.image_geometry.size == (4, 8, 8)
    assert report.notes == ["image: 4-D 4×8×8×1 has trailing singleton axes; read as 3-D"]


SHEARED = [[0, 0.3, -0.78125, 0], [0, -0.78125, 0, 0], [-3, 0, 0, 0]]
SINGULAR = [[0, 0, 0, 0], [0, -0.78125, 0, 0], [-3, 0, 0, 0]]


@pytest.mark.parametrize("fields, expected", [
    ({"pixdim": [1, 0, 0.78125, 0.78125, 1, 1, 1, 1]},
     "degenerate affine: non-positive or non-finite spacing in pixdim "
     "(pixdim (0, 0.78125, 0.78125) vs positive voxel spacing)"),
    ({"pixdim": [1, 3, -0.78125, 0.78125, 1, 1, 1, 1]},
     "degenerate affine: non-positive or non-finite spacing in pixdim "
     "(pixdim (3, -0.78125, 0.78125) vs positive voxel spacing)"),
    ({"srow_x": SINGULAR[0], "srow_y": SINGULAR[1], "srow_z": SINGULAR[2]},
     "degenerate affine: singular sform (sform [0 0 0 0; 0 -0.7812 0 0; -3 0 0 0] "
     "vs an invertible sform with orthonormal direction)"),
    ({"srow_x": SHEARED[0], "srow_y": SHEARED[1], "srow_z": SHEARED[2]},
     "degenerate affine: non-orthonormal sform (sform [0 0.3 -0.7812 0; 0 -0.7812 0 0; -3 0 0 0] "
     "vs an invertible sform with orthonormal direction)"),
    ({"pixdim": [1, 1, 1, 1, 1, 1, 1, 1]},
     "degenerate affine: sform voxel size differs from pixdim "
     "(sform (3, 0.78125, 0.78125) mm vs pixdim (1, 1, 1) mm (ITK uses pixdim))"),
])
def test_item_11_degenerate_affine(kits, fields, expected):
    folder = kits.case()
    kits.rewrite_header(folder / "imaging.nii.gz", **fields)

    _, errors, _ = run_case(folder)

    assert errors == [f"kitspipe: check: case_00000 {folder / 'imaging.nii.gz'}: {expected}"]


def test_item_12_kits_sform_only_and_qform_only_pass(kits):
    sform_only = kits.case("case_00000", label_kwargs={"sform_code": 2, "qform_code": 0})
    qform_only = kits.case("case_00001", label=kits.labels().astype(np.uint16),
                           label_kwargs={"sform_code": 0, "qform_code": 1})
    both_equal = kits.case("case_00002", label_kwargs={"sform_code": 2, "qform_code": 1})

    for folder in (sform_only, qform_only, both_equal):
        report, errors, warnings = run_case(folder)
        assert errors == [] and warnings == [] and report.ok
        image = read_volume(folder / "imaging.nii.gz")
        label = read_volume(folder / "segmentation.nii.gz")
        assert label.grid == image.grid
        assert label.grid.spacing == (3.0, 0.78125, 0.78125)
        assert label.source.origin == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("sform_code, severity, expected", [
    (1, "warning", "equal transforms (the sform is used, as by nibabel and viewers)) [warning]"),
    (2, "error", "equal transforms (ITK uses the qform since sform_code is 2; nibabel the sform))"),
])
def test_item_12_sform_qform_disagreement(kits, sform_code, severity, expected):
    shifted = kits.affine(origin=(100.0, 0.0, 0.0))
    folder = kits.case(image_kwargs={"sform_code": sform_code, "qform_code": 1, "qform_affine": shifted})

    _, errors, warnings = run_case(folder)

    found = warnings if severity == "warning" else errors
    assert found == [f"kitspipe: check: case_00000 {folder / 'imaging.nii.gz'}: sform and qform disagree "
                     f"(offset sform (0, 0, 0), qform (100, 0, 0) vs {expected}"]
    if severity == "warning":
        # The rule says the sform wins, so the image still lies on the label's grid.
        assert errors == []
        assert read_volume(folder / "imaging.nii.gz").source.origin == (0.0, 0.0, 0.0)


def _oblique_affine() -> np.ndarray:
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.8, 2.5])
    affine[:3, 3] = (-50, 20, 10)
    return affine


@pytest.mark.parametrize("name, affine", [
    ("IPL", None),
    ("RAS", np.diag([0.8, 0.8, 2.5, 1])),
    ("LPS", np.diag([-0.8, -0.8, 2.5, 1])),
    ("oblique", _oblique_affine()),
])
def test_item_13_orientation_zoo(kits, name, affine):
    kwargs = {} if affine is None else {"affine": affine}
    folder = kits.case(image_kwargs=kwargs, label_kwargs=kwargs)

    report, errors, warnings = run_case(folder)

    assert errors == [] and warnings == []
    oblique_note = "image: oblique direction; canonical arrays keep the residual rotation"
    assert report.notes == ([oblique_note] if name == "oblique" else [])


@pytest.mark.parametrize("shape, slice_mm", [((2, 512, 796), 3.0), ((29, 8, 8), 5.0)])
def test_item_14_unusual_extents(kits, shape, slice_mm):
    image = np.full(shape, -1024, dtype=np.int16)
    image[:, 3:6, 3:6] = 40
    labels = np.zeros(shape, dtype=np.uint8)
    labels[:, 3:5, 3:5] = 1
    affine = kits.affine(slice_mm=slice_mm)
    folder = kits.case(image=image, label=labels, image_kwargs={"affine": affine}, label_kwargs={"affine": affine})
    assert (folder / "imaging.nii.gz").stat().st_size < 20_000  # all-background data compresses to a few kB

    report, errors, warnings = run_case(folder)

    assert errors == [] and warnings == []
    assert report.image_geometry.size == shape
    assert report.image_geometry.spacing[0] == slice_mm


def _lying_header(path: Path, shape: tuple[int, ...], padding_bytes: int) -> Path:
    """A tiny .nii.gz whose header declares ``shape`` but carries ``padding_bytes`` of zeros."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape)
    header.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    header["vox_offset"] = 352
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * padding_bytes))
    return path


def test_item_15_huge_header_refused_before_loading(tmp_path, monkeypatch):
    image = _lying_header(tmp_path / "case_00000" / "imaging.nii.gz", (4000, 4000, 4000), 1000)
    assert image.stat().st_size < 2000

    def must_not_run(*args, **kwargs):
        raise AssertionError("the voxels were touched")
    monkeypatch.setattr(validation, "read_image", must_not_run)
    monkeypatch.setattr(validation, "verify_stream", must_not_run)

    case = CaseFiles("case_00000", image, None)
    _, problems = check_case(case, memory_limit_bytes=8 * 2**30)
    assert [p.line() for p in problems] == [
        f"kitspipe: check: case_00000 {image}: volume too large to load (needs 238.4 GiB for 4000×4000×4000 int16 "
        f"vs at most {2**31} voxels and memory limit 8.0 GiB)"]
    # The default limit is the memory available now.
    assert available_memory_bytes() > 0
    _, problems = check_case(case)
    assert "volume too large to load (needs 238.4 GiB" in problems[0].line()


def test_item_15_decompression_bomb_stopped(tmp_path):
    # Header: 4×8×8 int16 (512 bytes of data); stream: 3 MiB of zeros.
    image = _lying_header(tmp_path / "case_00000" / "imaging.nii.gz", (4, 8, 8), 3 * 2**20)

    _, problems = check_case(CaseFiles("case_00000", image, None))

    assert [p.line() for p in problems] == [
        f"kitspipe: check: case_00000 {image}: more data than the header declares (decompression stopped) "
        f"(over {2 * 2**20} bytes vs 864 bytes)"]


def test_item_16_empty_label_and_constant_image(kits):
    folder = kits.case(image=np.full((4, 8, 8), -1024, dtype=np.int16), label=np.zeros((4, 8, 8), np.uint8))

    report, errors, warnings = run_case(folder)

    assert errors == [] and report.ok
    assert warnings == [
        f"kitspipe: check: case_00000 {folder / 'imaging.nii.gz'}: constant image "
        "(every voxel -1024 vs varying intensities) [warning]",
        f"kitspipe: check: case_00000 {folder / 'segmentation.nii.gz'}: label has no kidney or tumour voxels "
        "(background only vs some voxels labelled 1 or 2) [warning]",
    ]
    assert report.label_values == {0: 256}


def test_item_18_colliding_case_ids(kits):
    kits.case("case_00001")
    kits.case("case_1")
    with pytest.raises(KitspipeError) as raised:
        discover(kits.root)
    assert str(raised.value) == (f"kitspipe: discover: case_1 {kits.root}: case id collides with another "
                                 "(case_1 vs distinct from case_00001)")


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_item_19_dangling_or_looping_symlink(kits, kind):
    kits.case("case_00001")
    folder = kits.root / "case_00000"
    folder.mkdir(parents=True)
    link = folder / "imaging.nii.gz"
    if kind == "dangling":
        link.symlink_to(kits.root / "nowhere.nii.gz")
    else:
        other = folder / "other.nii.gz"
        link.symlink_to(other)
        other.symlink_to(link)
    with pytest.raises(KitspipeError) as raised:
        discover(kits.root)
    assert str(raised.value) == f"kitspipe: discover: case_00000 {link}: dangling or looping symbolic link"


@pytest.mark.parametrize("stored, slope, inter, encoding", [
    (np.int16, 2.0, -1024.0, "int16 scaled (slope 2, inter -1024)"),
    (np.uint16, 1.0, -1024.0, "uint16 scaled (slope 1, inter -1024)"),
    (np.float32, None, None, "float32"),
])
def test_item_20_intensity_encoding(kits, stored, slope, inter, encoding):
    hu = kits.ct().astype(np.float64)
    hu -= hu % 2  # even values, so slope 2 stores them exactly
    raw = hu if slope is None else (hu - inter) / slope
    folder = kits.case(image=raw.astype(stored), image_kwargs={"slope": slope, "inter": inter})

    report, errors, warnings = run_case(folder)

    assert errors == [] and warnings == []
    assert report.intensity_encoding == encoding
    volume = read_volume(folder / "imaging.nii.gz")
    # nibabel's array is in file index order (i, j, k); SimpleITK's is (k, j, i).
    expected = volume.reorientation.to_canonical(np.ascontiguousarray(hu.T))
    np.testing.assert_array_equal(volume.array, expected)


def test_item_20_unapplied_offset_warned(kits):
    folder = kits.case(image=(kits.ct() + 1024).astype(np.uint16))
    _, errors, warnings = run_case(folder)
    assert errors == []
    assert warnings == [f"kitspipe: check: case_00000 {folder / 'imaging.nii.gz'}: no air in the image: intensities "
                        "may not be HU (minimum 0 vs about -1000 HU (an unapplied 1024 offset?)) [warning]"]


def test_item_20b_predictions_missing_misaligned_or_extra(kits, tmp_path):
    for case_id in ("case_00000", "case_00001", "case_00002"):
        kits.case(case_id)
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    kits.write(predictions / "case_00000.nii.gz", kits.labels())
    flipped = kits.affine()
    flipped[:3, 2] *= -1
    kits.write(predictions / "case_00002.nii.gz", kits.labels(), flipped)
    kits.write(predictions / "case_00009.nii.gz", kits.labels())

    report = check_predictions(discover(kits.root), predictions)

    lines = [p.line() for p in report.problems]
    assert len(lines) == 3
    assert lines[0] == (f"kitspipe: evaluate: case_00001 {predictions / 'case_00001.nii.gz'}: no prediction for "
                        "this reference case (missing vs one prediction per labelled case)")
    assert lines[1].startswith(f"kitspipe: evaluate: case_00002 {predictions / 'case_00002.nii.gz'}: prediction grid "
                               f"differs from reference {kits.root / 'case_00002' / 'segmentation.nii.gz'}: direction")
    assert lines[2] == (f"kitspipe: evaluate: case_00009 {predictions / 'case_00009.nii.gz'}: "
                        "prediction without a reference case")
    assert [(c.case_id, c.ok) for c in report.cases] == [("case_00000", True), ("case_00001", False),
                                                         ("case_00002", False)]


@pytest.mark.parametrize("slice_mm, pixel_mm", [(12.0, 0.78125), (3.0, 0.2)])
def test_suspicious_spacing_warned(kits, slice_mm, pixel_mm):
    affine = kits.affine(pixel_mm=pixel_mm, slice_mm=slice_mm)
    folder = kits.case(image_kwargs={"affine": affine}, label_kwargs={"affine": affine})

    _, errors, warnings = run_case(folder)

    assert errors == []
    assert warnings == [f"kitspipe: check: case_00000 {folder / 'imaging.nii.gz'}: unusual voxel spacing "
                        f"(({slice_mm:g}, {pixel_mm:g}, {pixel_mm:g}) mm vs 0.3-10 mm) [warning]"]


def test_all_problems_of_a_run_reported_together(kits):
    kits.case("case_00000")
    (kits.case("case_00001") / "imaging.nii.gz").write_bytes(b"")
    bad_label = kits.labels()
    bad_label[0, 0, 0] = 7
    kits.case("case_00002", label=bad_label)

    report = check_dataset(discover(kits.root), progress=False)

    with pytest.raises(KitspipeError) as raised:
        report.raise_if_errors()
    lines = str(raised.value).splitlines()
    assert [line.split(" ")[2] for line in lines] == ["case_00001", "case_00002"]
    assert "empty file" in lines[0] and "label values outside {0, 1, 2} (7: 1 voxels" in lines[1]
    assert [c.ok for c in report.cases] == [True, False, False]


def test_worker_pool_gives_the_same_report(kits):
    kits.case("case_00000")
    kits.case("case_00001", label=kits.labels((4, 8, 7)))
    kits.case("case_00002", with_label=False)
    dataset = discover(kits.root)

    serial = check_dataset(dataset, jobs=1, progress=False)
    pooled = check_dataset(dataset, jobs=2, progress=False)

    assert [c.to_json() for c in pooled.cases] == [c.to_json() for c in serial.cases]
    assert pooled.problems == serial.problems and pooled.warnings == serial.warnings
