import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kitspipe.inference.tiling import (
    Tile,
    TileStitcher,
    _valid_output,
    extract_input,
    fast_input_tile,
    plan_tiles,
    predict_tiled,
    stitch,
    tile_margin,
)

triples = st.tuples(st.integers(1, 30), st.integers(1, 30), st.integers(1, 30))


def centre_crop_network(output_tile):
    """An 'identity' valid-convolution network: the output is the centre of the input."""

    def run(patch):
        margin = [(i - o) // 2 for i, o in zip(patch.shape[-3:], output_tile)]
        return patch[(Ellipsis, *(slice(m, m + o) for m, o in zip(margin, output_tile)))].copy()

    return run


@pytest.mark.parametrize(
    "depth, input_size, output_size",
    [
        (3, 108, 20), (3, 116, 28), (3, 196, 108), (3, 268, 180), (3, 92, 4),
        (2, 64, 24), (3, 110, None), (3, 84, None),
    ],
)
def test_valid_unet_sizes(depth, input_size, output_size):
    assert _valid_output(input_size, depth) == output_size


def test_margin_rejects_uncentred_tiles():
    assert tile_margin(20, 108) == (44, 44, 44)
    with pytest.raises(ValueError):
        tile_margin(20, 107)
    with pytest.raises(ValueError):
        tile_margin(30, 20)


@settings(max_examples=60, deadline=None)
@given(
    shape=triples,
    output_tile=st.tuples(*[st.integers(1, 12)] * 3),
    margin=st.tuples(*[st.integers(0, 4)] * 3),
)
def test_tiles_cover_every_voxel_exactly_once(shape, output_tile, margin):
    input_tile = tuple(o + 2 * m for o, m in zip(output_tile, margin))
    coverage = np.zeros(shape, dtype=int)
    for tile in plan_tiles(shape, output_tile, input_tile):
        assert all(1 <= n <= o for n, o in zip(tile.output_size, output_tile))
        assert tile.input_start == tuple(s - m for s, m in zip(tile.output_start, margin))
        # A tile is clipped only where it would run past the volume end.
        for start, size, full, extent in zip(tile.output_start, tile.output_size, output_tile, shape):
            assert size == full or start + size == extent
        coverage[tile.output_slices] += 1
    assert np.all(coverage == 1)


def test_inputs_are_centred_on_their_full_output_tiles():
    output_tile, input_tile = (20, 20, 20), (108, 108, 108)
    for tile in plan_tiles((50, 33, 20), output_tile, input_tile):
        for i_start, o_start, i, o in zip(tile.input_start, tile.output_start, input_tile, output_tile):
            assert i_start + i / 2 == o_start + o / 2


def test_extract_input_pads_outside_the_volume():
    volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) + 1
    tile = Tile(output_start=(0, 0, 4), output_size=(2, 2, 2), input_start=(-2, -2, 2))
    patch = extract_input(volume, tile, (6, 6, 6), pad_value=-7.0)
    assert patch.shape == (6, 6, 6)
    assert np.array_equal(patch[2:, 2:, :4], volume[:4, :4, 2:6])
    assert np.all(patch[:2] == -7) and np.all(patch[:, :2] == -7) and np.all(patch[:, :, 4:] == -7)
    assert np.all(patch[2:, 2:, :4] > 0)


def test_extract_input_keeps_channels_and_pads_per_channel():
    volume = np.ones((2, 3, 3, 3), dtype=np.float32)
    tile = plan_tiles((3, 3, 3), 3, 5)[0]
    patch = extract_input(volume, tile, 5, pad_value=[-1.0, -2.0])
    assert patch.shape == (2, 5, 5, 5)
    assert patch[0, 0, 0, 0] == -1 and patch[1, 0, 0, 0] == -2
    assert np.all(patch[:, 1:4, 1:4, 1:4] == 1)


@pytest.mark.parametrize(
    "output_tile, input_tile",
    [((20, 20, 20), (108, 108, 108)), ((18, 40, 30), (26, 48, 38)), ((7, 9, 5), (7, 9, 5))],
    ids=["paper", "fast-scaled", "no-margin"],
)
def test_identity_network_reproduces_the_volume(output_tile, input_tile):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(2, 30, 45, 25)).astype(np.float32)
    tiles = plan_tiles(volume.shape[1:], output_tile, input_tile)
    result = predict_tiled(volume, tiles, input_tile, centre_crop_network(output_tile), pad_value=np.nan)
    assert np.array_equal(result, volume)


