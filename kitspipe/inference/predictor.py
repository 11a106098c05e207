"""Whole-volume prediction on the plan's grids, for validation during training and for inference.

Two tiling modes (``InferencePlan.tile_mode``):

* ``paper``: non-overlapping output tiles of the training size; for the dual network each
  high-resolution tile gets its own co-centred low-resolution patch, exactly as in training
  (so its low-resolution mask is zero beyond the low output, as in training);
* ``fast``: the largest tiles the memory budget allows, paying the valid-convolution margin
  once per large tile. The low-resolution network runs once over the whole 4 mm volume and
  its upsampled probability is cropped for each high-resolution tile. With
  ``region_of_interest`` the high-resolution network runs only on the box that post-processing's
  low-resolution mask can keep (``region_of_interest.py``), and the rest of the grid is 0. For a plain U-Net in
  eval mode this equals ``paper`` mode; for the dual network it equals it only when the
  low-resolution output of a training patch spans the whole high-resolution input
  (``planner.low_output_covers_high_input``), because otherwise training saw a
  zero-padded mask border that whole-volume inference does not have (docs/inference.md).

The network runs under bf16 autocast when ``inference.mixed_precision`` asks for it
(``kitspipe.devices``); probabilities are computed from float32 logits. On CUDA, fast mode's
tiles are as large as the free GPU memory allows, up to ``max_tile_voxels`` (``tile_budget``).
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kitspipe.devices import autocast, autocast_dtype, unwrap
from kitspipe.inference.region_of_interest import fine_region
from kitspipe.inference.tile_budget import tile_voxels_for_memory
from kitspipe.inference.tiling import (Tile, TileStitcher, extract_input, fast_input_tile, plan_tiles,
                                       pooling_aligned_stride, predict_tiled)
from kitspipe.networks.sizes import output_size
from kitspipe.networks.dual_resolution import DualResolutionUNet
from kitspipe.plans import Plans, ResolutionPlan
from kitspipe.resampling import Box

log = logging.getLogger(__name__)

@dataclass
class VolumePrediction:
    """Sigmoid probabilities on the high-resolution grid.

    Args:
        regions: (2, z, y, x) kidney ∪ tumour and tumour.
        low_on_high: (z, y, x) the low-resolution kidney ∪ tumour probability upsampled to the
            high-resolution grid, or None for a network without a low-resolution branch.
        region: the box of the grid where ``regions`` were computed (0 elsewhere); None when
            they were computed everywhere.
    """

    regions: np.ndarray
    low_on_high: np.ndarray | None
    region: Box | None = None


def normalise(hu: np.ndarray, plans: Plans) -> np.ndarray:
    low, high = plans.intensity.clip_hu
    return ((np.clip(hu.astype(np.float32), low, high) - plans.intensity.mean) / plans.intensity.std).astype(np.float32)


def _air(plans: Plans) -> float:
    return float((plans.intensity.clip_hu[0] - plans.intensity.mean) / plans.intensity.std)


def _run(module, device: torch.device, *arrays: np.ndarray):
    tensors = [torch.from_numpy(np.ascontiguousarray(a))[None].to(device) for a in arrays]
    return module(*tensors)


@torch.no_grad()
def predict_volume(network: nn.Module, high_image: np.ndarray, low_image: np.ndarray | None, plans: Plans,
                   mode: str | None = None, device: torch.device | str = "cpu",
                   progress: bool = False, mixed_precision: str | None = None,
                   region_of_interest: bool | Box = False) -> VolumePrediction:
    """Predict a whole preprocessed case.

    Args:
        network: a ``DualResolutionUNet`` or a plain ``UNet3D`` with two region outputs.
        high_image, low_image: normalised arrays on the plan's grids (see ``normalise``).
        mode: ``paper`` or ``fast``; default from the plan.
        mixed_precision: ``auto``, ``bf16`` or ``off``; default from the plan.
        region_of_interest: fast mode with the dual network only: ``True`` runs the
            high-resolution network only where post-processing's low-resolution mask can keep
            a voxel (``region_of_interest.region_applies`` says when that is safe); a ``Box``
            runs it on that box of the high-resolution grid (benchmarks).
    """
    mode = mode or plans.inference.tile_mode
    device = torch.device(device)
    with _evaluating(network, plans, device, mixed_precision) as model:
        if isinstance(model, DualResolutionUNet):
            if mode == "paper":
                return _dual_paper(model, high_image, low_image, plans, device, progress)
            return _dual_fast(model, high_image, low_image, plans, device, progress, region_of_interest)
        return VolumePrediction(_single(model, high_image, plans, mode, device, progress), None)


@contextmanager
def _evaluating(network: nn.Module, plans: Plans, device: torch.device, mixed_precision: str | None):
    """The plain network in eval mode under the plan's autocast; its mode is restored after."""
    model = unwrap(network)  # a compiled network is recompiled per tile shape; the plain one is not
    was_training = model.training
    model.eval()
    try:
        with autocast(device, autocast_dtype(mixed_precision or plans.inference.mixed_precision, device)):
            yield model
    finally:
        model.train(was_training)


