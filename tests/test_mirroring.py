"""Test-time mirroring: the views, their inverses, and the averaged prediction they give."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kitspipe.inference.predictor as predictor
from kitspipe.errors import PlanError
from kitspipe.inference.mirroring import mirror, mirror_box, mirrorings
from kitspipe.inference.predictor import predict_volume
from kitspipe.inference.run import predict_views
from kitspipe.plans import Plans, load_preset
from kitspipe.resampling import Box
from kitspipe.schema import from_dict, to_dict
from kitspipe.trainers.builtin import build_dual_network
from test_inference import _plans, _randomised

axes_subsets = st.lists(st.sampled_from(["z", "y", "x"]), unique=True, max_size=3)


def test_every_subset_of_the_axes_is_one_view_the_plain_one_first():
    assert mirrorings([]) == [()]
    assert mirrorings(["x", "z"]) == [(), (0,), (2,), (0, 2)]
    assert len(mirrorings(["z", "y", "x"])) == 8


@settings(max_examples=30, deadline=None)
@given(axes=axes_subsets, shape=st.tuples(*[st.integers(1, 6)] * 3), seed=st.integers(0, 1000))
def test_mirroring_twice_gives_the_array_back(axes, shape, seed):
    array = np.random.default_rng(seed).normal(size=(2, *shape))
    for view in mirrorings(axes):
        once = mirror(array, view, channels=1)
        assert np.array_equal(mirror(once, view, channels=1), array)
        if any(shape[axis] > 1 for axis in view):
            assert once is not array


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(*[st.integers(2, 9)] * 3), data=st.data())
def test_a_mirrored_box_holds_the_mirrored_voxels(shape, data):
    start = tuple(data.draw(st.integers(0, n - 1)) for n in shape)
    stop = tuple(data.draw(st.integers(a + 1, n)) for a, n in zip(start, shape))
    box = Box(start, stop)
    inside = np.zeros(shape, dtype=bool)
    inside[box.slices()] = True
    for view in mirrorings(["z", "y", "x"]):
        expected = np.zeros(shape, dtype=bool)
        expected[mirror_box(box, shape, view).slices()] = True
        assert np.array_equal(mirror(inside, view), expected)


def test_a_mirrored_box_starts_on_the_pooling_grid():
    box = Box((8, 4, 12), (30, 21, 40))
    mirrored = mirror_box(box, (36, 40, 44), (0, 2), alignment=4)
    assert mirrored.start == (4, 4, 4) and mirrored.stop == (28, 21, 32)  # starts 6 and 4 rounded down
    assert all(a % 4 == 0 for a in mirrored.start)


def test_an_explicit_box_with_mirroring_gives_the_whole_grid_values_inside_it():
    plans, network, high, low = _dual_case(("x",), high_shape=(32, 36, 40))
    box = Box((8, 4, 12), (30, 21, 31))
    everywhere = predict_views([network], high, low, plans, "fast", torch.device("cpu"))
    inside = predict_views([network], high, low, plans, "fast", torch.device("cpu"), region_of_interest=box)
    assert np.abs(inside[(slice(0, 2), *box.slices())] - everywhere[(slice(0, 2), *box.slices())]).max() <= 1e-5


def test_plan_names_the_field_of_a_bad_axis_list():
    data = to_dict(load_preset("cpu"))
    for bad, message in ((["x", "x"], "each axis at most once"), (["w"], "'w' is not one of")):
        data["inference"]["mirror_axes"] = bad
        with pytest.raises(PlanError, match=rf"inference.*mirror_axes.*{message}"):
            from_dict(Plans, data, "plans.json")
    with pytest.raises(ValueError, match="mirror_axes: 'w' is not one of"):
        replace(load_preset("cpu").inference, mirror_axes=("x", "w"))


def _dual_case(mirror_axes: tuple[str, ...], high_shape=(32, 36, 40)):
    plans = _plans(depth=2, high_in=64, low_in=56)
    plans = replace(plans, inference=replace(plans.inference, mirror_axes=mirror_axes))
    torch.manual_seed(7)
    network = _randomised(build_dual_network(plans))
    rng = np.random.default_rng(7)
    high = rng.normal(size=high_shape).astype(np.float32)
    low = rng.normal(size=tuple(n // 4 for n in high_shape)).astype(np.float32)
    return plans, network, high, low


def test_views_are_averaged_after_mapping_each_back():
    plans, network, high, low = _dual_case(("x",))
    averaged = predict_views([network], high, low, plans, "fast", torch.device("cpu"))
    plain = predict_volume(network, high, low, plans, mode="fast")
    mirrored = predict_volume(network, mirror(high, (2,)), mirror(low, (2,)), plans, mode="fast")
    expected_regions = (plain.regions + mirror(mirrored.regions, (2,), channels=1)) / 2
    expected_low = (plain.low_on_high + mirror(mirrored.low_on_high, (2,))) / 2
    assert averaged.shape == (3, *high.shape)
    assert np.allclose(averaged[:2], expected_regions, atol=1e-6)
    assert np.allclose(averaged[2], expected_low, atol=1e-6)


@pytest.mark.parametrize("axis, name", [(2, "x"), (0, "z")])
def test_mirroring_along_an_axis_makes_the_prediction_mirror_equivariant(axis, name):
    # Averaged over both views, a case and its mirror image get mirror-image predictions, which a
    # network trained without mirroring does not give on its own: (f(x) + M f(M x)) / 2 is
    # mirror-equivariant for any deterministic f, so this fails if a view is not mapped back.
    for axes, equivariant in (((), False), ((name,), True)):
        plans, network, high, low = _dual_case(axes)
        original = predict_views([network], high, low, plans, "fast", torch.device("cpu"))
        of_mirror = predict_views([network], mirror(high, (axis,)), mirror(low, (axis,)), plans, "fast",
                                  torch.device("cpu"))
        difference = np.abs(mirror(of_mirror, (axis,), channels=1) - original).max()
        assert (difference <= 1e-5) == equivariant, difference


@pytest.fixture()
def kidney_where_the_image_is_bright(monkeypatch):
    """A low-resolution network that marks the bright voxels of its input as kidney, so that a
    mirrored view finds the kidney mirrored, as a real network would."""
    def low_probability(model, low_image, plans, device, progress):
        return np.where(low_image > 5.0, 0.95, 0.0).astype(np.float32)
    monkeypatch.setattr(predictor, "_low_probability", low_probability)


def test_restricted_fast_mode_keeps_every_view_that_post_processing_can_use(kidney_where_the_image_is_bright):
    from kitspipe.postprocessing import PostprocessingSettings, postprocess

    plans, network, high, low = _dual_case(("x",), high_shape=(28, 32, 48))
    torch.manual_seed(8)
    other_fold = _randomised(build_dual_network(plans))
    low[3:5, 3:6, 1:4] = 10.0  # off-centre along x: the mirrored view's box lies elsewhere
    folds = [network, other_fold]  # two folds × two mirrorings: four views, one shared reach
    everywhere = predict_views(folds, high, low, plans, "fast", torch.device("cpu"))
    # Threshold where some voxels near the kidney pass, so that the labels compared are not empty.
    threshold = float(np.quantile(everywhere[0, 12:20, 12:24, 4:16], 0.5))
    plans = replace(plans, postprocessing=replace(plans.postprocessing, threshold=threshold,
                                                  low_resolution_dilation_mm=4.0))
    restricted = predict_views(folds, high, low, plans, "fast", torch.device("cpu"), region_of_interest=True)
    assert (restricted[0] == 0).mean() > 0.3  # the shortcut skipped part of the volume
    settings_ = PostprocessingSettings(threshold=threshold, low_resolution_dilation_mm=4.0)
    labels = [postprocess(p[:2], plans.high.spacing_mm, settings_, p[2]) for p in (everywhere, restricted)]
    assert labels[0].any()
    assert np.array_equal(labels[0], labels[1])


@pytest.mark.parametrize("value, flag", [("z x", "--mirror-axes z x"), ("none", "--mirror-axes"), ("", None)])
def test_make_infer_passes_the_mirroring_axes(value, flag):
    import shlex
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    dry_run = subprocess.run(["make", "-s", "-n", "infer", "WORK=w", "IN=i", "OUT=o", f"MIRROR_AXES={value}"],
                             cwd=root, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    words = shlex.split(dry_run)
    assert words[words.index("infer") + 1:words.index("infer") + 4] == ["w", "i", "o"]
    if flag is None:
        assert "--mirror-axes" not in words
    else:
        tail = words[words.index("--mirror-axes"):]
        assert tail == flag.split()
