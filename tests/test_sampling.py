"""Patch-pair sampling: reading boxes, pair alignment, candidate grid, class balance."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kitspipe.data.cases import open_cases
from kitspipe.data.patch_geometry import PairGeometry, read_patch
from kitspipe.data.sampling import CaseCandidates, PatchSampler, grid_stride
from kitspipe.errors import KitspipeError
from kitspipe.networks.sizes import output_size
from kitspipe.plans import IntensityPlan, ResolutionPlan, load_preset

SCALE = 4


def small_plans(high_input=36, low_input=24, spacing=1.0, **sampling):
    """Depth-1 branches at 1 mm and 4 mm: 36 → 20 high, 24 → 8 low voxels (32 mm ≥ 20 mm)."""
    base = load_preset("cpu")
    high = ResolutionPlan((spacing,) * 3, 4, 1, (high_input,) * 3, (output_size(high_input, 1),) * 3)
    low = ResolutionPlan((spacing * SCALE,) * 3, 4, 1, (low_input,) * 3, (output_size(low_input, 1),) * 3)
    return replace(base, high=high, low=low, intensity=IntensityPlan((-500.0, 400.0), 0.0, 100.0),
                   sampling=replace(base.sampling, **sampling))


def write_case(root: Path, case_id: str, high_label: np.ndarray, high_image: np.ndarray | None = None,
               low_label: np.ndarray | None = None, low_image: np.ndarray | None = None) -> Path:
    """A preprocessed case folder as ``kitspipe preprocess`` writes it, from high-grid arrays."""
    folder = root / case_id
    folder.mkdir(parents=True)
    shape = high_label.shape
    low_shape = tuple(n // SCALE for n in shape)
    if high_image is None:
        high_image = np.where(high_label > 0, 150, 0).astype(np.int16)
    if low_label is None:
        low_label = high_label[SCALE // 2::SCALE, SCALE // 2::SCALE, SCALE // 2::SCALE]
    if low_image is None:
        blocks = high_image.reshape(low_shape[0], SCALE, low_shape[1], SCALE, low_shape[2], SCALE)
        low_image = blocks.mean(axis=(1, 3, 5)).astype(np.int16)
    for name, array in (("high_image", high_image), ("high_label", high_label),
                        ("low_image", low_image), ("low_label", low_label)):
        np.save(folder / f"{name}.npy", np.ascontiguousarray(array))
    grid = {"spacing": [1.0] * 3, "origin": [0.0] * 3, "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    properties = {
        "case_id": case_id,
        "high_grid": dict(grid, shape=list(shape)),
        "low_grid": dict(grid, shape=list(low_shape), spacing=[float(SCALE)] * 3),
        "locations": {"kidney": np.argwhere(high_label > 0)[:2000].tolist(),
                      "tumour": np.argwhere(high_label == 2)[:2000].tolist()},
        "has_tumour": bool((high_label == 2).any()),
    }
    (folder / "properties.json").write_text(json.dumps(properties))
    return folder


def kidney_label(shape=(64, 64, 64), centre=(30, 26, 38), radius=9, tumour_radius=4) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    distance2 = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2
    label = np.zeros(shape, np.uint8)
    label[distance2 <= radius**2] = 1
    label[distance2 <= tumour_radius**2] = 2
    return label


# --- read_patch ---------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(*[st.integers(1, 7)] * 3), start=st.tuples(*[st.integers(-9, 9)] * 3),
       size=st.tuples(*[st.integers(1, 10)] * 3))
def test_read_patch_equals_a_box_of_the_padded_array(shape, start, size):
    array = np.arange(np.prod(shape), dtype=np.int16).reshape(shape) + 1
    padded = np.pad(array, 20, constant_values=-7)
    expected = padded[tuple(slice(s + 20, s + 20 + n) for s, n in zip(start, size))]
    patch = read_patch(array, start, size, -7)
    assert patch.dtype == array.dtype
    np.testing.assert_array_equal(patch, expected)


class RecordingArray:
    """Array stand-in that records which boxes are read from it."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, index):
        self.reads.append(index)
        return self.array[index]


def test_read_patch_reads_only_the_part_inside_the_array():
    array = RecordingArray(np.ones((10, 12, 14), np.uint8))
    patch = read_patch(array, (-3, 4, 10), (6, 5, 8), 0)
    assert array.reads == [(slice(0, 3), slice(4, 9), slice(10, 14))]
    assert patch.sum() == 3 * 5 * 4
    assert read_patch(array, (20, 0, 0), (2, 2, 2), 5).tolist() == np.full((2, 2, 2), 5).tolist()
    assert len(array.reads) == 1  # a box wholly outside reads nothing


