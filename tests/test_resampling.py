import numpy as np
import pytest

from kitspipe.geometry import CanonicalGeometry
from kitspipe.resampling import Box, body_box, plan_grids, resample, world_position

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
