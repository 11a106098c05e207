"""``kitspipe train``: set up one fold and hand it to the shared loop, or resume it.

Output folder ``WORK/fold_K/<Trainer>/``: ``checkpoint_latest.{pt,json}``,
``checkpoint_best.{pt,json}``, ``training_log.csv``, ``progress.png``.

Resume policy (reliability checklist 29-31): ``--resume`` with nothing to resume is an error;
a finished fold is a no-op that says so (unless ``--epochs`` now allows more epochs than the
one that ended it); a changed plan or preprocessed data is refused unless ``--force``.
Without ``--resume`` an existing run is refused rather than silently overwritten.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from kitspipe.atomic import remove_stale_temporaries
from kitspipe.devices import (autocast_dtype, channels_last_active, describe, kernel_choice, maybe_compile,
                              set_memory_format)
from kitspipe.errors import KitspipeError, Problem
from kitspipe.locking import work_lock
from kitspipe.manifest import require_complete
from kitspipe.plans import Plans, load_plans
from kitspipe.preprocessing import PREPROCESSED_DIR
from kitspipe.trainers.registry import get_trainer, load_plugin
from kitspipe.training.checkpoint import load_tensors, read_resumable
from kitspipe.training.identity import determinism, refuse_changed_run, resume_identity
from kitspipe.training.loop import RunContext, fit
from kitspipe.training.splits import fold_cases, load_or_create_splits
from kitspipe.training.state import TrainingState, seed_everything, set_rng_state
from kitspipe.training.weight_average import WeightAverage

log = logging.getLogger(__name__)


def fold_folder(work: Path, fold: int, trainer_name: str) -> Path:
    return Path(work) / f"fold_{fold}" / trainer_name


def pick_device(requested: str | None) -> torch.device:
    """The requested device, else CUDA when present; under torchrun each rank takes its own GPU."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun; initialises the process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _apply_overrides(plans: Plans, trainer: str | None, epochs: int | None, max_minutes: float | None,
                     mixed_precision: str | None = None, compile_network: bool = False) -> Plans:
    changes = {}
    if mixed_precision is not None:
        changes["mixed_precision"] = mixed_precision
    if compile_network:
        changes["compile"] = True
    if trainer:
        changes["trainer"] = trainer
    if epochs is not None:
        changes["max_epochs"] = epochs
    if max_minutes is not None:
        changes["max_minutes"] = max_minutes
    return plans.with_training(**changes) if changes else plans