def test_read_patch_from_a_memory_map(tmp_path):
    array = np.random.default_rng(0).integers(-500, 400, size=(9, 10, 11)).astype(np.int16)
    np.save(tmp_path / "a.npy", array)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    patch = read_patch(mapped, (5, -2, 3), (6, 6, 6), -500)
    assert not isinstance(patch, np.memmap)
    np.testing.assert_array_equal(patch[:4, 2:, :], array[5:9, 0:4, 3:9])
    assert (patch[4:] == -500).all() and (patch[:, :2] == -500).all()


# --- pair geometry ------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(low_start=st.tuples(*[st.integers(-20, 40)] * 3))
def test_high_and_low_boxes_share_their_physical_centre(low_start):
    g = PairGeometry.from_plans(small_plans())
    h, l = g.high_spacing_mm[0], g.low_spacing_mm[0]

    def centre_mm(start, size, spacing):  # grids share the corner at 0 mm
        return np.array([(s + n / 2) * spacing for s, n in zip(start, size)])

    centre = centre_mm(low_start, g.low_input, l)
    np.testing.assert_allclose(centre_mm(g.high_start(low_start), g.high_input, h), centre)
    np.testing.assert_allclose(centre_mm(g.high_output_start(low_start), g.high_output, h), centre)
    np.testing.assert_allclose(centre_mm(g.low_output_start(low_start), g.low_output, l), centre)


def test_bright_block_lands_at_the_same_mm_offset_in_both_patches(tmp_path):
    # A 4 mm cube covering exactly one low voxel, so both grids represent it without error.
    label = np.zeros((64, 64, 64), np.uint8)
    low_voxel = np.array([8, 6, 9])
    label[tuple(slice(SCALE * v, SCALE * v + SCALE) for v in low_voxel)] = 1
    image = np.where(label > 0, 400, -500).astype(np.int16)
    write_case(tmp_path, "case_a", label, image)
    sampler = PatchSampler(open_cases(tmp_path, ["case_a"]), small_plans())
    # The block's centre is at (34, 26, 38) mm; the pair centre at 4·s_l + 48 mm.
    for low_start in [(-3, -6, -2), (-5, -4, -1), (-1, -5, -4)]:
        pair = sampler.pair_at(0, low_start, np.random.default_rng(0))
        offsets = []
        for patch, spacing in ((pair.high_image, 1.0), (pair.low_image, float(SCALE))):
            assert patch.max() > patch.min()
            bright = np.argwhere(patch == patch.max()).mean(axis=0)
            offsets.append((bright + 0.5 - np.array(patch.shape) / 2) * spacing)
        np.testing.assert_allclose(offsets[0], offsets[1])
        for target, spacing, block_voxels in ((pair.high_target[0], 1.0, SCALE**3), (pair.low_target[0], SCALE, 1)):
            if target.sum() == block_voxels:  # the whole block is inside the output region
                centroid = np.argwhere(target > 0).mean(axis=0)
                np.testing.assert_allclose((centroid + 0.5 - np.array(target.shape) / 2) * spacing, offsets[0])


def test_normalisation_clips_then_standardises(tmp_path):
    label = np.zeros((32, 32, 32), np.uint8)
    write_case(tmp_path, "c", label, np.full(label.shape, 300, np.int16))
    sampler = PatchSampler(open_cases(tmp_path, ["c"]), small_plans())
    pair = sampler.pair_at(0, (0, 0, 0), np.random.default_rng(0))
    assert pair.high_image.dtype == np.float32
    inside = pair.high_image[tuple(slice(s, s + 32) for s in (-sampler.geometry.high_start((0, 0, 0))[0],) * 3)]
    assert np.allclose(inside, 3.0)  # (300 − 0) / 100
    assert np.isclose(pair.high_image.min(), -5.0)  # padding is air at the lower clip value


# --- candidates ---------------------------------------------------------------------------

def test_grid_stride_rounds_down_to_whole_low_voxels():
    assert grid_stride(20, 4, 0.5) == 8  # the paper: 10 → 8, 60 % overlap
    assert grid_stride(28, 4, 0.5) == 12
    assert grid_stride(4, 4, 0.5) == 4  # never below one low voxel
    assert grid_stride(20, 1, 0.5) == 10


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(*[st.integers(2, 14)] * 3), seed=st.integers(0, 10_000),
       overlap=st.sampled_from([0.0, 0.5, 0.75]))
def test_candidates_are_classified_exactly_and_cover_the_volume(shape, seed, overlap):
    rng = np.random.default_rng(seed)
    shape = tuple(SCALE * n for n in shape)
    label = np.zeros(shape, np.uint8)
    for _ in range(rng.integers(0, 4)):  # a few single voxels: the hardest case for pooling
        label[tuple(rng.integers(0, n) for n in shape)] = rng.integers(1, 3)
    geometry = PairGeometry.from_plans(small_plans())
    candidates = CaseCandidates.compute(label, geometry, overlap)
    covered = np.zeros(shape, bool)
    for flat in range(candidates.positive.size):
        start = geometry.high_output_start(candidates.low_start(flat))
        region = read_patch(label, start, geometry.high_output, 0)
        assert candidates.positive.flat[flat] == bool(region.any())
        covered[tuple(slice(max(s, 0), s + n) for s, n in zip(start, geometry.high_output))] = True
    assert covered.all()


