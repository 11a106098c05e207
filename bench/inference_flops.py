"""FLOP counting for ``bench/infer.py``: what one dense pass costs, what kitspipe's tile plans
cost, and what actually ran (forward hooks), for the dual-resolution network of a plan."""

from __future__ import annotations

import math
from typing import Any

HUGE_OUTPUT = 2**20  # an output edge so large that the margin of valid convolutions is negligible

def mask_branch(plans) -> tuple[dict[int, int] | None, int]:
    """(extra skip channels of the 1 mm U-Net, filters of the mask branch; 0 = no branch)."""
    filters = plans.network.mask_branch_filters or plans.high.base_filters
    if plans.network.mask_join == "input":
        return None, 0
    levels = [0] if plans.network.mask_join == "first_skip" else list(range(plans.high.depth))
    return {level: filters for level in levels}, filters


def high_tile_flops(plans, tile_in: tuple[int, ...]) -> float:
    """FLOPs of one 1 mm forward pass on an input tile: U-Net (``unet_forward_flops``) + mask branch."""
    from kitspipe.networks.sizes import unet_forward_flops

    extra, branch = mask_branch(plans)
    channels = 2 if plans.network.mask_join == "input" else 1
    unet = unet_forward_flops(tuple(tile_in), channels, plans.high.base_filters, plans.high.depth, 2, extra,
                              borders=plans.high.borders)
    # ConvBlock(1, b, b): two 3×3×3 convolutions on the masked image (each valid one shrinks by 2).
    shrink = plans.high.borders.shrink_per_conv
    branch_macs = (math.prod(s - shrink for s in tile_in) * branch
                   + math.prod(s - 2 * shrink for s in tile_in) * branch * branch)
    return unet + 2.0 * 27 * branch_macs


def dense_flops_per_voxel(plans) -> tuple[float, float]:
    """FLOPs per output voxel of one dense pass, (1 mm network incl. mask branch, 4 mm network).

    The FLOPs of a huge tile divided by its output voxels converge to the cost of computing
    each output voxel once (the valid-convolution margin becomes negligible).
    """
    from kitspipe.networks.sizes import input_size_for_output, output_size, unet_forward_flops

    h, lo = plans.high, plans.low
    size = input_size_for_output(HUGE_OUTPUT, h.depth, borders=h.borders)
    high = high_tile_flops(plans, (size,) * 3) / float(output_size(size, h.depth, borders=h.borders)) ** 3
    size = input_size_for_output(HUGE_OUTPUT, lo.depth, borders=lo.borders)
    low = (unet_forward_flops((size,) * 3, 1, lo.base_filters, lo.depth, 1, borders=lo.borders)
           / float(output_size(size, lo.depth, borders=lo.borders)) ** 3)
    return high, low


def fast_mode_flops(plans, high_shape: tuple[int, ...], low_shape: tuple[int, ...]) -> float:
    """FLOPs of ``fast`` mode on arrays of these shapes, from kitspipe's own tile plan."""
    from kitspipe.inference.predictor import _tiles_for
    from kitspipe.networks.sizes import unet_forward_flops

    high_tiles, high_in = _tiles_for("fast", high_shape, plans.high, plans)
    low_tiles, low_in = _tiles_for("fast", low_shape, plans.low, plans)
    per_low_tile = unet_forward_flops(low_in, 1, plans.low.base_filters, plans.low.depth, 1,
                                      borders=plans.low.borders)
    return len(high_tiles) * high_tile_flops(plans, high_in) + len(low_tiles) * per_low_tile


def count_flops(network) -> dict[str, float]:
    """Forward hooks on every convolution and linear layer, adding their FLOPs to the returned dict."""
    import torch
    from torch import nn

    totals = {"flops": 0.0}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.ConvTranspose3d):
            flops = 2.0 * inputs[0].numel() * math.prod(module.kernel_size) * module.out_channels // module.groups
        elif isinstance(module, nn.Conv3d):
            flops = 2.0 * output.numel() * math.prod(module.kernel_size) * module.in_channels // module.groups
        else:
            flops = 2.0 * output.numel() * module.in_features
        totals["flops"] += flops

    for module in network.modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d, nn.Linear)):
            module.register_forward_hook(hook)
    return totals


def spy_on_tile_plans() -> list[dict[str, Any]]:
    """Record every tile plan the predictor makes (arguments and tile count), changing nothing.

    ``kitspipe.inference.predictor`` calls ``plan_tiles`` by its module-level name; wrapping
    that name in this child process lets the parent re-plan the whole case with exactly the
    tile sizes and stride kitspipe chose for the crop (paper mode's stride is decided inside
    ``_dual_paper``), instead of copying that logic here.
    """
    import kitspipe.inference.predictor as predictor

    calls: list[dict[str, Any]] = []
    real = predictor.plan_tiles

    def plan_tiles(volume_shape, output_tile, input_tile, stride=None):
        tiles = real(volume_shape, output_tile, input_tile, stride=stride)
        calls.append({"volume_shape": [int(v) for v in volume_shape], "output_tile": list(output_tile),
                      "input_tile": list(input_tile), "stride": None if stride is None else list(stride),
                      "tiles": len(tiles)})
        return tiles

    predictor.plan_tiles = plan_tiles
    return calls


def paper_mode_tiles(run_high_shape: list[int], tile_plan: dict[str, Any], case_high_shape: list[int]) -> int:
    """Tiles of paper mode on the whole case: the crop run's plan (tile sizes, stride, and the
    shift kitspipe added to the shape) applied to the whole 1 mm grid with kitspipe's tiler."""
    from kitspipe.inference.tiling import plan_tiles

    shift = [v - n for v, n in zip(tile_plan["volume_shape"], run_high_shape)]
    shape = [n + s for n, s in zip(case_high_shape, shift)]
    return len(plan_tiles(shape, tile_plan["output_tile"], tile_plan["input_tile"], stride=tile_plan["stride"]))
