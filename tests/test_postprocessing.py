import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from kitspipe.errors import PlanError
from kitspipe.postprocessing import (
    CONNECTIVITY,
    PostprocessingSettings,
    binarize,
    dilate_mm,
    drop_small_components,
    drop_unconnected_tumour,
    keep_largest_kidney_per_side,
    mask_with_low_resolution,
    postprocess,
    tumour_outside_kidney_region,
)

SHAPE = (12, 14, 40)  # x (axis 2) is the left-right axis; the midline is x = 19.5


def box(z, y, x, shape=SHAPE):
    mask = np.zeros(shape, dtype=bool)
    mask[z[0] : z[1], y[0] : y[1], x[0] : x[1]] = True
    return mask


RIGHT_KIDNEY = box((2, 10), (3, 11), (4, 12))
LEFT_KIDNEY = box((2, 10), (3, 11), (28, 36))


def read_only(array):
    array = np.array(array)
    array.setflags(write=False)
    return array


def test_binarize_is_strictly_above_the_threshold():
    assert binarize(np.array([0.2, 0.5, 0.51])).tolist() == [False, False, True]


def test_both_kidneys_kept_and_a_spurious_blob_removed():
    blob = box((5, 6), (5, 6), (15, 17))
    result = keep_largest_kidney_per_side(read_only(RIGHT_KIDNEY | LEFT_KIDNEY | blob))
    assert np.array_equal(result, RIGHT_KIDNEY | LEFT_KIDNEY)


def test_of_two_blobs_on_one_side_the_smaller_is_removed():
    smaller = box((2, 4), (3, 5), (14, 17))
    result = keep_largest_kidney_per_side(RIGHT_KIDNEY | smaller | LEFT_KIDNEY)
    assert np.array_equal(result, RIGHT_KIDNEY | LEFT_KIDNEY)


def test_single_kidney_is_kept_and_an_empty_mask_stays_empty():
    assert np.array_equal(keep_largest_kidney_per_side(LEFT_KIDNEY), LEFT_KIDNEY)
    assert not keep_largest_kidney_per_side(np.zeros(SHAPE, dtype=bool)).any()


def test_diagonal_contact_joins_components():
    corner = box((10, 11), (11, 12), (12, 13))  # touches RIGHT_KIDNEY only at a corner
    far = box((0, 1), (0, 1), (0, 1))
    result = keep_largest_kidney_per_side(RIGHT_KIDNEY | corner | far)
    assert np.array_equal(result, RIGHT_KIDNEY | corner)


def test_midline_can_be_given():
    # With the midline at x = 30 both kidneys lie on the right; only the larger stays.
    larger_left = LEFT_KIDNEY | box((2, 10), (3, 11), (36, 38))
    both = keep_largest_kidney_per_side(RIGHT_KIDNEY | larger_left)
    shifted = keep_largest_kidney_per_side(RIGHT_KIDNEY | larger_left, midline_x=38.5)
    assert np.array_equal(both, RIGHT_KIDNEY | larger_left)
    assert np.array_equal(shifted, larger_left)


def test_tumour_touching_the_kidney_is_kept_and_a_far_one_dropped():
    touching = box((4, 6), (11, 13), (6, 9))  # face-adjacent to RIGHT_KIDNEY at y = 11
    corner = box((10, 11), (11, 12), (36, 37))  # corner-adjacent to LEFT_KIDNEY
    inside = box((4, 6), (4, 6), (30, 32))
    far = box((0, 2), (0, 2), (18, 21))
    kidney = read_only(RIGHT_KIDNEY | LEFT_KIDNEY)
    result = drop_unconnected_tumour(read_only(touching | corner | inside | far), kidney)
    assert np.array_equal(result, touching | corner | inside)


def test_dilation_is_in_mm_on_an_anisotropic_grid():
    mask = np.zeros((9, 15, 15), dtype=bool)
    mask[4, 7, 7] = True
    spacing = (3.0, 1.0, 1.0)
    result = dilate_mm(read_only(mask), 6.0, spacing)
    z, y, x = np.indices(mask.shape)
    distance = np.sqrt(((z - 4) * 3.0) ** 2 + (y - 7) ** 2 + (x - 7) ** 2)
    assert np.array_equal(result, distance <= 6.0)
    assert result[2, 7, 7] and not result[1, 7, 7]  # 2 slices = 6 mm, 3 slices = 9 mm
    assert result[4, 7, 1] and not result[4, 7, 0]


