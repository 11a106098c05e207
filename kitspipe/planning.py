"""The planner: a preset plus the dataset fingerprint gives a fully resolved plans file.

What the planner decides:

* patch sizes of the U-Nets (valid or same-padded, ``high/low.padding``), when a preset leaves them ``null``: the
  largest cubic high-resolution input whose training step (forward + backward ≈ 3 forward
  passes, both branches, whole batch) fits ``planner.step_gflop_budget``; the low-resolution
  input either equals it (as in the paper) or, with ``low_output_covers_high_input``, is the
  smallest whose output spans the whole high-resolution input, so the low-resolution mask
  never has to be zero-padded and large-tile inference is exact (docs/interpretation.md);
* the intensity normalisation: mean and standard deviation of clipped foreground HU;
* the positive-class weights of the weighted cross-entropy, from how rare each region is near
  the kidneys (inside the foreground bounding box).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from kitspipe.errors import KitspipeError, PlanError, Problem
from kitspipe.fingerprint import load_fingerprint
from kitspipe.networks.sizes import output_size, unet_forward_flops, valid_input_sizes
from kitspipe.plans import Plans, load_plans, load_preset, save_plans

log = logging.getLogger(__name__)

PLANS_FILE = "plans.json"


def training_step_gflop(plans: Plans, high_input: int, low_input: int) -> float:
    """Estimated GFLOP of one optimiser step (forward + backward ≈ 3× forward) for a batch."""
    high = unet_forward_flops((high_input,) * 3, 1, plans.high.base_filters, plans.high.depth, 2,
                              borders=plans.high.borders)
    low = unet_forward_flops((low_input,) * 3, 1, plans.low.base_filters, plans.low.depth, 1,
                             borders=plans.low.borders)
    return 3.0 * (high + low) * plans.training.batch_size / 1e9


def covering_low_input(plans: Plans, high_input: int) -> int:
    """Smallest valid low-resolution input whose output spans ``high_input`` high-res voxels."""
    needed_mm = high_input * plans.high.spacing_mm[0]
    for size in valid_input_sizes(plans.low.depth, max_input=4096, borders=plans.low.borders):
        if output_size(size, plans.low.depth, borders=plans.low.borders) * plans.low.spacing_mm[0] >= needed_mm:
            return size
    raise PlanError(f"low: no valid input up to 4096 voxels covers {needed_mm} mm")


def resolve_patch_sizes(plans: Plans) -> Plans:
    high, low = plans.high, plans.low
    if high.input_patch is None:
        budget = plans.planner.step_gflop_budget
        if budget is None:
            raise PlanError("planner.step_gflop_budget: needed because high.input_patch is null")
        chosen = None
        for size in valid_input_sizes(high.depth, max_input=plans.planner.max_input_size, borders=high.borders):
            low_size = covering_low_input(plans, size) if plans.planner.low_output_covers_high_input else size
            if training_step_gflop(plans, size, low_size) <= budget:
                chosen = size
        if chosen is None:
            raise PlanError(f"planner.step_gflop_budget: {budget} GFLOP is below the smallest valid patch")
        high = replace(high, input_patch=(chosen,) * 3,
                       output_patch=(output_size(chosen, high.depth, borders=high.borders),) * 3)
    elif high.output_patch is None:
        high = replace(high, output_patch=tuple(output_size(s, high.depth, borders=high.borders)
                                                for s in high.input_patch))
    if low.input_patch is None:
        size = (covering_low_input(plans, high.input_patch[0]) if plans.planner.low_output_covers_high_input
                else high.input_patch[0])
        low = replace(low, input_patch=(size,) * 3, output_patch=(output_size(size, low.depth, borders=low.borders),) * 3)
    elif low.output_patch is None:
        low = replace(low, output_patch=tuple(output_size(s, low.depth, borders=low.borders)
                                              for s in low.input_patch))
    low_output_mm = low.output_patch[0] * low.spacing_mm[0]
    high_output_mm = high.output_patch[0] * high.spacing_mm[0]
    if low_output_mm < high_output_mm:
        raise PlanError(f"low.input_patch: its output spans {low_output_mm} mm, less than the "
                        f"{high_output_mm} mm of the high-resolution output it must mask")
    return replace(plans, high=high, low=low)


def intensity_statistics(fingerprint: dict, clip: tuple[float, float]) -> tuple[float, float]:
    """Mean and std of clipped foreground HU over the per-case samples."""
    samples = [np.asarray(c["hu_sample"][region], dtype=float)
               for c in fingerprint["cases"] for region in ("kidney", "tumour")]
    values = np.clip(np.concatenate(samples), *clip) if samples else np.zeros(0)
    if values.size == 0:
        raise KitspipeError(Problem("plan", "-", "fingerprint.json", "no foreground voxels in any case",
                                    "0 voxels", "kidney labels"))
    return float(values.mean()), float(max(values.std(), 1.0))


def positive_weights(fingerprint: dict, cap: float) -> tuple[tuple[float, float], float]:
    """Weights of the positive voxels in the weighted cross-entropy.

    Training patches are drawn around the kidneys (``sampling.positive_fraction``), so what the
    loss sees is the class balance near the kidneys, not over the whole scan: the fractions are
    measured inside each case's foreground bounding box (median over cases). Positives get
    sqrt(negatives / positives), capped, a compromise between no weighting and full inverse
    frequency; whole-scan frequencies made every weight hit the cap and the network
    over-segment threefold.
    """
    kidney_fractions, tumour_fractions = [], []
    for case in fingerprint["cases"]:
        box = case.get("foreground_bbox")
        if not box:
            continue
        box_voxels = float(np.prod([b - a for a, b in box]))
        kidney_fractions.append((case["voxels"]["kidney"] + case["voxels"]["tumour"]) / box_voxels)
        if case["voxels"]["tumour"]:
            tumour_fractions.append(case["voxels"]["tumour"] / box_voxels)

    def weight(fractions: list[float], fallback: float) -> float:
        fraction = float(np.median(fractions)) if fractions else fallback
        fraction = min(max(fraction, 1e-6), 0.5)
        return round(float(min(cap, max(1.0, math.sqrt((1 - fraction) / fraction)))), 4)

    kidney_weight = weight(kidney_fractions, 0.2)
    return (kidney_weight, weight(tumour_fractions, 0.02)), kidney_weight


def plan_from_fingerprint(preset: Plans, fingerprint: dict) -> Plans:
    plans = resolve_patch_sizes(preset)
    mean, std = intensity_statistics(fingerprint, plans.intensity.clip_hu)
    intensity = replace(plans.intensity,
                        mean=plans.intensity.mean if plans.intensity.mean is not None else round(mean, 4),
                        std=plans.intensity.std if plans.intensity.std is not None else round(std, 4))
    high_weights, low_weight = positive_weights(fingerprint, plans.loss.max_positive_weight)
    loss = replace(plans.loss,
                   high_positive_weights=(high_weights if plans.loss.high_positive_weights is None
                                          else plans.loss.high_positive_weights),
                   low_positive_weight=low_weight if plans.loss.low_positive_weight is None else plans.loss.low_positive_weight)
    return replace(plans, intensity=intensity, loss=loss, fingerprint_sha256=fingerprint["sha256"])


def run_plan(work: str | Path, preset: str = "paper", output: str | Path | None = None, force: bool = False) -> Path:
    """The plan stage: ``WORK/fingerprint.json`` + preset → ``WORK/plans.json``."""
    work = Path(work)
    out = Path(output) if output else work / PLANS_FILE
    fingerprint = load_fingerprint(work)
    plans = plan_from_fingerprint(load_preset(preset), fingerprint)
    if out.is_file() and not force:
        try:
            if load_plans(out).sha256() == plans.sha256():
                log.info("plans up to date: %s", out)
                return out
        except PlanError:
            pass  # an unreadable or stale plans file is replaced
    save_plans(plans, out)
    step = training_step_gflop(plans, plans.high.input_patch[0], plans.low.input_patch[0])
    log.info("wrote %s: preset %s, high %s mm in %s out %s, low %s mm in %s out %s, ~%.1f GFLOP per step",
             out, plans.preset, plans.high.spacing_mm, plans.high.input_patch, plans.high.output_patch,
             plans.low.spacing_mm, plans.low.input_patch, plans.low.output_patch, step)
    return out