def fast_tile_voxels(plans: Plans, device: torch.device, base_filters: int, branch_channels: int = 0) -> int:
    """Fast mode's input-tile budget: the plan's ``max_tile_voxels``, and on CUDA no more than
    the free GPU memory holds (in the autocast dtype in effect, see ``tile_budget``)."""
    cap = plans.inference.max_tile_voxels
    if device.type != "cuda":
        return cap
    free_bytes, _ = torch.cuda.mem_get_info(device)
    # The driver counts PyTorch's cache (e.g. the 4 mm pass's freed tensors) as used, but the
    # next tile reuses it; without this the budget would shrink with every case and fold.
    free_bytes += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    element_bytes = 2 if torch.is_autocast_enabled("cuda") else 4  # called inside predict_volume's autocast
    voxels = tile_voxels_for_memory(free_bytes, base_filters, branch_channels, element_bytes, cap)
    log.debug("fast tiles: %.1f GiB free on %s -> at most %d voxels per tile", free_bytes / 2**30, device, voxels)
    return voxels


def _high_branch_channels(plans: Plans) -> int:
    """Channels of the masked-image branch that join the 1 mm U-Net's finest skip (0: none)."""
    if plans.network.mask_join == "input":
        return 0
    return plans.network.mask_branch_filters or plans.high.base_filters


def _tiles_for(mode: str, shape, branch: ResolutionPlan, plans: Plans,
               max_voxels: int | None = None) -> tuple[list[Tile], tuple]:
    """Tiles whose inputs all start on one pooling grid, so both modes give identical voxels.

    Args:
        branch: ``plans.high`` or ``plans.low``: the U-Net's depth, borders and training patch.
        max_voxels: fast mode's tile budget (default: ``inference.max_tile_voxels``).
    """
    depth, borders = branch.depth, branch.borders
    if mode == "paper":
        tile_in, tile_out = tuple(branch.input_patch), tuple(branch.output_patch)
    else:
        tile_in = fast_input_tile(shape, depth, max_voxels or plans.inference.max_tile_voxels,
                                  min_input=branch.input_patch, borders=borders)
        tile_out = tuple(output_size(s, depth, borders=borders) for s in tile_in)
    return plan_tiles(shape, tile_out, tile_in, stride=pooling_aligned_stride(tile_out, depth)), tile_in


def _single(model: nn.Module, high_image: np.ndarray, plans: Plans, mode: str, device, progress) -> np.ndarray:
    budget = fast_tile_voxels(plans, device, plans.high.base_filters)
    tiles, tile_in = _tiles_for(mode, high_image.shape, plans.high, plans, budget)

    def run(patch: np.ndarray) -> np.ndarray:
        return torch.sigmoid(_run(model, device, patch).logits.float())[0].cpu().numpy()

    return predict_tiled(high_image[None], tiles, tile_in, run, pad_value=_air(plans), progress=progress)


def _low_probability(model: DualResolutionUNet, low_image: np.ndarray, plans: Plans, device, progress) -> np.ndarray:
    budget = fast_tile_voxels(plans, device, plans.low.base_filters)
    tiles, tile_in = _tiles_for("fast", low_image.shape, plans.low, plans, budget)

    def run(patch: np.ndarray) -> np.ndarray:
        return torch.sigmoid(_run(model.low_forward, device, patch).float())[0].cpu().numpy()

    return predict_tiled(low_image[None], tiles, tile_in, run, pad_value=_air(plans), progress=progress)[0]


def _upsample(model: DualResolutionUNet, low_probability: np.ndarray, high_shape, device) -> np.ndarray:
    tensor = torch.from_numpy(low_probability)[None, None].to(device)
    upsampled = model.upsample_probability(tensor)[0, 0].float().cpu().numpy()
    return upsampled[tuple(slice(0, n) for n in high_shape)]