@settings(max_examples=40, deadline=None)
@given(
    mask=arrays(bool, st.tuples(*[st.integers(1, 9)] * 3), elements=st.booleans()),
    radius=st.floats(0, 6),
    spacing=st.tuples(*[st.sampled_from([0.5, 0.8, 1.0, 2.5])] * 3),
)
def test_dilation_matches_a_distance_transform_of_the_whole_volume(mask, radius, spacing):
    expected = np.zeros(mask.shape, dtype=bool)
    if mask.any():
        expected = ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius + 1e-6
    assert np.array_equal(dilate_mm(mask, radius, spacing), expected)


def test_low_resolution_mask_keeps_only_nearby_voxels():
    low = np.zeros(SHAPE, dtype=bool)
    low[6, 7, 8] = True
    kidneys = read_only(RIGHT_KIDNEY | LEFT_KIDNEY)
    result = mask_with_low_resolution(kidneys, read_only(low), 2.0, (1.0, 1.0, 1.0))
    assert np.array_equal(result, (RIGHT_KIDNEY | LEFT_KIDNEY) & dilate_mm(low, 2.0, (1, 1, 1)))
    assert not result[..., 20:].any()
    assert not mask_with_low_resolution(RIGHT_KIDNEY, np.zeros(SHAPE, dtype=bool), 10.0, (1, 1, 1)).any()


def scene():
    """Probabilities with two kidneys, a spurious kidney blob, a touching and a far tumour."""
    blob = box((5, 6), (5, 6), (15, 17))
    tumour_near = box((4, 6), (11, 13), (6, 9))
    tumour_far = box((0, 2), (0, 2), (30, 33))
    tumour_left = box((4, 6), (11, 13), (32, 35))  # touches the left kidney, far from the low-res mask
    probabilities = np.zeros((2, *SHAPE), dtype=np.float32)
    probabilities[0][RIGHT_KIDNEY | LEFT_KIDNEY | blob] = 0.9
    probabilities[0][tumour_near] = 0.4  # the kidney channel missed the tumour bulge
    probabilities[1][tumour_near | tumour_far | tumour_left] = 0.8
    probabilities[0, 0, 0, 0] = 0.5  # exactly at the threshold: background
    low = np.zeros(SHAPE, dtype=np.float32)
    low[RIGHT_KIDNEY | tumour_near | blob | tumour_far] = 0.7  # the left kidney is missed here
    parts = dict(blob=blob, near=tumour_near, far=tumour_far, left=tumour_left)
    return probabilities, low, parts


def test_postprocess_applies_all_steps():
    probabilities, low, parts = scene()
    # Far from the low-res mask by more than 3 mm is removed: most of the left kidney.
    settings_ = PostprocessingSettings(low_resolution_dilation_mm=3.0)
    labels = postprocess(read_only(probabilities), (1.0, 1.0, 1.0), settings_, read_only(low))
    assert labels.dtype == np.uint8
    region = RIGHT_KIDNEY | parts["near"]
    near_low = dilate_mm(low > 0.5, 3.0, (1, 1, 1))
    expected = np.zeros(SHAPE, dtype=np.uint8)
    expected[(region | LEFT_KIDNEY | parts["left"]) & near_low] = 1
    expected[parts["near"]] = 2
    assert not (parts["left"] & near_low).any()
    assert np.array_equal(labels, expected)


@pytest.mark.parametrize(
    "switch", ["keep_largest_kidney_per_side", "drop_unconnected_tumour", "low_resolution_mask"]
)
def test_each_switch_only_skips_its_own_step(switch):
    probabilities, low, parts = scene()
    spacing = (1.0, 1.0, 1.0)
    settings_on = PostprocessingSettings(low_resolution_dilation_mm=3.0)
    settings_off = PostprocessingSettings(low_resolution_dilation_mm=3.0, **{switch: False})
    on = postprocess(probabilities, spacing, settings_on, low)
    off = postprocess(probabilities, spacing, settings_off, low)
    changed = on != off
    if switch == "keep_largest_kidney_per_side":
        assert np.array_equal(changed, parts["blob"]) and np.all(off[parts["blob"]] == 1)
    elif switch == "drop_unconnected_tumour":
        assert np.array_equal(changed, parts["far"]) and np.all(off[parts["far"]] == 2)
    else:
        outside = ~dilate_mm(low > 0.5, 3.0, spacing)
        assert np.all(off[LEFT_KIDNEY] == 1) and np.all(off[parts["left"]] == 2)
        assert np.array_equal(changed, (LEFT_KIDNEY | parts["left"]) & outside)


