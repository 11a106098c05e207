import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kitspipe.geometry import CanonicalGeometry
from kitspipe.resampling import (Box, body_box, continuous_index, plan_grids, resample, resample_in_slabs,
                                 world_position)

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _ellipsoid(shape, spacing, radii_mm, centre_mm=(0, 0, 0)):
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    return (((z - centre_mm[0]) / radii_mm[0]) ** 2 + ((y - centre_mm[1]) / radii_mm[1]) ** 2
            + ((x - centre_mm[2]) / radii_mm[2]) ** 2 < 1).astype(np.uint8)


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("spacing", [(3.0, 0.8, 0.8), (5.0, 0.7, 0.7), (1.0, 0.9, 0.9), (2.5, 1.7, 1.7)])
def test_kidney_sized_label_survives_1mm_round_trip(spacing):
    shape = tuple(int(round(140 / s)) for s in spacing)
    grid = CanonicalGeometry(shape, spacing, (-12.0, 30.0, 7.0), IDENTITY)
    label = _ellipsoid(shape, spacing, (50, 28, 22))
    high, low = plan_grids(grid, Box((0, 0, 0), shape), (1.0, 1.0, 1.0), 4)
    fine = resample(label, grid, high, "nearest", dtype=np.uint8)
    back = resample(fine, high, grid, "nearest", dtype=np.uint8)
    assert _dice(back, label) >= 0.98


def test_grids_share_the_physical_box_and_nest_exactly():
    grid = CanonicalGeometry((30, 50, 60), (3.0, 0.8, 0.8), (5.0, -7.0, 11.0), IDENTITY)
    box = Box((2, 3, 4), (28, 47, 55))
    high, low = plan_grids(grid, box, (1.0, 1.0, 1.0), 4)
    assert all(h == 4 * l for h, l in zip(high.shape, low.shape))
    corner = world_position(grid, np.asarray(box.start) - 0.5)
    assert np.allclose(world_position(high, np.full(3, -0.5)), corner)
    assert np.allclose(world_position(low, np.full(3, -0.5)), corner)
    # Low voxel k spans exactly high voxels 4k .. 4k+3: its centre is their centre.
    assert np.allclose(world_position(low, np.array([2, 3, 4])), world_position(high, np.array([9.5, 13.5, 17.5])))
    extent = np.asarray(box.shape) * np.asarray(grid.spacing)
    assert np.all(np.asarray(high.shape) >= extent) and np.all(np.asarray(high.shape) < extent + 4)


def test_resampling_is_deterministic_and_keeps_intensities():
    grid = CanonicalGeometry((20, 30, 30), (3.0, 1.5, 1.5), (0.0, 0.0, 0.0), IDENTITY)
    rng = np.random.default_rng(0)
    image = np.full(grid.shape, 100.0, np.float32) + rng.normal(0, 1, grid.shape).astype(np.float32)
    high, _ = plan_grids(grid, Box((0, 0, 0), grid.shape), (1.0, 1.0, 1.0), 4)
    first = resample(image, grid, high, "cubic", default=-1000)
    second = resample(image, grid, high, "cubic", default=-1000)
    assert np.array_equal(first, second)
    inner = first[6:-6, 6:-6, 6:-6]
    assert abs(float(inner.mean()) - 100.0) < 0.5


def test_body_box_includes_labels_outside_body():
    image = np.full((10, 10, 10), -1000.0)
    image[2:5, 3:6, 4:8] = 40
    label = np.zeros((10, 10, 10), np.uint8)
    label[7, 7, 7] = 1
    assert body_box(image).start == (2, 3, 4) and body_box(image).stop == (5, 6, 8)
    assert body_box(image, label).stop == (8, 8, 8)


