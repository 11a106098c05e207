"""Synthetic KiTS19-like dataset: determinism, file geometry, anatomy and intensities."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from kitspipe.atomic import TEMP_PREFIX
from kitspipe.synthetic import (KITS_DIRECTION, SIZE_PRESETS, render, sample_case,
                                synthesize_case, synthesize_dataset)
from kitspipe.synthetic_anatomy import TUMOUR_HU_RANGE


def kits_affine(pixel_mm: float, slice_mm: float) -> np.ndarray:
    return np.array([[0, 0, -pixel_mm, 0], [0, -pixel_mm, 0, 0],
                     [-slice_mm, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def nibabel_array(image: sitk.Image) -> np.ndarray:
    """The array nibabel would show for this image: (slices, rows, cols)."""
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    ids = synthesize_dataset(folder, n_cases=4, seed=5, progress=False)
    return folder, ids


def test_same_seed_same_case_other_seed_other_case():
    image_a, label_a = synthesize_case(2, seed=11)
    image_b, label_b = synthesize_case(2, seed=11)
    image_c, _ = synthesize_case(2, seed=12)
    assert np.array_equal(sitk.GetArrayFromImage(image_a), sitk.GetArrayFromImage(image_b))
    assert np.array_equal(sitk.GetArrayFromImage(label_a), sitk.GetArrayFromImage(label_b))
    assert image_a.GetSpacing() == image_b.GetSpacing()
    other = sitk.GetArrayFromImage(image_c)
    same = sitk.GetArrayFromImage(image_a)
    assert other.shape != same.shape or not np.array_equal(other, same)


def test_a_case_does_not_depend_on_its_batch(dataset, tmp_path):
    folder, ids = dataset
    assert ids == [f"case_{i:05d}" for i in range(4)]
    alone = synthesize_dataset(tmp_path, n_cases=1, seed=5, first_index=3, progress=False)
    assert alone == ["case_00003"]
    for name in ("imaging.nii.gz", "segmentation.nii.gz"):
        assert digest(tmp_path / "case_00003" / name) == digest(folder / "case_00003" / name)


def test_files_have_kits19_geometry_and_no_temporaries(dataset):
    folder, ids = dataset
    for case_id in ids:
        case = sample_case(int(case_id[5:]), seed=5)
        image = nib.load(folder / case_id / "imaging.nii.gz")
        label = nib.load(folder / case_id / "segmentation.nii.gz")
        expected = kits_affine(case.scan.pixel_mm, case.scan.slice_mm)
        for nifti in (image, label):
            assert np.allclose(nifti.affine, expected, atol=1e-5)
            assert nib.aff2axcodes(nifti.affine) == ("I", "P", "L")
            assert nifti.shape == case.scan.shape
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2}

        itk = sitk.ReadImage(str(folder / case_id / "imaging.nii.gz"))
        assert np.allclose(itk.GetDirection(), KITS_DIRECTION)
        assert np.allclose(itk.GetOrigin(), 0.0)
        assert np.allclose(itk.GetSpacing(), case.scan.spacing, rtol=1e-6)
        n_slices, n_rows, n_cols = case.scan.shape
        assert sitk.GetArrayFromImage(itk).shape == (n_cols, n_rows, n_slices)
        assert np.array_equal(nibabel_array(itk), np.asarray(image.dataobj))
    assert not list(folder.rglob(TEMP_PREFIX + "*"))


def test_organs_sit_on_the_anatomically_correct_side(dataset):
    """Read the written file back and look up organs through SimpleITK's own geometry."""
    folder, ids = dataset
    for case_id in ids:
        case = sample_case(int(case_id[5:]), seed=5)
        anatomy, scan = case.anatomy, case.scan
        clean, _ = render(case, degrade=False)
        label_image = sitk.ReadImage(str(folder / case_id / "segmentation.nii.gz"))
        label = nibabel_array(label_image)
        midline = scan.to_world([0.0, 0.0, 0.0])

        def index_of(point):
            return label_image.TransformPhysicalPointToIndex(scan.to_world(point).tolist())

        components, count = ndimage.label(label > 0)
        assert count == 2
        # ITK index order is nibabel's (slice, row, col), so centroids map straight to LPS.
        centroids = ndimage.center_of_mass(label > 0, components, [1, 2])
        xs = sorted(label_image.TransformContinuousIndexToPhysicalPoint(c)[0] for c in centroids)
        assert xs[0] < midline[0] < xs[1]
        for kidney in anatomy.kidneys:
            assert label[index_of(kidney.shape.centre)] in (1, 2)
            on_left = scan.to_world(kidney.shape.centre)[0] > midline[0]
            assert on_left == (kidney.side == "left")

        # Liver on the patient's right (LPS x below the midline), spleen on the left, both
        # above the kidneys; clamp to the top slice so the point lies inside the scan.
        top = scan.origin[2] - 5.0
        liver = anatomy.liver.centre.copy()
        liver[2] = min(liver[2], top)
        assert clean[index_of(liver)] == round(anatomy.hu["liver"])
        assert scan.to_world(liver)[0] < midline[0] and scan.to_world(liver)[2] > midline[2]
        assert index_of(liver)[0] < index_of(anatomy.kidneys[0].shape.centre)[0]  # head first
        spleen = anatomy.spleen.centre.copy()
        spleen[2] = min(spleen[2], top)
        assert scan.to_world(spleen)[0] > midline[0]
        # The vertebral body lies behind the body centre (larger LPS y).
        spine = np.array([0.0, anatomy.spine_y, 0.0])
        assert clean[index_of(spine)] >= 70
        assert scan.to_world(spine)[1] > midline[1]
        # Kidneys and tumours are wholly inside the scanned slab.
        assert not label[0].any() and not label[-1].any()