def test_batched_and_unbatched_prediction_agree():
    volume = np.random.default_rng(1).normal(size=(1, 11, 13, 9)).astype(np.float32)
    tiles = plan_tiles(volume.shape[1:], (4, 5, 3), (8, 9, 7))
    run = centre_crop_network((4, 5, 3))
    single = predict_tiled(volume, tiles, (8, 9, 7), run)
    batched = predict_tiled(volume, tiles, (8, 9, 7), run, batch_size=4, progress=False)
    assert np.array_equal(single, batched) and np.array_equal(single, volume)


def test_volume_smaller_than_one_tile():
    volume = np.random.default_rng(2).normal(size=(1, 5, 7, 3)).astype(np.float32)
    tiles = plan_tiles(volume.shape[1:], 20, 108)
    assert tiles == [Tile((0, 0, 0), (5, 7, 3), (-44, -44, -44))]
    result = predict_tiled(volume, tiles, 108, centre_crop_network((20, 20, 20)))
    assert np.array_equal(result, volume)


def test_stitch_matches_the_stitcher_and_checks_coverage():
    tiles = plan_tiles((5, 6, 7), 3, 3)
    outputs = [np.full((1, 3, 3, 3), i, dtype=np.float32) for i in range(len(tiles))]
    result = stitch(outputs, tiles, (5, 6, 7), 1)
    for i, tile in enumerate(tiles):
        assert np.all(result[(0, *tile.output_slices)] == i)
    stitcher = TileStitcher((5, 6, 7), 1)
    stitcher.add(tiles[0], outputs[0])
    with pytest.raises(ValueError, match="overlaps"):
        stitcher.add(tiles[0], outputs[0])
    with pytest.raises(ValueError, match="not covered"):
        stitcher.result()


def test_wrong_network_output_shape_is_an_error():
    volume = np.zeros((1, 6, 6, 6), dtype=np.float32)
    tiles = plan_tiles((6, 6, 6), 2, 4)
    with pytest.raises(ValueError, match="network output"):
        predict_tiled(volume, tiles, 4, lambda patch: patch)


def test_a_real_valid_convolution_network_is_exact_for_any_tile_size():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    network = torch.nn.Sequential(
        torch.nn.Conv3d(2, 4, 3), torch.nn.BatchNorm3d(4), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 3)
    ).eval()
    network[1].running_mean.uniform_(-1, 1)
    network[1].running_var.uniform_(0.5, 2)

    def run(batch):
        with torch.no_grad():
            return network(torch.from_numpy(batch)).numpy()

    volume = np.random.default_rng(3).normal(size=(2, 13, 17, 11)).astype(np.float32)
    pad = -1.5
    results = []
    for output_tile in [(3, 4, 5), (6, 6, 6), (13, 17, 11), (20, 20, 20)]:
        input_tile = tuple(o + 4 for o in output_tile)
        tiles = plan_tiles(volume.shape[1:], output_tile, input_tile)
        results.append(predict_tiled(volume, tiles, input_tile, run, pad_value=pad, batch_size=2))
    whole = run(np.pad(volume, [(0, 0)] + [(2, 2)] * 3, constant_values=pad)[None])[0]
    for result in results:
        assert result.shape == (3, 13, 17, 11)
        np.testing.assert_allclose(result, whole, atol=1e-5, rtol=0)


def test_fast_input_tile_balances_tiles_within_the_budget():
    tile = fast_input_tile((300, 300, 300), depth=3, max_input_voxels=268**3, min_input=108)
    assert tile == (244, 244, 244)  # two 156-voxel outputs per axis instead of 180 + 120


def test_fast_input_tile_covers_a_small_volume_in_one_tile():
    tile = fast_input_tile((60, 150, 151), depth=3, max_input_voxels=10**9, min_input=108)
    assert tile == (148, 244, 244)
    assert [_valid_output(t, 3) for t in tile] == [60, 156, 156]


def test_fast_input_tile_never_goes_below_the_minimum():
    assert fast_input_tile((400, 400, 400), depth=3, max_input_voxels=1000, min_input=108) == (108, 108, 108)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(*[st.integers(1, 600)] * 3),
    budget=st.integers(108**3, 400**3),
    depth=st.sampled_from([2, 3]),
)
def test_fast_input_tile_properties(shape, budget, depth):
    minimum = 108 if depth == 3 else 64
    tile = fast_input_tile(shape, depth, budget, minimum)
    outputs = [_valid_output(t, depth) for t in tile]
    assert None not in outputs
    assert min(tile) >= minimum
    assert math.prod(tile) <= budget
    # Balanced: one valid step smaller on an axis would need more tiles there,
    # unless that axis is already at the minimum.
    for axis in range(3):
        n_tiles = math.ceil(shape[axis] / outputs[axis])
        if tile[axis] > minimum:
            smaller = tile[axis] - 2**depth
            assert math.ceil(shape[axis] / _valid_output(smaller, depth)) > n_tiles