@torch.no_grad()
def low_resolution_on_high(network: nn.Module, low_image: np.ndarray, high_shape, plans: Plans,
                           device: torch.device | str = "cpu", mixed_precision: str | None = None) -> np.ndarray | None:
    """Fast mode's low-resolution kidney ∪ tumour probability on the high-resolution grid, or
    None for a network without a low-resolution branch (to find one region for several folds)."""
    if not isinstance(unwrap(network), DualResolutionUNet):
        return None
    device = torch.device(device)
    with _evaluating(network, plans, device, mixed_precision) as model:
        return _upsample(model, _low_probability(model, low_image, plans, device, False), high_shape, device)


def _fine_region(region_of_interest: bool | Box, mask: np.ndarray, plans: Plans) -> Box | None:
    """The box the high-resolution network runs on; None when post-processing keeps nothing."""
    if isinstance(region_of_interest, Box):
        return region_of_interest if math.prod(region_of_interest.shape) > 0 else None
    if not region_of_interest:
        return Box((0, 0, 0), tuple(mask.shape))
    return fine_region(mask, plans)


def _dual_fast(model: DualResolutionUNet, high_image, low_image, plans: Plans, device, progress,
               region_of_interest: bool | Box = False) -> VolumePrediction:
    low_probability = _low_probability(model, low_image, plans, device, progress)
    mask = _upsample(model, low_probability, high_image.shape, device)
    box = _fine_region(region_of_interest, mask, plans)
    if box is None:  # no kidney at low resolution: post-processing would remove every voxel
        return VolumePrediction(np.zeros((2, *high_image.shape), dtype=np.float32), mask, Box((0, 0, 0), (0, 0, 0)))
    whole = box.shape == tuple(high_image.shape)
    budget = fast_tile_voxels(plans, device, plans.high.base_filters, _high_branch_channels(plans))
    tiles, tile_in = _tiles_for("fast", box.shape, plans.high, plans, budget)

    def run(patch: np.ndarray) -> np.ndarray:
        image, tile_mask = patch[:1], patch[1:]
        out = _run(lambda a, b: model.high_forward(a, b, classify=False), device, image, tile_mask)
        return torch.sigmoid(out.logits.float())[0].cpu().numpy()

    stacked = np.stack([high_image, mask])
    inside = predict_tiled(stacked, tiles, tile_in, run, pad_value=[_air(plans), 0.0], progress=progress,
                           region=box)
    if whole:
        return VolumePrediction(inside, mask)
    regions = np.zeros((2, *high_image.shape), dtype=np.float32)
    regions[(slice(None), *box.slices())] = inside
    return VolumePrediction(regions, mask, box)


def _dual_paper(model: DualResolutionUNet, high_image, low_image, plans: Plans, device, progress) -> VolumePrediction:
    """Every 1 mm output tile from its own co-centred 4 mm patch, as in training."""
    scale = plans.scale
    p_high, o_high = plans.high.input_patch, plans.high.output_patch
    p_low = plans.low.input_patch
    m_high = [(p - o) // 2 for p, o in zip(p_high, o_high)]
    offsets = [(scale * pl - ph) // 2 for pl, ph in zip(p_low, p_high)]
    # High input starts must satisfy s_h = scale * s_l + offset; shift the tile grid so they do.
    shift = [(-(-m - off)) % scale for m, off in zip(m_high, offsets)]
    shifted_shape = tuple(n + s for n, s in zip(high_image.shape, shift))
    # A stride that is a multiple of both 2^depth and the scale keeps every tile on one pooling
    # grid and keeps the low-resolution patch starts integer.
    period = math.lcm(2**plans.high.depth, scale)
    stride = tuple(max(period, o // period * period) if o >= period else o for o in o_high)
    tiles = plan_tiles(shifted_shape, o_high, p_high, stride=stride)
    regions = TileStitcher(shifted_shape, 2)
    low_map = TileStitcher(shifted_shape, 1)
    air = _air(plans)
    for tile in tiles:
        high_start = tuple(s - sh for s, sh in zip(tile.input_start, shift))
        low_start = tuple((s - off) // scale for s, off in zip(high_start, offsets))
        high_patch = extract_input(high_image, Tile(tile.output_start, tile.output_size, high_start), p_high, air)
        low_patch = extract_input(low_image, Tile(tile.output_start, tile.output_size, low_start), p_low, air)
        out = _run(model, device, high_patch[None], low_patch[None])
        regions.add(tile, torch.sigmoid(out.high_logits.float())[0].cpu().numpy())
        mask = out.mask[0].float().cpu().numpy()
        low_map.add(tile, mask[(slice(None),) + tuple(slice(m, m + o) for m, o in zip(m_high, o_high))])
    crop = tuple(slice(s, s + n) for s, n in zip(shift, high_image.shape))
    return VolumePrediction(regions.result()[(slice(None),) + crop], low_map.result()[0][crop])
