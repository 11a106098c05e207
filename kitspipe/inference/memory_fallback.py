"""Whole-volume prediction that survives running out of GPU memory by using smaller tiles.

Fast-mode tiles are sized by ``inference.max_tile_voxels`` and, on CUDA, by an estimate from
the memory free when the case starts (``tile_budget``). An estimate that is off, another
process allocating on the card meanwhile, or fragmentation after many cases can still make a
tile fail with ``torch.cuda.OutOfMemoryError``, which would otherwise end an inference run of
hundreds of cases on one unlucky case. The tile budget is then halved until the tiles are
the training patch, which is known to fit since the network trained on it, and last the
``paper`` mode's training-size tiles are tried; every step is logged. Smaller tiles repeat
the valid-convolution margin more often, so with batch norm they cost time, not accuracy: for
a plain U-Net every mode gives the same voxels, and for the dual network ``paper`` mode is the
training-time tiling (docs/inference.md). With instance norm a tile's statistics change with
its size, so only the last step, training-size tiles, is exact.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Callable, Sequence, TypeVar

import torch

from kitspipe.errors import KitspipeError, Problem
from kitspipe.inference.tiling import fast_input_tile
from kitspipe.plans import Plans

log = logging.getLogger(__name__)

T = TypeVar("T")


def tile_fallbacks(plans: Plans, mode: str, high_shape: Sequence[int] | None = None) -> list[tuple[str, Plans]]:
    """(mode, plans) to try in order, from the plan's own tiles down to training-size ones.

    Args:
        high_shape: the 1 mm volume's shape; when given, budgets that would tile it exactly as
            the previous attempt did (a volume smaller than the budget) are skipped, so one
            failing tile is not retried unchanged.
    """
    attempts = [(mode, plans)]
    if mode != "fast":
        return attempts
    # fast_input_tile never goes below the training patch, so halving further changes nothing.
    smallest = max(math.prod(plans.high.input_patch), math.prod(plans.low.input_patch))
    budget = plans.inference.max_tile_voxels
    tile = _high_tile(plans, budget, high_shape)
    while budget > smallest:
        budget //= 2
        smaller = _high_tile(plans, budget, high_shape)
        if smaller is not None and smaller == tile:
            continue
        tile = smaller
        attempts.append(("fast", replace(plans, inference=replace(plans.inference, max_tile_voxels=budget))))
    attempts.append(("paper", plans))
    return attempts


def _high_tile(plans: Plans, budget: int, high_shape: Sequence[int] | None) -> tuple[int, ...] | None:
    if high_shape is None:
        return None
    return tuple(fast_input_tile(high_shape, plans.high.depth, budget, min_input=plans.high.input_patch,
                                 borders=plans.high.borders))


def describe(mode: str, plans: Plans) -> str:
    """How an attempt tiles, for the log."""
    if mode == "fast":
        return f"fast tiles of at most {plans.inference.max_tile_voxels} voxels"
    return "paper (training-size) tiles"


def predict_with_fallback(predict: Callable[[str, Plans], T], plans: Plans, mode: str, stage: str = "infer",
                          case: str = "-", high_shape: Sequence[int] | None = None) -> T:
    """``predict(mode, plans)``, retried with smaller tiles after a GPU out-of-memory error.

    Args:
        case: the case being predicted, named in the log and the error.
        high_shape: the 1 mm volume's shape (see :func:`tile_fallbacks`).

    Raises:
        KitspipeError: the smallest tiles ran out of memory too.
    """
    attempts = tile_fallbacks(plans, mode, high_shape)
    for index, (attempt_mode, attempt_plans) in enumerate(attempts):
        try:
            return predict(attempt_mode, attempt_plans)
        except torch.cuda.OutOfMemoryError:
            pass  # handled below, once the traceback no longer holds the failed tile's tensors
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if index + 1 < len(attempts):
            log.warning("%s: %s: GPU out of memory with %s; retrying with %s", stage, case,
                        describe(attempt_mode, attempt_plans), describe(*attempts[index + 1]))
    raise KitspipeError(Problem(stage, case, "GPU", "out of memory even with the smallest tiles; free the GPU "
                                "or run on the CPU (--device cpu)", describe(*attempts[-1]), "tiles that fit"))