# --- sampling -----------------------------------------------------------------------------

def test_positive_fraction_matches_the_plan_and_tumour_flag_is_right(tmp_path):
    write_case(tmp_path, "a", kidney_label())
    write_case(tmp_path, "b", kidney_label(centre=(40, 40, 20), tumour_radius=0))
    plans = small_plans(positive_fraction=0.67, tumour_fraction_of_positives=0.5)
    sampler = PatchSampler(open_cases(tmp_path, ["a", "b"]), plans)
    pairs = [sampler.sample(np.random.default_rng([1, k])) for k in range(600)]
    positive = np.mean([p.high_target[0].any() for p in pairs])
    assert abs(positive - 0.67) < 0.07
    for pair in pairs:
        assert pair.tumour_present == float(pair.high_target[1].any())
        assert pair.high_target.shape == (2, 20, 20, 20) and pair.low_target.shape == (1, 8, 8, 8)
    # Half the positives of case "a" are centred on its tumour, so tumour patches are common.
    assert np.mean([p.tumour_present for p in pairs if p.case_id == "a"]) > 0.25


def test_tumour_centred_pairs_contain_tumour(tmp_path):
    write_case(tmp_path, "a", kidney_label(tumour_radius=2))
    sampler = PatchSampler(open_cases(tmp_path, ["a"]), small_plans(positive_fraction=1.0,
                                                                     tumour_fraction_of_positives=1.0))
    assert all(sampler.sample(np.random.default_rng(k)).tumour_present == 1.0 for k in range(20))


def test_a_case_without_the_wanted_kind_gives_the_other(tmp_path):
    write_case(tmp_path, "empty", np.zeros((32, 32, 32), np.uint8))
    sampler = PatchSampler(open_cases(tmp_path, ["empty"]), small_plans(positive_fraction=1.0,
                                                                         tumour_fraction_of_positives=1.0))
    assert not any(sampler.sample(np.random.default_rng(k)).high_target.any() for k in range(10))


@pytest.mark.parametrize("exponent, share_of_big", [(None, 1 / 3), (0.0, 1 / 2), (1.0, 8**3 / (8**3 + 2**3))])
def test_tumour_volume_exponent_weights_which_case_a_tumour_draw_picks(tmp_path, exponent, share_of_big):
    write_case(tmp_path, "big", kidney_label(radius=10, tumour_radius=8))
    write_case(tmp_path, "small", kidney_label(radius=10, tumour_radius=2))
    free = kidney_label(radius=10)
    free[free == 2] = 1
    write_case(tmp_path, "free", free)
    plans = small_plans(positive_fraction=1.0, tumour_fraction_of_positives=1.0, tumour_volume_exponent=exponent)
    sampler = PatchSampler(open_cases(tmp_path, ["big", "small", "free"]), plans)
    cases = [sampler.sample(np.random.default_rng([3, k])).case_id for k in range(600)]
    # None: uniform over all three cases (the tumour-free one falls back to a kidney patch).
    assert abs(cases.count("big") / len(cases) - share_of_big) < 0.06
    assert ("free" in cases) is (exponent is None)


def test_sampling_is_a_function_of_the_generator_seed(tmp_path):
    write_case(tmp_path, "a", kidney_label())
    sampler = PatchSampler(open_cases(tmp_path, ["a"]), small_plans())
    first, second = (sampler.sample(np.random.default_rng(7)) for _ in range(2))
    assert first.low_start == second.low_start
    np.testing.assert_array_equal(first.high_image, second.high_image)


# --- cases --------------------------------------------------------------------------------

def test_open_cases_is_lazy_and_pickles_without_arrays(tmp_path):
    write_case(tmp_path, "a", kidney_label())
    (case,) = open_cases(tmp_path, ["a"])
    assert case._arrays == {}
    assert isinstance(case.high_label, np.memmap)
    clone = pickle.loads(pickle.dumps(case))
    assert clone._arrays == {} and clone.high_label.shape == (64, 64, 64)


@pytest.mark.parametrize("missing", ["low_label.npy", "properties.json"])
def test_a_missing_file_is_named(tmp_path, missing):
    write_case(tmp_path, "a", kidney_label())
    (tmp_path / "a" / missing).unlink()
    with pytest.raises(KitspipeError, match=missing):
        open_cases(tmp_path, ["a"])


def test_an_array_that_disagrees_with_its_grid_is_named(tmp_path):
    write_case(tmp_path, "a", kidney_label())
    np.save(tmp_path / "a" / "low_image.npy", np.zeros((3, 3, 3), np.int16))
    (case,) = open_cases(tmp_path, ["a"])
    with pytest.raises(KitspipeError, match="low_image.npy"):
        case.low_image
