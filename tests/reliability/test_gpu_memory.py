"""Checklist 39: GPU out of memory during tiled inference falls back to smaller tiles.

A CPU run cannot run out of GPU memory, so the network's forward is patched to raise
``torch.cuda.OutOfMemoryError`` (constructible without CUDA) for any tile larger than the
training patch, as a card too small for the plan's tile budget would.
"""

import logging
import math

import numpy as np
import pytest
import torch

from kitspipe.errors import KitspipeError
from kitspipe.imageio import read_volume
from kitspipe.inference.memory_fallback import tile_fallbacks
from kitspipe.inference.run import predict_case
from kitspipe.networks.unet3d import UNet3D
from kitspipe.preprocessing import prepare_case


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _network_that_fits(plans, largest_voxels: float) -> tuple[torch.nn.Module, list[tuple[int, ...]]]:
    """A small UNet3D that raises OutOfMemoryError for inputs above ``largest_voxels``; records
    the spatial shape of every input it was given."""
    torch.manual_seed(0)
    network = UNet3D(1, 2, 4, plans.high.depth).eval()
    forward = network.forward
    seen = []

    def forward_within_memory(x, *args, **kwargs):
        seen.append(tuple(x.shape[2:]))
        if math.prod(x.shape[2:]) > largest_voxels:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return forward(x, *args, **kwargs)

    network.forward = forward_within_memory
    return network, seen


@pytest.fixture
def image(kits):
    # 10 slices x 36 x 36 at 3 x 0.78 mm: about 32 x 28 x 28 voxels at 1 mm, 2 x 2 x 2 tiles of 20.
    folder = kits.case("case_00000", image=kits.ct(shape=(10, 36, 36)), with_label=False)
    return read_volume(folder / "imaging.nii.gz", dtype=np.float32)


def test_item_39_gpu_oom_retries_with_smaller_tiles_and_logs_it(small_plans, image, caplog):
    training_patch = math.prod(small_plans.high.input_patch)
    network, seen = _network_that_fits(small_plans, largest_voxels=training_patch)
    reference, _ = _network_that_fits(small_plans, largest_voxels=math.inf)
    with caplog.at_level(logging.WARNING, logger="kitspipe.inference.memory_fallback"):
        regions, _, _ = predict_case([network], image, small_plans, "fast", torch.device("cpu"))
    expected, _, _ = predict_case([reference], image, small_plans, "fast", torch.device("cpu"))
    # For a plain U-Net every tiling gives the same voxels (tests/test_inference.py).
    assert np.abs(regions - expected).max() <= 1e-4
    assert math.prod(seen[0]) > training_patch and math.prod(seen[-1]) <= training_patch
    retries = [r.getMessage() for r in caplog.records if "GPU out of memory" in r.getMessage()]
    assert retries and "retrying with fast tiles of at most" in retries[0]


def test_item_39_error_only_when_the_smallest_tiles_fail(small_plans, image, caplog):
    network, seen = _network_that_fits(small_plans, largest_voxels=0)
    with caplog.at_level(logging.WARNING, logger="kitspipe.inference.memory_fallback"):
        with pytest.raises(KitspipeError) as caught:
            predict_case([network], image, small_plans, "fast", torch.device("cpu"))
    message = str(caught.value)
    assert message.startswith("kitspipe: infer: - GPU: out of memory even with the smallest tiles") and "\n" not in message
    high_shape = prepare_case(image, None, small_plans).high_image.shape
    attempts = tile_fallbacks(small_plans, "fast", high_shape)
    assert attempts[-1][0] == "paper" and len(seen) == len(attempts)  # one failed tile per attempt
    # This small volume fits an 8 M-voxel budget whole: halving the budget changes its tile only
    # once it falls below the volume, and an unchanged tile is not retried.
    fast_tiles = [tuple(shape) for shape in seen[:-1]]
    assert len(set(fast_tiles)) == len(fast_tiles)
    assert len(tile_fallbacks(small_plans, "fast")) > len(attempts)
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == len(attempts) - 1


def test_item_39_later_views_start_from_the_tiles_that_fitted(small_plans, image, caplog):
    # Four mirrored views of one fold (the cpu preset mirrors along z and x): only the first
    # searches for tiles that fit; the other three start from them.
    assert len(small_plans.inference.mirror_axes) == 2
    training_patch = math.prod(small_plans.high.input_patch)
    network, seen = _network_that_fits(small_plans, largest_voxels=training_patch)
    with caplog.at_level(logging.WARNING, logger="kitspipe.inference.memory_fallback"):
        predict_case([network], image, small_plans, "fast", torch.device("cpu"))
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    failed = [shape for shape in seen if math.prod(shape) > training_patch]
    assert retries and len(failed) == len(retries)  # every failure belongs to the first view's search
    first_fit = next(i for i, shape in enumerate(seen) if math.prod(shape) <= training_patch)
    assert all(math.prod(shape) <= training_patch for shape in seen[first_fit:])
