"""``kitspipe infer``: trained folds + raw cases → label files on the input's own grid.

Each case is preprocessed exactly as in training (``preprocessing.prepare_case``), predicted by
every requested fold on the case and on its mirror images when the plan asks for test-time
mirroring (probabilities averaged: an ensemble), resampled back to the original
grid, thresholded and post-processed, and written as ``OUTPUT/<case>.nii.gz`` (uint8 0/1/2).
``OUTPUT/manifest.json`` records inputs, models and outputs by hash, so a rerun after a kill
redoes only the cases whose output is missing or does not verify.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from kitspipe.atomic import canonical_json, remove_stale_temporaries
from kitspipe.dataset import CaseFiles, Dataset, discover
from kitspipe.errors import KitspipeError, Problem
from kitspipe.hashing import file_sha256
from kitspipe.imageio import read_volume
from kitspipe.inference.export import labels_from_probabilities, to_source_grid, write_prediction, write_probabilities
from kitspipe.inference.memory_fallback import predict_with_fallback
from kitspipe.inference.mirroring import mirror, mirror_box, mirrorings
from kitspipe.inference.predictor import low_resolution_on_high, normalise, predict_volume
from kitspipe.inference.region_of_interest import fine_region, region_applies
from kitspipe.locking import work_lock
from kitspipe.manifest import MANIFEST_FILE, StageManifest
from kitspipe.plans import Plans, load_plans
from kitspipe.postprocessing import PostprocessingSettings
from kitspipe.preflight import export_bytes_needed, require_free_disk, warn_if_disk_may_not_suffice
from kitspipe.preprocessing import prepare_case
from kitspipe.progress import progress_bar
from kitspipe.resampling import Box
from kitspipe.trainers.registry import get_trainer, load_plugin
from kitspipe.training.checkpoint import load_tensors, read_metadata
from kitspipe.training.run import fold_folder, pick_device
from kitspipe.validation import check_dataset

log = logging.getLogger(__name__)


def load_fold_model(work: Path, fold: int, plans: Plans, trainer_name: str, device: torch.device,
                    checkpoint: str = "best") -> tuple[torch.nn.Module, str]:
    """The network of one trained fold and the hash of its weights (best, else latest)."""
    folder = fold_folder(work, fold, trainer_name)
    for tag in ((checkpoint, "latest") if checkpoint == "best" else (checkpoint,)):
        metadata = read_metadata(folder, tag)
        if metadata is not None:
            network = get_trainer(trainer_name)(plans).build_network()
            network.load_state_dict(load_tensors(folder / f"checkpoint_{tag}.pt", stage="infer")["model"])
            return network.to(device).eval(), metadata["weights_sha256"]
    raise KitspipeError(Problem("infer", "-", folder, "no trained checkpoint for this fold",
                                "none", f"checkpoint_{checkpoint}.pt"))


def postprocessing_settings(plans: Plans, enabled: bool = True) -> PostprocessingSettings:
    p = plans.postprocessing
    settings = PostprocessingSettings(**asdict(p))
    if not enabled:
        settings = replace(settings, keep_largest_kidney_per_side=False, drop_unconnected_tumour=False,
                           low_resolution_mask=False, min_tumour_volume_ml=0.0,
                           min_tumour_fraction_in_kidney_region=0.0)
    return settings


def predict_case(models: list[torch.nn.Module], image, plans: Plans, mode: str, device: torch.device,
                 progress: bool = False, case_id: str = "-",
                 region_of_interest: bool | Box = False) -> tuple[np.ndarray, np.ndarray | None, object]:
    """Probabilities of one case on its canonical source grid, averaged over the folds and the
    plan's test-time mirrorings (``inference.mirror_axes``).

    ``region_of_interest``: see ``predict_volume`` (only when ``region_applies``).
    """
    prepared = prepare_case(image, None, plans)
    high = normalise(prepared.high_image, plans)
    low = normalise(prepared.low_image, plans)
    channels = predict_views(models, high, low, plans, mode, device, progress, case_id, region_of_interest)
    on_source = to_source_grid(channels, prepared.high_grid, image, prepared.crop)
    return on_source[:2], (on_source[2] if len(on_source) > 2 else None), prepared


def predict_views(models: list[torch.nn.Module], high: np.ndarray, low: np.ndarray, plans: Plans, mode: str,
                  device: torch.device, progress: bool = False, case_id: str = "-",
                  region_of_interest: bool | Box = False) -> np.ndarray:
    """The mean prediction of every fold on every mirrored view, on the preprocessed grids.

    Returns:
        (C, z, y, x) on the high-resolution grid: kidney ∪ tumour, tumour and, for networks
        with a low-resolution branch, its upsampled kidney ∪ tumour probability.
    """
    views = [(network, m) for network in models for m in mirrorings(plans.inference.mirror_axes)]
    if isinstance(region_of_interest, Box):
        alignment = 2**plans.high.depth
        regions_of_interest = [mirror_box(region_of_interest, high.shape, m, alignment) for _, m in views]
    elif region_of_interest and len(views) > 1 and mode == "fast":
        regions_of_interest = _shared_regions(views, high, low, plans, device, case_id)
    else:
        regions_of_interest = [region_of_interest] * len(views)
    total = None
    # The tiling that fitted in memory: later views start from it rather than from the plan's.
    fitted = {"mode": mode, "plans": plans}
    for (network, mirroring), region in zip(views, regions_of_interest):
        def predict(tile_mode: str, tile_plans: Plans):
            result = predict_volume(network, mirror(high, mirroring), mirror(low, mirroring), tile_plans,
                                    mode=tile_mode, device=device, progress=progress, region_of_interest=region)
            fitted.update(mode=tile_mode, plans=tile_plans)
            return result

        prediction = predict_with_fallback(predict, fitted["plans"], fitted["mode"], case=case_id,
                                           high_shape=high.shape)
        parts = [prediction.regions] + ([prediction.low_on_high[None]] if prediction.low_on_high is not None else [])
        if total is None:  # a whole case's channels can take gigabytes: one sum, added to in place
            total = np.zeros((sum(len(p) for p in parts), *high.shape), dtype=np.float32)
        start = 0
        for part in parts:
            total[start:start + len(part)] += mirror(part, mirroring, channels=1, copy=False)
            start += len(part)
    total /= len(views)
    return total


def _shared_regions(views, high: np.ndarray, low: np.ndarray, plans: Plans, device: torch.device,
                    case_id: str) -> list[bool | Box]:
    """Each view's fine-network box when several views (folds, mirrorings) are averaged.

    Post-processing masks with the averaged low-resolution probability, which can keep a voxel
    that one view's own mask does not reach; the box of the views' union holds every such voxel.
    It is taken in each view's own frame, so that its start lies on that view's pooling grid.
    """
    reach = None
    try:
        for network, mirroring in views:
            one = low_resolution_on_high(network, mirror(low, mirroring), high.shape, plans, device)
            if one is None:  # a network without a low-resolution branch
                return [True] * len(views)
            one = mirror(one, mirroring, copy=False)
            reach = np.array(one) if reach is None else np.maximum(reach, one, out=reach)
    except (torch.cuda.OutOfMemoryError, MemoryError):
        log.warning("infer %s: no memory for the low-resolution passes of %d views; the 1 mm network runs "
                    "on the whole grid", case_id, len(views))
        return [False] * len(views)
    return [fine_region(mirror(reach, mirroring), plans) or Box((0, 0, 0), (0, 0, 0)) for _, mirroring in views]


def run_inference(work: str | Path, input_dir: str | Path, output_dir: str | Path, folds: list[int] | None = None,
                  mode: str | None = None, save_probabilities: bool = False, device: str | None = None,
                  trainer: str | None = None, checkpoint: str | None = None, postprocess: bool = True,
                  plugins: tuple[str, ...] = (), progress: bool = True, case_ids: list[str] | None = None,
                  unprocessed_dir: str | Path | None = None, mixed_precision: str | None = None,
                  mirror_axes: list[str] | None = None) -> Path:
    """The infer stage.

    Args:
        folds: folds whose models are averaged (default: fold 0).
        mode: tiling mode, ``paper`` or ``fast`` (default from the plan).
        checkpoint: ``best`` (falls back to ``latest``) or ``latest``; default from the plan.
        postprocess: apply the plan's post-processing.
        case_ids: predict only these cases of ``input_dir``.
        unprocessed_dir: also write the labels before post-processing there (cross-validation
            reports the effect of post-processing from one prediction).
        mixed_precision: ``auto``, ``bf16`` or ``off``; overrides ``inference.mixed_precision``
            (part of the plan hash, so a changed precision redoes the cases).
        mirror_axes: test-time mirroring axes (``z``, ``y``, ``x``; empty: none); overrides
            ``inference.mirror_axes``, and like the precision redoes the cases when it changes.
    """
    work, output_dir = Path(work), Path(output_dir)
    for plugin in plugins:
        load_plugin(plugin)
    plans = load_plans(work / "plans.json")
    if mixed_precision is not None:
        plans = replace(plans, inference=replace(plans.inference, mixed_precision=mixed_precision))
    if mirror_axes is not None:
        try:
            plans = replace(plans, inference=replace(plans.inference, mirror_axes=tuple(mirror_axes)))
        except ValueError as error:
            raise KitspipeError(f"infer: --mirror-axes: {error}") from None
    trainer_name = trainer or plans.training.trainer
    checkpoint = checkpoint or plans.inference.checkpoint
    folds = list(folds if folds is not None else [0])
    mode = mode or plans.inference.tile_mode
    if mode == "fast" and plans.network.normalisation == "instance":
        log.warning("infer: fast tiles with instance norm compute each tile's statistics over a larger "
                    "region than the training patches; the paper mode reproduces training (docs/inference.md)")
    target = pick_device(device)
    dataset = discover(input_dir, stage="infer")
    cases = [c for c in dataset.cases if case_ids is None or c.case_id in set(case_ids)]
    images_only = Dataset(dataset.root, dataset.layout, tuple(CaseFiles(c.case_id, c.image, None) for c in cases))
    check_dataset(images_only, stage="infer", progress=False).raise_if_errors()
    models, hashes = [], []
    for fold in folds:
        network, digest = load_fold_model(work, fold, plans, trainer_name, target, checkpoint)
        models.append(network)
        hashes.append(digest)
    settings = postprocessing_settings(plans, postprocess)
    # Unprocessed labels need every voxel's probability, so they turn the shortcut off.
    region_of_interest = region_applies(plans, postprocess and unprocessed_dir is None)
    config = {"plans": plans.sha256(), "models": hashes, "mode": mode, "postprocessing": settings.to_dict(),
              "probabilities": save_probabilities, "unprocessed": str(unprocessed_dir)}
    config_sha = hashlib.sha256(canonical_json(config).encode()).hexdigest()
    with work_lock(output_dir, "infer"):
        remove_stale_temporaries(output_dir)
        manifest = StageManifest.open(output_dir / MANIFEST_FILE, "infer", config_sha)
        manifest.extra = {"trainer": trainer_name, "folds": folds, "mode": mode}
        # Cases already done are skipped below; their outputs are on the disk already.
        pending = {c.case_id: c.image for c in cases if manifest.cases.get(c.case_id, {}).get("status") != "done"}
        lower, upper = export_bytes_needed(pending, files_per_case=1 + (unprocessed_dir is not None),
                                           probabilities=save_probabilities)
        require_free_disk("infer", output_dir, lower)
        warn_if_disk_may_not_suffice("infer", output_dir, upper)
        with manifest.marking_interrupts():
            for case in progress_bar(cases, desc="infer", enabled=progress):
                inputs = {"image": file_sha256(case.image)}
                if manifest.is_current(case.case_id, inputs):
                    continue
                image = read_volume(case.image, dtype=np.float32, stage="infer", case=case.case_id)
                regions, low, _ = predict_case(models, image, plans, mode, target, case_id=case.case_id,
                                               region_of_interest=region_of_interest)
                labels = labels_from_probabilities(regions, low, image.grid.spacing, settings)
                written = [output_dir / f"{case.case_id}.nii.gz"]
                write_prediction(labels, image, written[0])
                if save_probabilities:
                    written.append(output_dir / f"{case.case_id}_probabilities.npz")
                    write_probabilities(regions, low, written[-1])
                if unprocessed_dir is not None:
                    raw = labels_from_probabilities(regions, low, image.grid.spacing,
                                                    postprocessing_settings(plans, False))
                    write_prediction(raw, image, Path(unprocessed_dir) / f"{case.case_id}.nii.gz")
                manifest.record(case.case_id, inputs, written)
                manifest.save(status="incomplete")
                log.info("infer %s -> %s", case.case_id, written[0])
        manifest.save(status="complete")
    return output_dir