def train_fold(work: str | Path, fold: int, trainer: str | None = None, resume: bool | str = False,
               epochs: int | None = None, max_minutes: float | None = None, device: str | None = None,
               force: bool = False, plugins: tuple[str, ...] = (), progress: bool = True,
               mixed_precision: str | None = None, compile_network: bool = False) -> Path:
    """Train (or resume) one cross-validation fold; returns its output folder.

    Args:
        resume: True continues ``checkpoint_latest`` (an error if there is none); ``"auto"``
            continues it if present and starts the fold otherwise.
        mixed_precision: ``auto``, ``bf16`` or ``off``; overrides ``training.mixed_precision``.
        compile_network: turn ``training.compile`` on.
    """
    work = Path(work)
    for plugin in plugins:
        load_plugin(plugin)
    plans = _apply_overrides(load_plans(work / "plans.json"), trainer, epochs, max_minutes, mixed_precision,
                             compile_network)
    manifest = require_complete(work / PREPROCESSED_DIR / "manifest.json", "train", plans.preprocessing_sha256())
    case_ids = sorted(manifest["cases"])
    folds = load_or_create_splits(work, case_ids, plans.training.n_folds, plans.training.seed,
                                  plans.training.validation_fraction)
    split = fold_cases(folds, fold, work / "splits.json")
    trainer_cls = get_trainer(plans.training.trainer)
    folder = fold_folder(work, fold, trainer_cls.__name__)
    rank, world = _distributed()
    identity = resume_identity(plans, manifest["config_sha256"])
    target = pick_device(device)
    with (work_lock(folder, f"train fold {fold}") if rank == 0 else _nullcontext(),
          kernel_choice(plans.training.deterministic, target)):
        return _train_locked(work, folder, fold, plans, trainer_cls, split, identity, resume, force, target,
                             rank, world, progress)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _train_locked(work, folder, fold, plans, trainer_cls, split, identity, resume, force, target, rank, world,
                  progress) -> Path:
    from kitspipe.data.cases import open_cases

    if rank == 0:
        for stale in remove_stale_temporaries(folder):  # a write killed before its rename
            log.warning("removed the remains of an interrupted write: %s", stale)
    found = read_resumable(folder, "latest")
    metadata, weights = found if found is not None else (None, None)
    state = TrainingState()
    tensors = None
    if metadata is not None and not force:
        if not resume:
            if metadata["state"].get("finished"):
                log.info("fold %d already complete (%s); nothing to do", fold, metadata.get("weights_sha256", "")[:12])
                return folder
            raise KitspipeError(Problem("train", "-", folder, "a run exists here; pass --resume to continue it "
                                        "or --force to start over"))
        refuse_changed_run(metadata, identity, folder)
        state = TrainingState.from_json(metadata["state"])
        if state.finished and not _more_epochs_allowed(state, plans):
            log.info("fold %d already complete (checkpoint_latest sha256=%s): %s", fold,
                     metadata["weights_sha256"][:12], state.stop_reason)
            return folder
        if state.finished:
            state.phase_index -= 1  # back into the last phase, which a larger --epochs extends
        state.finished = False
        tensors = load_tensors(weights)
    elif resume is True and not force:
        raise KitspipeError(Problem("train", "-", folder, "nothing to resume (no valid checkpoint_latest)"))
    folder.mkdir(parents=True, exist_ok=True)
    seed_everything(plans.training.seed * 1000 + fold)
    trainer = trainer_cls(plans)
    network = trainer.build_network().to(target)
    loss_fn = trainer.build_loss().to(target)
    optimiser_state = None
    if tensors is not None:
        # With weight averaging, "model" holds the average and "training_model" the weights.
        network.load_state_dict(tensors.get("training_model", tensors["model"]))
        optimiser_state = tensors["optimiser"]
        set_rng_state(tensors["rng"])
    weight_average = None
    if plans.training.weight_average_decay is not None:
        weight_average = WeightAverage(network, plans.training.weight_average_decay)
        if tensors is not None and "training_model" in tensors:
            weight_average.load(tensors["model"], tensors["weight_average_updates"])
    network = set_memory_format(network, plans.training.channels_last, target)
    if world > 1:
        network = torch.nn.parallel.DistributedDataParallel(network, find_unused_parameters=True)
    # Compiled after the weights are loaded, so the checkpoint's plain keys meet the plain module.
    network = maybe_compile(network, plans.training.compile)
    log.info("training fold %d on %s", fold, describe(
        target, autocast_dtype(plans.training.mixed_precision, target),
        channels_last=channels_last_active(plans.training.channels_last, target), compile=plans.training.compile))
    reproducible = determinism(target, world, earlier=metadata.get("determinism") if tensors is not None else None)
    if reproducible["bitwise"]:
        log.info("training fold %d is deterministic: a rerun gives the same weights bit for bit", fold)
    else:
        log.warning("training fold %d is not deterministic: %s", fold, "; ".join(reproducible["reasons"]))
    preprocessed = work / PREPROCESSED_DIR
    context = RunContext(
        folder=folder, plans=plans, device=target,
        metadata={"trainer": trainer_cls.__name__, "fold": fold, **identity, "determinism": reproducible},
        deadline=(time.monotonic() + 60 * plans.training.max_minutes) if plans.training.max_minutes else None,
        make_batches=_batch_factory(open_cases(preprocessed, split["train"]), plans, rank, world),
        validation_cases=open_cases(preprocessed, split["validation"]), rank=rank, progress=progress,
        weight_average=weight_average)
    state = fit(trainer, network, loss_fn, state, context, optimiser_state)
    log.info("fold %d %s: %s", fold, "finished" if state.finished else "stopped", state.stop_reason)
    return folder


def _more_epochs_allowed(state: TrainingState, plans: Plans) -> bool:
    """A run that ended by reaching its epoch limit continues when --epochs raises the limit."""
    return state.stop_reason.endswith(" epochs") and int(state.stop_reason.split()[0]) < plans.training.max_epochs


def _batch_factory(cases, plans: Plans, rank: int, world: int):
    from kitspipe.data.augmentation import make_augmenter
    from kitspipe.data.loader import make_loader
    from kitspipe.data.sampling import PatchSampler

    sampler = PatchSampler(cases, plans, make_augmenter(plans))
    checked = []

    def make_batches(epoch: int, start_step: int, steps: int):
        # /dev/shm is checked before the first epoch only: a later, passing shortage (parallel
        # folds filling it for a moment) must not end a run that is hours in.
        loader = make_loader(sampler, plans, epoch=epoch, steps=steps, num_workers=plans.training.num_workers,
                             seed=plans.training.seed * 1000003 + rank, start_step=start_step,
                             check_shared_memory=not checked)
        checked.append(True)
        return loader

    return make_batches
