"""Fast-mode inference restricted to the low-resolution kidney mask gives the same labels."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kitspipe.inference.predictor as predictor
from kitspipe.inference.predictor import low_resolution_on_high, predict_volume
from kitspipe.inference.region_of_interest import fine_region, low_resolution_region, region_applies
from kitspipe.plans import load_preset
from kitspipe.postprocessing import PostprocessingSettings, dilate_mm, postprocess
from kitspipe.resampling import Box
from kitspipe.trainers.builtin import build_dual_network
from test_inference import _plans, _randomised


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(*[st.integers(4, 30)] * 3), spacing=st.tuples(*[st.sampled_from([0.8, 1.0, 2.5, 4.0])] * 3),
       dilation=st.sampled_from([0.0, 3.0, 10.0]), alignment=st.sampled_from([1, 4, 8]), seed=st.integers(0, 10**6))
def test_box_holds_every_voxel_the_dilated_mask_keeps(shape, spacing, dilation, alignment, seed):
    rng = np.random.default_rng(seed)
    probability = np.zeros(shape, dtype=np.float32)
    corner = [int(rng.integers(0, n)) for n in shape]
    size = [int(rng.integers(1, n - c + 1)) for n, c in zip(shape, corner)]
    probability[tuple(slice(c, c + s) for c, s in zip(corner, size))] = 0.9
    box = low_resolution_region(probability, 0.5, dilation, spacing, alignment)
    assert all(a % alignment == 0 and 0 <= a < b <= n for a, b, n in zip(box.start, box.stop, shape))
    kept = dilate_mm(probability > 0.5, dilation, spacing)
    inside = np.zeros(shape, dtype=bool)
    inside[box.slices()] = True
    assert not (kept & ~inside).any()


def test_no_kidney_at_low_resolution_gives_no_box():
    assert low_resolution_region(np.full((5, 6, 7), 0.5, np.float32), 0.5, 10.0, (1.0,) * 3, 4) is None


def test_shortcut_only_where_post_processing_removes_the_rest():
    plans = load_preset("paper")
    assert plans.inference.restrict_to_low_resolution_mask
    assert region_applies(plans, postprocess=True)
    assert not region_applies(plans, postprocess=False)
    for field in ("low_resolution_mask", "low_resolution_mask_first"):
        changed = replace(plans, postprocessing=replace(plans.postprocessing, **{field: False}))
        assert not region_applies(changed, postprocess=True)
    off = replace(plans, inference=replace(plans.inference, restrict_to_low_resolution_mask=False))
    assert not region_applies(off, postprocess=True)
    # Values that depend on the tiling would differ inside the box.
    assert not region_applies(replace(plans, network=replace(plans.network, normalisation="instance")), True)
    same = replace(plans.high, padding="same", output_crop=4, input_patch=(112,) * 3, output_patch=(104,) * 3)
    assert not region_applies(replace(plans, high=same), True)


def _dual_case(seed: int, high_shape: tuple[int, int, int]):
    """Valid-convolution test plans, a seeded dual network and random images on both grids."""
    plans = _plans(depth=2, high_in=64, low_in=56)
    torch.manual_seed(seed)
    network = _randomised(build_dual_network(plans))
    rng = np.random.default_rng(seed)
    high = rng.normal(size=high_shape).astype(np.float32)
    low = rng.normal(size=tuple(n // 4 for n in high_shape)).astype(np.float32)
    return plans, network, high, low


@pytest.fixture()
def kidney_in_the_middle(monkeypatch):
    """A low-resolution network that sees a kidney in the middle of the 4 mm volume only."""
    def low_probability(model, low_image, plans, device, progress):
        probability = np.zeros(low_image.shape, dtype=np.float32)
        probability[4:6, 4:6, 5:8] = 0.95
        return probability
    monkeypatch.setattr(predictor, "_low_probability", low_probability)


def test_restricted_fast_mode_gives_the_same_labels(kidney_in_the_middle):
    plans, network, high, low = _dual_case(3, (40, 44, 48))
    everywhere = predict_volume(network, high, low, plans, mode="fast")
    # An untrained network's probabilities hover around one value: threshold where some voxels
    # near the kidney pass, so that the labels compared are not empty.
    threshold = float(np.quantile(everywhere.regions[0, 12:28, 12:28, 16:36], 0.5))
    plans = replace(plans, postprocessing=replace(plans.postprocessing, low_resolution_dilation_mm=4.0,
                                                  threshold=threshold))
    restricted = predict_volume(network, high, low, plans, mode="fast", region_of_interest=True)
    box = restricted.region
    assert everywhere.region is None
    assert np.prod(box.shape) < 0.5 * high.size  # the shortcut skipped most of the volume
    assert all(a % 4 == 0 for a in box.start)  # on the 2^depth pooling grid
    assert np.abs(restricted.regions[(slice(None), *box.slices())]
                  - everywhere.regions[(slice(None), *box.slices())]).max() <= 1e-5
    outside = np.ones(high.shape, dtype=bool)
    outside[box.slices()] = False
    assert not restricted.regions[:, outside].any()
    settings_ = PostprocessingSettings(threshold=threshold, low_resolution_dilation_mm=4.0)
    spacing = plans.high.spacing_mm
    labels_everywhere = postprocess(everywhere.regions, spacing, settings_, everywhere.low_on_high)
    labels_restricted = postprocess(restricted.regions, spacing, settings_, restricted.low_on_high)
    assert labels_everywhere.any()  # the comparison is not between two empty label maps
    assert np.array_equal(labels_everywhere, labels_restricted)


def test_an_explicit_box_is_predicted_as_in_the_whole_volume():
    plans, network, high, low = _dual_case(4, (36, 40, 44))
    box = Box((8, 4, 12), (30, 21, 40))
    everywhere = predict_volume(network, high, low, plans, mode="fast").regions
    inside = predict_volume(network, high, low, plans, mode="fast", region_of_interest=box).regions
    assert np.abs(inside[(slice(None), *box.slices())] - everywhere[(slice(None), *box.slices())]).max() <= 1e-5


def test_low_resolution_pass_alone_equals_the_one_inside_fast_mode():
    # predict_case finds one box for an ensemble from each fold's low-resolution pass alone.
    plans, network, high, low = _dual_case(5, (32, 36, 40))
    alone = low_resolution_on_high(network, low, high.shape, plans)
    assert np.array_equal(alone, predict_volume(network, high, low, plans, mode="fast").low_on_high)
    # The union of two folds' masks: its box holds each fold's box.
    other = np.roll(alone, 17, axis=2)
    plans = replace(plans, postprocessing=replace(plans.postprocessing, threshold=float(np.quantile(alone, 0.9)),
                                                  low_resolution_dilation_mm=2.0))
    union = fine_region(np.maximum(alone, other), plans)
    for part in (fine_region(alone, plans), fine_region(other, plans)):
        assert all(u <= p for u, p in zip(union.start, part.start))
        assert all(u >= p for u, p in zip(union.stop, part.stop))


def test_box_holds_what_post_processing_keeps_on_the_source_grid():
    # The box is taken on the 1 mm grid; post-processing runs after linear resampling onto an
    # anisotropic source grid (3 × 1.7 × 1.9 mm here). End to end, the labels must not change.
    import SimpleITK as sitk

    from kitspipe.imageio import to_canonical
    from kitspipe.inference.export import labels_from_probabilities, to_source_grid
    from kitspipe.preprocessing import prepare_case
    from tests.conftest import phantom_arrays

    image_zyx, label_zyx = phantom_arrays(shape_zyx=(30, 44, 52), spacing_zyx=(3.0, 1.7, 1.9), seed=3)
    stored_image = sitk.GetImageFromArray(image_zyx.transpose(2, 1, 0).copy())
    stored_label = sitk.GetImageFromArray(label_zyx.transpose(2, 1, 0).copy())
    for item in (stored_image, stored_label):
        item.SetSpacing((1.9, 1.7, 3.0))
    plans = _plans(high_spacing=1.0, low_in=64)
    plans = replace(plans, postprocessing=replace(plans.postprocessing, low_resolution_dilation_mm=3.0))
    image = to_canonical(stored_image, dtype=np.float32)
    prepared = prepare_case(image, to_canonical(stored_label).array, plans)
    # A cuboid mask: flat faces put many source voxels at the very edge of the reach.
    low = np.zeros(prepared.high_label.shape, dtype=np.float32)
    low[tuple(slice(n // 4 + 1, n // 2 + 3) for n in low.shape)] = 0.9
    # Just above the threshold everywhere: a source voxel whose interpolation reached one fine
    # voxel outside the box would fall below it.
    regions = np.full((2, *low.shape), 0.55, dtype=np.float32)
    box = fine_region(low, plans)
    assert np.prod(box.shape) < 0.6 * low.size
    restricted = np.zeros_like(regions)
    restricted[(slice(None), *box.slices())] = regions[(slice(None), *box.slices())]
    # Without the component steps every kept voxel counts, the ones at the edge of the reach too.
    settings_ = PostprocessingSettings(low_resolution_dilation_mm=3.0, keep_largest_kidney_per_side=False,
                                       drop_unconnected_tumour=False)
    labels = []
    for channels in (regions, restricted):
        on_source = to_source_grid(np.concatenate([channels, low[None]]), prepared.high_grid, image, prepared.crop)
        labels.append(labels_from_probabilities(on_source[:2], on_source[2], image.grid.spacing, settings_))
    assert labels[0].any()
    assert np.array_equal(labels[0], labels[1])