def test_tumour_counts_and_radii_follow_a_kits_like_distribution():
    cases = [sample_case(i, seed=1).anatomy for i in range(500)]
    counts = np.array([len(a.tumours) for a in cases])
    radii = np.array([t.radius_mm for a in cases for t in a.tumours])
    assert counts.max() <= 3
    assert 0.72 <= (counts > 0).mean() <= 0.85
    assert radii.min() >= 5.0 and radii.max() <= 40.0
    assert 10.0 <= np.median(radii) <= 22.0
    assert (radii < 20).mean() > 0.6 and 0.02 < (radii > 30).mean() < 0.2


@pytest.fixture(scope="module")
def rendered():
    """Eight small cases, each with its degraded image and its noise-free ground truth."""
    cases = []
    for index in range(8):
        case = sample_case(index, seed=4)
        image, label = render(case)
        clean, _ = render(case, degrade=False)
        cases.append((case, image, clean, label))
    return cases


def test_tumours_grow_out_of_a_kidney(rendered):
    with_tumour = [label for _, _, _, label in rendered if (label == 2).any()]
    assert len(with_tumour) >= 4
    for label in with_tumour:
        assert (ndimage.binary_dilation(label == 2) & (label == 1)).any()


def test_kidney_and_tumour_intensities(rendered):
    kidney_low, tumour_high, checked = [], [], 0
    for case, image, clean, label in rendered:
        hu = case.anatomy.hu
        assert 150 <= hu["cortex"] <= 200 and 100 <= hu["medulla"] <= 130
        assert clean[label == 1].max() == round(hu["cortex"])
        # Away from the kidney edge, blur has not mixed in the surrounding fat.
        in_plane = np.ones((1, 3, 3), dtype=bool)
        cortex = ndimage.binary_erosion(clean == round(hu["cortex"]), in_plane)
        medulla = ndimage.binary_erosion(clean == round(hu["medulla"]), in_plane)
        if cortex.sum() > 50 and medulla.sum() > 50:
            assert 140 <= image[cortex].mean() <= 200
            assert 95 <= image[medulla].mean() <= 135
            assert image[cortex].mean() > image[medulla].mean() + 20
            checked += 1
        if (label == 2).any():
            tumour_clean = clean[label == 2]
            low, high = TUMOUR_HU_RANGE
            assert low <= tumour_clean.min() and tumour_clean.max() <= high
            assert 20 <= np.median(image[label == 2]) <= 110
            kidney_low.append(np.percentile(image[label == 1], 10))
            tumour_high.append(np.percentile(image[label == 2], 90))
    assert checked >= 4
    # Intensity alone must not separate tumour from kidney.
    assert np.mean(np.array(tumour_high) > np.array(kidney_low)) > 0.8


