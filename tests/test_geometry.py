import itertools

import numpy as np
import SimpleITK as sitk
from hypothesis import given, settings, strategies as st

from kitspipe.geometry import Geometry
from kitspipe.imageio import array_to_source_image, read_volume, to_canonical, write_image_atomic

PERMUTATIONS = list(itertools.permutations(range(3)))


def _image(permutation, signs, spacing, origin, shape=(5, 6, 7), seed=0):
    matrix = np.zeros((3, 3))
    for index_axis, world_axis in enumerate(permutation):
        matrix[world_axis, index_axis] = signs[index_axis]
    array = np.random.default_rng(seed).random(shape).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(matrix.ravel()))
    return image, array


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(PERMUTATIONS), st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3),
       st.tuples(*[st.floats(0.3, 5.0)] * 3), st.tuples(*[st.floats(-200, 200)] * 3))
def test_canonical_array_keeps_every_voxel_at_its_world_position(permutation, signs, spacing, origin):
    image, array = _image(permutation, signs, spacing, origin)
    volume = to_canonical(image)
    canonical = volume.grid.to_sitk(volume.array)
    assert np.allclose(np.asarray(volume.grid.direction).reshape(3, 3), np.eye(3))
    for index in [(0, 0, 0), (1, 2, 3), tuple(s - 1 for s in canonical.GetSize())]:
        point = canonical.TransformIndexToPhysicalPoint(index)
        source_index = image.TransformPhysicalPointToIndex(point)
        assert canonical.GetPixel(index) == image.GetPixel(source_index)
    back = array_to_source_image(volume.array, volume.source, volume.reorientation)
    assert np.array_equal(sitk.GetArrayFromImage(back), array)
    assert Geometry.of(back) == Geometry.of(image)


def test_kits_orientation_becomes_z_y_x(tmp_path):
    # KiTS19: ITK index 0 is the slice axis pointing to -z (inferior), index 2 points to +x.
    image, _ = _image((2, 1, 0), (-1.0, 1.0, 1.0), (3.0, 0.8, 0.8), (0.0, 0.0, 0.0), shape=(4, 5, 6))
    path = tmp_path / "kits.nii.gz"
    write_image_atomic(image, path)
    volume = read_volume(path)
    assert volume.array.shape == (6, 5, 4)  # (slices, rows, cols)
    assert np.allclose(volume.grid.spacing, (3.0, 0.8, 0.8))
    assert not list(tmp_path.glob(".tmp-*"))


def test_oblique_direction_keeps_residual_rotation():
    angle = np.deg2rad(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32))
    image.SetDirection(tuple(rotation.ravel()))
    volume = to_canonical(image)
    assert np.allclose(np.asarray(volume.grid.direction).reshape(3, 3), rotation)


def test_geometry_differences_tolerate_float32_noise_only():
    a = Geometry((4, 4, 4), (0.705078125, 0.7, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    b = Geometry((4, 4, 4), (0.7050781, 0.7, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert a.differences(b) == []
    shifted = Geometry((4, 4, 4), a.spacing, (100.0, 0.0, 0.0), a.direction)
    assert any("origin" in d for d in a.differences(shifted))
    flipped = Geometry((4, 4, 4), a.spacing, a.origin, (-1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert any("direction" in d for d in a.differences(flipped))