def _ct_like(shape, seed):
    """Soft tissue with noise, a bright bone-like block and air around: sharp edges are where a
    slab cut would show."""
    rng = np.random.default_rng(seed)
    image = np.full(shape, -1000.0, np.float32)
    inner = tuple(slice(1, max(2, n - 1)) for n in shape)
    image[inner] = 40 + rng.normal(0, 30, image[inner].shape)
    image[tuple(slice(n // 3, max(n // 3 + 1, n // 2)) for n in shape)] = 900
    return image


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(st.integers(3, 24), st.integers(8, 40), st.integers(8, 40)),
       spacing=st.tuples(st.sampled_from([0.7, 1.0, 2.5, 5.0]), st.sampled_from([0.6, 0.8, 1.3]),
                         st.sampled_from([0.6, 0.8, 1.3])),
       target_spacing=st.sampled_from([1.0, 2.0, 4.0]), shift=st.floats(-6.0, 6.0),
       slab_voxels=st.integers(1, 6000), seed=st.integers(0, 1000))
def test_slabs_give_the_whole_volume_resample(shape, spacing, target_spacing, shift, slab_voxels, seed):
    # Slab by slab with context rows: the same HU to well under the 0.5 HU int16 storage rounds
    # away, everywhere (target voxels outside the source included), whatever the slab size.
    source = CanonicalGeometry(shape, spacing, (3.0, -2.0, 5.0), IDENTITY)
    target_shape = tuple(max(1, int(n * s / target_spacing)) + 2 for n, s in zip(shape, spacing))
    target = CanonicalGeometry(target_shape, (target_spacing,) * 3, (3.0 + shift, -2.0 - shift, 5.0), IDENTITY)
    image = _ct_like(shape, seed)
    whole = resample(image, source, target, "cubic", default=-1000)
    slabs = resample_in_slabs(image, source, target, "cubic", default=-1000, slab_voxels=slab_voxels)
    assert slabs.dtype == np.float32 and slabs.shape == whole.shape
    # A voxel centre exactly on the source's outer edge is inside or outside by float rounding,
    # which may go either way in the two computations; every other voxel must agree.
    on_edge = np.zeros(target_shape, dtype=bool)
    for axis in range(3):
        index = (target.origin[2 - axis] + np.arange(target_shape[axis]) * target_spacing
                 - source.origin[2 - axis]) / spacing[axis]
        edge = (np.abs(index + 0.5) < 1e-6) | (np.abs(index - (shape[axis] - 0.5)) < 1e-6)
        on_edge |= edge.reshape([-1 if a == axis else 1 for a in range(3)])
    assert np.abs(slabs - whole)[~on_edge].max() <= 0.01


def test_slabs_store_the_finished_values_in_the_requested_dtype():
    source = CanonicalGeometry((12, 30, 28), (2.5, 0.8, 0.8), (0.0, 0.0, 0.0), IDENTITY)
    high, _ = plan_grids(source, Box((0, 0, 0), source.shape), (1.0, 1.0, 1.0), 4)
    image = np.rint(_ct_like(source.shape, 3))
    stored = image.astype(np.int16)  # what a CT file holds; preprocessing no longer widens it

    def finish(values):
        return np.rint(np.clip(values, -500, 400))

    expected = finish(resample(image, source, high, "cubic", default=-1000)).astype(np.int16)
    result = resample_in_slabs(stored, source, high, "cubic", default=-1000, dtype=np.int16, finish=finish,
                               slab_voxels=2000)
    assert result.dtype == np.int16
    # Only rounding ties can differ, by one HU.
    assert np.abs(result.astype(int) - expected).max() <= 1
    assert (result != expected).mean() < 1e-3
    label = (image > 500).astype(np.uint8)
    assert np.array_equal(resample_in_slabs(label, source, high, "nearest", dtype=np.uint8, slab_voxels=2000),
                          resample(label, source, high, "nearest", dtype=np.uint8))


def test_grids_of_different_directions_are_resampled_whole():
    tilted = (1.0, 0.0, 0.0, 0.0, 0.96, -0.28, 0.0, 0.28, 0.96)
    source = CanonicalGeometry((10, 20, 20), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), tilted)
    target = CanonicalGeometry((20, 20, 20), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY)
    image = _ct_like(source.shape, 5)
    assert np.array_equal(resample_in_slabs(image, source, target, "cubic", default=-1000, slab_voxels=500),
                          resample(image, source, target, "cubic", default=-1000))


@settings(max_examples=30, deadline=None)
@given(origin=st.tuples(*[st.floats(-50, 50)] * 3), index=st.tuples(*[st.floats(-5, 40)] * 3))
def test_continuous_index_inverts_world_position(origin, index):
    grid = CanonicalGeometry((10, 20, 30), (2.5, 0.7, 0.9), origin, (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0))
    assert np.allclose(continuous_index(grid, world_position(grid, np.asarray(index))), index, atol=1e-9)


def test_a_slab_beyond_the_source_gets_the_finished_default():
    source = CanonicalGeometry((6, 10, 10), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), IDENTITY)
    # 40 rows of 1 mm along z where the source covers 12: most slabs lie wholly beyond it.
    target = CanonicalGeometry((40, 6, 6), (1.0, 1.0, 1.0), (0.0, 2.0, 2.0), IDENTITY)
    image = np.full(source.shape, 50.0, np.float32)

    def clip(values):
        return np.clip(values, -500, 400)

    slabs = resample_in_slabs(image, source, target, "cubic", default=-1000, finish=clip, slab_voxels=100)
    assert np.array_equal(slabs, clip(resample(image, source, target, "cubic", default=-1000)))
    assert slabs[-1].max() == -500  # clipped like every other air voxel, not the raw default


def test_a_small_source_is_resampled_whole_by_default(monkeypatch):
    import kitspipe.resampling as resampling

    source = CanonicalGeometry((12, 100, 28), (2.5, 0.8, 0.8), (0.0, 0.0, 0.0), IDENTITY)
    high, _ = plan_grids(source, Box((0, 0, 0), source.shape), (1.0, 1.0, 1.0), 4)
    image = _ct_like(source.shape, 4)
    whole = resample(image, source, high, "cubic", default=-1000)
    assert np.array_equal(resample_in_slabs(image, source, high, "cubic", default=-1000), whole)
    calls = []
    real = resampling._resampled_image
    monkeypatch.setattr(resampling, "_resampled_image", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(resampling, "WHOLE_VOLUME_VOXELS", 1000)
    slabs = resample_in_slabs(image, source, high, "cubic", default=-1000)
    assert len(calls) > 2 and all(shape[1] < source.shape[1] for shape in calls)  # slabs along y, the longest
    assert np.abs(slabs - whole).max() <= 0.01
