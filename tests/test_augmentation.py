"""Augmentation: one physical transform for both resolutions, exact identity, intensity parts."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage
from hypothesis import given, settings
from hypothesis import strategies as st

from kitspipe.data.augmentation import AugmentationParameters, Augmenter, cubic_bspline, make_augmenter, trilinear
from kitspipe.data.patch_geometry import PairGeometry, Window
from kitspipe.plans import AugmentationPlan, load_preset

SCALE = 4


def pair_windows(geometry: PairGeometry, high: dict, low: dict, low_start) -> dict[str, Window]:
    """The four boxes of a pair, read from in-memory arrays at 1 mm and 4 mm."""
    g = geometry
    return {
        "high_image": Window(high["image"], g.high_start(low_start), g.high_input, g.high_spacing_mm, -500, False),
        "low_image": Window(low["image"], low_start, g.low_input, g.low_spacing_mm, -500, False),
        "high_label": Window(high["label"], g.high_output_start(low_start), g.high_output, g.high_spacing_mm, 0, True),
        "low_label": Window(low["label"], g.low_output_start(low_start), g.low_output, g.low_spacing_mm, 0, True),
    }


def random_pair(seed=0):
    """Random HU and labels on a 48³ 1 mm grid and its 12³ 4 mm grid, with small patches."""
    rng = np.random.default_rng(seed)
    geometry = PairGeometry(SCALE, (24,) * 3, (8,) * 3, (10,) * 3, (2,) * 3, (1.0,) * 3, (4.0,) * 3)
    high = {"image": rng.integers(-500, 400, (48,) * 3).astype(np.int16),
            "label": rng.integers(0, 3, (48,) * 3).astype(np.uint8)}
    low = {"image": rng.integers(-500, 400, (12,) * 3).astype(np.int16),
           "label": rng.integers(0, 3, (12,) * 3).astype(np.uint8)}
    return geometry, pair_windows(geometry, high, low, (1, 2, 0))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


# --- the acceptance criterion -------------------------------------------------------------

class TestSphereAlignment:
    """A sphere at 1 mm and 4 mm: the 4 mm output label, upsampled, must match the 1 mm one."""

    # Depth-1 valid sizes; the 4 mm output (120 mm) covers the 1 mm output (116 mm).
    high_input, high_output, low_input, low_output = 132, 116, 46, 30
    geometry = PairGeometry(SCALE, (high_input,) * 3, (high_output,) * 3, (low_input,) * 3, (low_output,) * 3,
                            (1.0,) * 3, (4.0,) * 3)
    # Off the patch centre, so that rotating the two resolutions differently would separate them.
    centre_mm = np.array([92.0, 70.0, 88.0])
    radius_mm = 35.0

    def sphere(self, n: int, spacing: float) -> np.ndarray:
        c = (np.arange(n) + 0.5) * spacing
        d2 = sum((axis - centre) ** 2 for axis, centre in
                 zip((c[:, None, None], c[None, :, None], c[None, None, :]), self.centre_mm))
        return (d2 <= self.radius_mm**2).astype(np.uint8)

    def windows(self):
        high = {"image": np.zeros((1, 1, 1), np.int16), "label": self.sphere(160, 1.0)}
        low = {"image": np.zeros((1, 1, 1), np.int16), "label": self.sphere(40, 4.0)}
        low_start = self.geometry.low_start_centred_on((80, 80, 80))
        windows = pair_windows(self.geometry, high, low, low_start)
        return {name: windows[name] for name in ("high_label", "low_label")}

    def overlap_dice(self, high_label: np.ndarray, low_label: np.ndarray) -> float:
        upsampled = low_label.repeat(SCALE, 0).repeat(SCALE, 1).repeat(SCALE, 2)
        m = (upsampled.shape[0] - self.high_output) // 2
        return dice(upsampled[m:m + self.high_output, m:m + self.high_output, m:m + self.high_output] > 0,
                    high_label > 0)

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_rotated_scaled_and_deformed_labels_stay_aligned(self, seed):
        augmenter = Augmenter(AugmentationPlan(elastic_probability=1.0), (float(self.high_input),) * 3)
        elastic = augmenter.sample_parameters(np.random.default_rng(seed)).elastic_mm
        params = AugmentationParameters(rotation_rad=(np.deg2rad(5.0),) * 3, scale=1.05, elastic_mm=elastic)
        out = augmenter.apply(params, self.windows())
        assert self.overlap_dice(out["high_label"], out["low_label"]) >= 0.9

    def test_the_check_detects_transforms_drawn_per_resolution(self):
        augmenter = Augmenter(AugmentationPlan(elastic_probability=1.0), (float(self.high_input),) * 3)
        windows = self.windows()
        first, second = (replace_rotation(augmenter.sample_parameters(np.random.default_rng(s)), sign)
                         for s, sign in ((0, 1.0), (1, -1.0)))
        high = augmenter.warp(first, windows["high_label"])
        low = augmenter.warp(second, windows["low_label"])
        assert self.overlap_dice(high, low) < 0.87


def replace_rotation(params: AugmentationParameters, sign: float) -> AugmentationParameters:
    return AugmentationParameters(rotation_rad=(sign * np.deg2rad(5.0),) * 3, elastic_mm=params.elastic_mm)


# --- exactness of the spatial part --------------------------------------------------------

def test_identity_parameters_give_the_unaugmented_patches_exactly():
    _, windows = random_pair()
    augmenter = Augmenter(AugmentationPlan(), (24.0,) * 3)
    out = augmenter.apply(AugmentationParameters(), windows)
    for name, window in windows.items():
        expected = window.read()
        assert out[name].dtype == (expected.dtype if window.is_label else np.float32)
        np.testing.assert_array_equal(out[name], expected)


def test_resampling_with_an_identity_transform_reproduces_the_patch():
    _, windows = random_pair(1)
    augmenter = Augmenter(AugmentationPlan(), (24.0,) * 3)
    for window in windows.values():
        warped = augmenter.warp(AugmentationParameters(), window)
        # Positions are float32 (grid_sample's input): within 0.01 HU of neighbours 900 HU apart.
        np.testing.assert_allclose(warped, window.read(), atol=1e-2)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), shape=st.tuples(*[st.integers(3, 12)] * 3))
def test_trilinear_agrees_with_scipys_linear_interpolation(seed, shape):
    # grid_sample with align_corners=True is map_coordinates(order=1) inside the region.
    rng = np.random.default_rng(seed)
    region = rng.integers(-1000, 1000, shape).astype(np.int16)
    positions = rng.uniform(0, np.asarray(shape) - 1, size=(5, 6, 7, 3))  # z, y, x
    expected = ndimage.map_coordinates(region.astype(np.float64), positions.transpose(3, 0, 1, 2), order=1)
    # grid_sample's units: -1 and 1 are the first and last voxel centres; x, y, z order.
    normalised = positions / (np.asarray(shape) - 1) * 2.0 - 1.0
    grid = np.ascontiguousarray(normalised[..., ::-1], dtype=np.float32)
    np.testing.assert_allclose(trilinear(region, grid), expected, atol=2e-2)


@pytest.mark.parametrize("elastic", [False, True])
def test_a_warped_image_is_linear_interpolation_at_its_source_positions(elastic):
    # The normalisation folded into the grid, the source region's margins and grid_sample
    # together, against scipy in float64. Without the elastic field the bounds are tight, so a
    # region one voxel short at its high side (where the stencil reaches) shows here.
    _, windows = random_pair(4)
    augmenter = Augmenter(AugmentationPlan(elastic_magnitude_mm=2.0), (24.0,) * 3)
    field = np.random.default_rng(4).normal(0.0, 2.0, (3, 10, 10, 10)) if elastic else None
    params = AugmentationParameters(rotation_rad=(0.08, -0.05, 0.07), scale=1.04, elastic_mm=field)
    window = windows["high_image"]
    positions = augmenter.source_positions(params, window).grid(np.ones(3), np.zeros(3))
    assert np.abs(positions - np.rint(positions)).max() > 0.1  # really between voxels
    expected = ndimage.map_coordinates(window.array.astype(np.float64), positions[..., ::-1].transpose(3, 0, 1, 2),
                                       order=1)
    np.testing.assert_allclose(augmenter.warp(params, window), expected, atol=2e-2)


def test_a_quarter_turn_about_z_is_a_rotation_of_the_array():
    _, windows = random_pair(2)
    augmenter = Augmenter(AugmentationPlan(), (24.0,) * 3)
    params = AugmentationParameters(rotation_rad=(np.pi / 2, 0.0, 0.0))
    for window in windows.values():
        expected = np.rot90(window.read(), k=-1, axes=(1, 2))
        np.testing.assert_allclose(augmenter.warp(params, window), expected, atol=1e-2)


def test_mirroring_flips_left_right_only():
    _, windows = random_pair(3)
    out = Augmenter(AugmentationPlan(), (24.0,) * 3).apply(AugmentationParameters(mirror=True), windows)
    for name, window in windows.items():
        np.testing.assert_array_equal(out[name], np.flip(window.read(), axis=2))


# --- intensity ----------------------------------------------------------------------------

def test_hu_shift_is_added_to_both_images_and_not_to_labels():
    _, windows = random_pair(4)
    out = Augmenter(AugmentationPlan(), (24.0,) * 3).apply(AugmentationParameters(hu_shift=30.0), windows)
    for name, window in windows.items():
        expected = window.read() + (0 if window.is_label else 30)
        np.testing.assert_array_equal(out[name], expected)


def test_noise_is_reproducible_and_leaves_the_global_generators_alone():
    _, windows = random_pair(5)
    augmenter = Augmenter(AugmentationPlan(), (24.0,) * 3)
    params = AugmentationParameters(noise_std_hu=10.0, noise_seed=123)
    numpy_state, python_state = np.random.get_state()[1].copy(), random.getstate()
    first, second = augmenter.apply(params, windows), augmenter.apply(params, windows)
    assert np.array_equal(np.random.get_state()[1], numpy_state) and random.getstate() == python_state
    for name in ("high_image", "low_image"):
        np.testing.assert_array_equal(first[name], second[name])
        noise = first[name] - windows[name].read()
        assert abs(noise.mean()) < 1.5 and 8.5 < noise.std() < 11.5
    np.testing.assert_array_equal(first["high_label"], windows["high_label"].read())


# --- parameters ---------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_parameters_are_within_the_plan_ranges_and_reproducible(seed):
    plan = AugmentationPlan(elastic_probability=0.5, mirror_left_right=True)
    augmenter = Augmenter(plan, (64.0,) * 3)
    params = augmenter.sample_parameters(np.random.default_rng(seed))
    again = augmenter.sample_parameters(np.random.default_rng(seed))
    assert params.rotation_rad == again.rotation_rad and params.noise_seed == again.noise_seed
    assert all(abs(a) <= np.deg2rad(plan.rotation_degrees) for a in params.rotation_rad)
    assert abs(params.scale - 1.0) <= plan.scale_range
    assert abs(params.hu_shift) <= plan.hu_shift_range
    assert params.noise_std_hu in (0.0, plan.noise_std_hu)
    if params.elastic_mm is not None:
        assert params.elastic_mm.shape == (3, 10, 10, 10)
        np.testing.assert_array_equal(params.elastic_mm, again.elastic_mm)


def test_disabled_spatial_parts_skip_resampling():
    plan = AugmentationPlan(elastic_probability=0.0, scale_range=0.0, rotation_degrees=0.0)
    augmenter = Augmenter(plan, (64.0,) * 3)
    assert all(augmenter.sample_parameters(np.random.default_rng(k)).spatial_is_identity for k in range(20))
    disabled = load_preset("cpu")
    disabled = replace(disabled, augmentation=replace(disabled.augmentation, enabled=False))
    assert make_augmenter(disabled) is None


def test_elastic_rms_displacement_equals_the_plan_magnitude():
    plan = AugmentationPlan(elastic_probability=1.0, elastic_magnitude_mm=4.0)
    augmenter = Augmenter(plan, (100.0,) * 3)
    # Interior of the control grid, away from the fade-out at its border.
    axes = [np.linspace(-25.0, 25.0, 21)] * 3
    fields = [augmenter.displacement_mm(augmenter.sample_parameters(np.random.default_rng(k)).elastic_mm, axes)
              for k in range(40)]
    rms = float(np.sqrt(np.mean(np.square(fields))))
    assert 3.4 < rms < 4.6


def test_cubic_bspline_is_a_partition_of_unity():
    t = np.linspace(0.0, 1.0, 11)
    total = sum(cubic_bspline(t - j) for j in range(-2, 4))
    np.testing.assert_allclose(total, 1.0)