def test_all_switches_off_is_plain_thresholding():
    probabilities, _, _ = scene()
    plain = PostprocessingSettings(
        keep_largest_kidney_per_side=False, drop_unconnected_tumour=False, low_resolution_mask=False
    )
    labels = postprocess(probabilities, (1.0, 1.0, 1.0), plain)
    expected = ((probabilities[0] > 0.5) | (probabilities[1] > 0.5)).astype(np.uint8)
    expected[probabilities[1] > 0.5] = 2
    assert np.array_equal(labels, expected)


def test_missing_or_misshaped_low_resolution_input_is_an_error():
    probabilities, low, _ = scene()
    with pytest.raises(ValueError, match="no low-resolution"):
        postprocess(probabilities, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="not on the grid"):
        postprocess(probabilities, (1.0, 1.0, 1.0), low_res_probability=low[:-1])


@settings(max_examples=30, deadline=None)
@given(probabilities=arrays(np.float32, (2, 6, 7, 8), elements=st.sampled_from([0.1, 0.9])))
def test_kept_region_has_at_most_one_component_per_side(probabilities):
    settings_ = PostprocessingSettings(low_resolution_mask=False)
    labels = postprocess(probabilities, (1.0, 1.0, 1.0), settings_)
    _, n = ndimage.label(labels > 0, structure=CONNECTIVITY)
    assert n <= 2
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_settings_round_trip_and_validation():
    settings_ = PostprocessingSettings(threshold=0.4, low_resolution_mask=False)
    assert PostprocessingSettings.from_dict(settings_.to_dict()) == settings_
    with pytest.raises(PlanError, match="thresold"):
        PostprocessingSettings.from_dict({"thresold": 0.5})
    for bad in [
        dict(threshold=1.0),
        dict(low_resolution_dilation_mm=-1.0),
        dict(drop_unconnected_tumour="yes"),
        dict(min_tumour_volume_ml=-0.5),
        dict(min_tumour_fraction_in_kidney_region=1.5),
    ]:
        with pytest.raises(PlanError):
            PostprocessingSettings(**bad)


def test_functions_return_new_arrays():
    mask = read_only(RIGHT_KIDNEY | LEFT_KIDNEY)
    results = [
        keep_largest_kidney_per_side(mask),
        drop_unconnected_tumour(mask, mask),
        dilate_mm(mask, 0.0, (1, 1, 1)),
        drop_small_components(mask, 0.0, (1, 1, 1)),
        drop_small_components(mask, 0.1, (1, 1, 1)),
        tumour_outside_kidney_region(mask, mask, 0.5),
        tumour_outside_kidney_region(mask, mask, 0.0),
    ]
    for result in results:
        assert result is not mask and not np.shares_memory(result, mask)


@pytest.mark.parametrize("mask_first", [True, False])
def test_low_resolution_mask_first_saves_a_kidney_beaten_by_a_larger_false_blob(mask_first):
    # Seen in the demo: a false blob at the body wall, larger than the real right kidney, wins
    # "keep the largest" on that side; masking last then removes it and the kidney is lost.
    big_blob = box((0, 12), (0, 14), (0, 3))
    big_blob |= box((0, 12), (12, 14), (3, 19))
    assert big_blob.sum() > RIGHT_KIDNEY.sum()
    probabilities = np.zeros((2, *SHAPE), dtype=np.float32)
    probabilities[0][RIGHT_KIDNEY | LEFT_KIDNEY | big_blob] = 0.9
    low = np.zeros(SHAPE, dtype=np.float32)
    low[RIGHT_KIDNEY | LEFT_KIDNEY] = 0.9
    settings_ = PostprocessingSettings(low_resolution_dilation_mm=0.0, low_resolution_mask_first=mask_first)
    labels = postprocess(probabilities, (1.0, 1.0, 1.0), settings_, low)
    assert np.array_equal(labels[LEFT_KIDNEY], np.ones(LEFT_KIDNEY.sum()))
    assert not labels[big_blob].any()
    assert bool(labels[RIGHT_KIDNEY].all()) is mask_first
    if not mask_first:
        assert not labels[RIGHT_KIDNEY].any()


