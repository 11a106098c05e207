"""The part of the fine grid whose prediction can survive post-processing.

With ``postprocessing.low_resolution_mask`` and ``low_resolution_mask_first`` on, post-processing
first removes every voxel farther than ``low_resolution_dilation_mm`` from the low-resolution
kidney mask (probability > threshold), before any step that looks at the whole volume. Whatever
the fine network predicts beyond that reach never gets into a label file, so fast-mode inference
runs the fine network only on the bounding box of that reach: on a whole abdominal CT the two
kidneys fill a few percent of the 1 mm grid, and the fine network is 80 % of the dual network's
cost per voxel.

The box is taken on the fine grid, while post-processing runs after the probabilities went back
to the source grid by linear interpolation. A source voxel's interpolated probability exceeds the
threshold only if one of the fine voxels around it does, and its fine-network probabilities come
from the fine voxels around it, so the box is widened by one fine voxel for each of the two
interpolations. Its start is rounded down to the fine U-Net's pooling grid, so that every voxel
in it gets the value a whole-volume pass would give (valid convolutions; see ``tiling``).
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np

from kitspipe.plans import Plans
from kitspipe.resampling import Box, mask_bounding_box

log = logging.getLogger(__name__)

# Fine voxels added on each side: one for the low-resolution probability's and one for the fine
# probabilities' linear interpolation onto the source grid.
INTERPOLATION_MARGIN = 2


def region_applies(plans: Plans, postprocess: bool) -> bool:
    """Whether fast-mode inference may skip the fine network outside the low-resolution mask.

    Only when the plan asks for it and post-processing will remove everything there anyway; with
    ``--no-postprocessing`` or the mask applied last (after the component steps, which look at the
    whole volume) every voxel's probability counts. And only for a fine U-Net whose values do not
    depend on the tiles (valid convolutions, batch norm): the box is tiled differently from the
    whole grid, and instance norm or zero padding would change the values inside it.
    """
    p = plans.postprocessing
    tile_independent = plans.high.padding == "valid" and plans.network.normalisation == "batch"
    return (plans.inference.restrict_to_low_resolution_mask and postprocess and tile_independent
            and p.low_resolution_mask and p.low_resolution_mask_first)


def low_resolution_region(low_on_fine: np.ndarray, threshold: float, dilation_mm: float,
                          spacing: Sequence[float], alignment: int) -> Box | None:
    """The box of the fine grid that post-processing's low-resolution mask can keep.

    Args:
        low_on_fine: (z, y, x) low-resolution kidney ∪ tumour probability on the fine grid.
        threshold: post-processing's threshold (a voxel is in the mask when above it).
        dilation_mm: post-processing's ``low_resolution_dilation_mm``.
        spacing: the fine grid's (z, y, x) spacing in mm.
        alignment: the box starts on multiples of this (2^depth of the fine U-Net).

    Returns:
        The box, clipped to the grid, or None when the mask is empty (post-processing then
        removes everything).
    """
    reach = [math.ceil(dilation_mm / float(step_mm)) + INTERPOLATION_MARGIN for step_mm in spacing]
    box = mask_bounding_box(np.asarray(low_on_fine) > threshold, reach)
    if box is None:
        return None
    return Box(tuple(a // alignment * alignment for a in box.start), box.stop)


def fine_region(low_on_fine: np.ndarray, plans: Plans) -> Box | None:
    """``low_resolution_region`` with the plan's post-processing settings and the fine U-Net's
    pooling grid as alignment."""
    p = plans.postprocessing
    box = low_resolution_region(low_on_fine, p.threshold, p.low_resolution_dilation_mm, plans.high.spacing_mm,
                                alignment=2**plans.high.depth)
    share = 0.0 if box is None else math.prod(box.shape) / low_on_fine.size
    log.debug("fast mode: high-resolution network on %s, %.1f %% of the grid", box, 100 * share)
    return box