def test_small_and_full_presets():
    for index in range(40):
        small = sample_case(index, seed=3, size="small")
        full = sample_case(index, seed=3, size="full")
        # Both presets scan the same patient.
        for a, b in zip(small.anatomy.kidneys, full.anatomy.kidneys):
            assert np.allclose(a.shape.centre, b.shape.centre)
        for case in (small, full):
            preset, scan = SIZE_PRESETS[case.size], case.scan
            n_slices, n_rows, n_cols = scan.shape
            assert n_rows == n_cols == preset.in_plane
            assert preset.pixel_mm[0] <= scan.pixel_mm <= preset.pixel_mm[1]
            assert scan.slice_mm in preset.slice_choices_mm and n_slices <= preset.max_slices
            assert n_cols * scan.pixel_mm > 2 * case.anatomy.body_half_width
            low, high = case.anatomy.z_range_of_interest(margin_mm=0.0)
            bottom = scan.origin[2] - (n_slices - 1) * scan.slice_mm
            assert bottom <= low and high <= scan.origin[2]
            length = (n_slices - 1) * scan.slice_mm
            assert length >= min(preset.coverage_mm[0], (preset.max_slices - 1) * scan.slice_mm)
        assert 36 <= small.scan.shape[0] <= 96


def test_one_full_size_case():
    index = next(i for i in range(50) if sample_case(i, seed=0, size="full").scan.slice_mm == 5.0)
    image, label = synthesize_case(index, seed=0, size="full")
    assert image.GetSize()[1:] == (512, 512)
    assert np.allclose(image.GetDirection(), KITS_DIRECTION)
    assert image.GetSpacing() == label.GetSpacing() and image.GetSize() == label.GetSize()
    labels = sitk.GetArrayViewFromImage(label)
    assert set(np.unique(labels)) <= {0, 1, 2}
    kidney_ml = np.count_nonzero(labels == 1) * np.prod(image.GetSpacing()) / 1000
    assert 150 <= kidney_ml <= 600  # two adult kidneys


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic size"):
        synthesize_case(0, seed=0, size="huge")
    with pytest.raises(ValueError):
        synthesize_dataset(tmp_path, n_cases=1, size="medium", progress=False)
    with pytest.raises(ValueError):
        synthesize_case(-1, seed=0)
    assert synthesize_dataset(tmp_path, n_cases=0, progress=False) == []


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), case_index=st.integers(0, 99_999))
def test_any_seed_gives_valid_labels_and_geometry(seed, case_index):
    image, label = synthesize_case(case_index, seed)
    labels = np.unique(sitk.GetArrayViewFromImage(label))
    assert set(labels) <= {0, 1, 2} and 1 in labels
    assert image.GetPixelID() == sitk.sitkInt16 and label.GetPixelID() == sitk.sitkUInt8
    for item in (image, label):
        assert np.allclose(item.GetDirection(), KITS_DIRECTION)
        assert item.GetOrigin() == (0.0, 0.0, 0.0)
    assert image.GetSize() == label.GetSize() and image.GetSpacing() == label.GetSpacing()
    hu = sitk.GetArrayViewFromImage(image)
    assert hu.min() >= -1024 and hu.max() > 300  # air around the body, bone in it