def test_small_components_are_dropped_by_physical_volume():
    big, small = box((1, 4), (1, 4), (1, 4)), box((1, 3), (8, 10), (30, 32))  # 27 and 8 voxels
    mask = big | small
    # 2 × 1 × 1 mm voxels: 54 and 16 mm³.
    assert np.array_equal(drop_small_components(mask, 0.02, (2.0, 1.0, 1.0)), big)
    assert np.array_equal(drop_small_components(mask, 0.016, (2.0, 1.0, 1.0)), mask)
    assert not drop_small_components(mask, 0.06, (2.0, 1.0, 1.0)).any()


def test_min_tumour_volume_turns_a_small_tumour_inside_the_kidney_into_kidney():
    probabilities = np.full((2, *SHAPE), 0.1, dtype=np.float32)
    probabilities[0][RIGHT_KIDNEY | LEFT_KIDNEY] = 0.9
    large, small = box((3, 7), (4, 8), (5, 9)), box((4, 6), (5, 7), (30, 32))  # 64 and 8 voxels
    probabilities[1][large | small] = 0.9
    settings_ = PostprocessingSettings(low_resolution_mask=False, min_tumour_volume_ml=0.01)
    labels = postprocess(probabilities, (1.0, 1.0, 1.0), settings_)
    assert np.all(labels[large] == 2) and np.all(labels[small] == 1)
    assert np.array_equal(labels > 0, RIGHT_KIDNEY | LEFT_KIDNEY)


def test_tumour_components_outside_the_kidney_channel_become_background():
    # Seen in the demo: false tumours beside the kidney that the kidney ∪ tumour channel covers
    # only half of; the true tumour lies inside it.
    probabilities = np.full((2, *SHAPE), 0.1, dtype=np.float32)
    probabilities[0][RIGHT_KIDNEY | LEFT_KIDNEY] = 0.9
    inside = box((3, 7), (4, 8), (5, 9))                  # in the right kidney
    z, y, x = np.nonzero(LEFT_KIDNEY)
    half_out = box((z.min(), z.min() + 4), (y.max() - 1, y.max() + 3), (x.min(), x.min() + 4))
    assert 0.3 < (half_out & LEFT_KIDNEY).sum() / half_out.sum() < 0.7
    probabilities[1][inside | half_out] = 0.9
    kept = postprocess(probabilities, (1.0, 1.0, 1.0), PostprocessingSettings(low_resolution_mask=False))
    assert np.all(kept[inside] == 2) and np.all(kept[half_out] == 2)
    settings_ = PostprocessingSettings(low_resolution_mask=False, min_tumour_fraction_in_kidney_region=0.7)
    labels = postprocess(probabilities, (1.0, 1.0, 1.0), settings_)
    assert np.all(labels[inside] == 2)
    assert not labels[half_out].any()  # tumour and kidney alike: the kidney channel there was part of it
    assert np.array_equal(labels > 0, (RIGHT_KIDNEY | LEFT_KIDNEY) & ~half_out)


def test_share_of_a_component_in_the_kidney_region_decides():
    tumour = np.zeros((1, 1, 8), dtype=bool)
    tumour[0, 0] = [0, 1, 1, 0, 0, 1, 1, 1]
    kidney = np.zeros_like(tumour)
    kidney[0, 0, :6] = True  # 2 of 2 and 1 of 3 voxels inside
    assert np.array_equal(tumour_outside_kidney_region(tumour, kidney, 0.7)[0, 0], [0, 0, 0, 0, 0, 1, 1, 1])
    assert np.array_equal(tumour_outside_kidney_region(tumour, kidney, 0.3), np.zeros_like(tumour))
    assert not tumour_outside_kidney_region(tumour, kidney, 0.0).any()
