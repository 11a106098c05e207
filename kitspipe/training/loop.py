"""The training loop shared by every trainer: phases, epochs, validation, checkpoints, resume.

Per phase: a fresh Adam optimiser over the phase's trainable parameters, learning rate
``learning_rate · lr_decay_per_epoch ** epoch_in_phase`` (paper: 1e-4, ×0.9 per epoch),
``steps_per_epoch`` optimiser steps on sampled patch pairs, then validation on whole cases
(every ``validation_interval``-th epoch),
the best checkpoint kept by the phase's score, and early stopping by ``patience`` or the
phase's target score. ``checkpoint_latest`` is written after every epoch (and when a time
budget stops an epoch midway), so a killed run loses at most one epoch, and resuming replays
exactly: patches are drawn from seeds of (seed, epoch, step), and model, optimiser and RNG
states are restored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kitspipe.devices import autocast, autocast_dtype, batch_to_device, channels_last_active, unwrap
from kitspipe.errors import KitspipeError, Problem
from kitspipe.plans import Plans
from kitspipe.trainers.base import Phase, Trainer
from kitspipe.training.checkpoint import save_checkpoint
from kitspipe.training.history import plot_progress, write_log
from kitspipe.training.state import TrainingState, rng_state
from kitspipe.training.weight_average import WeightAverage

log = logging.getLogger(__name__)

# An epoch that waited for batches longer than this share of its training time is loader-bound;
# epochs shorter than MIN_EPOCH_SECONDS_TO_JUDGE are dominated by the workers' start-up.
DATA_BOUND_SHARE = 0.3
MIN_EPOCH_SECONDS_TO_JUDGE = 10.0


@dataclass
class RunContext:
    """What the loop needs besides the trainer: where to write, on what, for how long."""

    folder: Path
    plans: Plans
    metadata: dict  # trainer name, fold, plan hashes: goes into every checkpoint sidecar
    device: torch.device
    deadline: float | None  # time.monotonic() value after which training stops
    make_batches: object  # callable(epoch, start_step, steps) -> iterator of batch dicts
    validation_cases: list
    rank: int = 0
    progress: bool = True
    weight_average: WeightAverage | None = None  # validated, saved as "model" and inferred in place of the weights


def _learning_rate(plans: Plans, epoch_in_phase: int) -> float:
    return plans.training.learning_rate * plans.training.lr_decay_per_epoch ** epoch_in_phase


def save_state(context: RunContext, network: nn.Module, optimiser: torch.optim.Optimizer, state: TrainingState,
               tag: str = "latest") -> None:
    if context.rank != 0:
        return
    core = unwrap(network)  # plain keys whether the network is data-parallel, compiled or neither
    tensors = {"model": core.state_dict(), "optimiser": optimiser.state_dict(), "rng": rng_state()}
    if context.weight_average is not None:
        # "model" is what inference loads; the weights that training continues from sit beside it.
        tensors.update(model=context.weight_average.state_dict(), training_model=core.state_dict(),
                       weight_average_updates=context.weight_average.updates)
    save_checkpoint(context.folder, tag, tensors, {**context.metadata, "state": state.to_json()})


def _agree(value):
    """Rank 0's value on every rank, so that all ranks take the same stop decisions."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _past(deadline: float | None) -> bool:
    return _agree(deadline is not None and time.monotonic() > deadline)


def validate(trainer: Trainer, network: nn.Module, phase: Phase, context: RunContext) -> dict[str, float]:
    average = context.weight_average
    with average.applied(unwrap(network)) if average is not None else contextlib.nullcontext():
        per_case = [trainer.validation_metrics(network, case, phase, context.device)
                    for case in context.validation_cases]
    return trainer.summarise(per_case)


def run_epoch(trainer: Trainer, network: nn.Module, loss_fn: nn.Module, optimiser: torch.optim.Optimizer,
              phase: Phase, state: TrainingState, context: RunContext) -> dict:
    """Train until the epoch's steps are done or the deadline passes; returns running sums."""
    plans = context.plans
    steps = plans.training.steps_per_epoch
    sums = dict(state.partial_epoch) or {"loss_total": 0.0, "loss_high": 0.0, "loss_low": 0.0,
                                         "loss_classification": 0.0, "steps": 0, "seconds_data": 0.0,
                                         "seconds_compute": 0.0, "skipped_steps": 0}
    trainer.set_train_mode(network, phase)
    dtype = autocast_dtype(plans.training.mixed_precision, context.device)
    channels_last = channels_last_active(plans.training.channels_last, context.device)
    batches = context.make_batches(state.global_epoch, state.step_in_epoch, steps)
    waited = time.perf_counter()
    try:
        for batch in batches:
            started = time.perf_counter()
            sums["seconds_data"] += started - waited
            batch = batch_to_device(batch, context.device, channels_last)
            optimiser.zero_grad(set_to_none=True)
            # Forward and loss under autocast (the losses cast logits to float32 themselves);
            # backward outside it, as torch recommends. bf16 needs no GradScaler.
            with autocast(context.device, dtype):
                terms = trainer.loss(network, loss_fn, batch, phase)
            if not torch.isfinite(terms.total):
                if plans.training.non_finite_loss == "stop":
                    raise KitspipeError(Problem("train", "-", context.folder, "non-finite loss; stopped, the last "
                                                "finite checkpoint is kept", f"{terms.total.item()} at epoch "
                                                f"{state.global_epoch} step {state.step_in_epoch}", "a finite loss"))
                sums["skipped_steps"] += 1
                state.skipped_steps += 1
            else:
                terms.total.backward()
                optimiser.step()
                if context.weight_average is not None:
                    context.weight_average.update(unwrap(network))
                for key, value in (("loss_total", terms.total), ("loss_high", terms.high), ("loss_low", terms.low),
                                   ("loss_classification", terms.classification)):
                    sums[key] += float(value.detach())
                sums["steps"] += 1
            state.step_in_epoch += 1
            waited = time.perf_counter()
            sums["seconds_compute"] += waited - started
            if state.step_in_epoch < steps and _past(context.deadline):
                break
    except RuntimeError as error:
        # torch reports a dead loader worker from its SIGCHLD handler, i.e. wherever the main
        # thread is at that moment (usually inside the step), not only from next(batches).
        failure = batches.worker_failure(error) if hasattr(batches, "worker_failure") else None
        if failure is None:
            raise
        raise failure from None
    return sums


def fit(trainer: Trainer, network: nn.Module, loss_fn: nn.Module, state: TrainingState, context: RunContext,
        optimiser_state: dict | None = None) -> TrainingState:
    """Run (or continue) every phase of ``trainer`` from ``state``."""
    phases = trainer.phases()
    warned_about_data = False
    while state.phase_index < len(phases) and not state.finished:
        phase = phases[state.phase_index]
        parameters = list(trainer.trainable_parameters(network, phase))
        optimiser = torch.optim.Adam(parameters, lr=_learning_rate(context.plans, state.epoch_in_phase))
        # A phase that has not started yet has a fresh optimiser in an uninterrupted run too.
        if optimiser_state is not None and (state.epoch_in_phase or state.step_in_epoch):
            optimiser.load_state_dict(optimiser_state)
        optimiser_state = None
        while state.epoch_in_phase < phase.max_epochs:
            for group in optimiser.param_groups:
                group["lr"] = _learning_rate(context.plans, state.epoch_in_phase)
            sums = run_epoch(trainer, network, loss_fn, optimiser, phase, state, context)
            if state.step_in_epoch < context.plans.training.steps_per_epoch:
                state.partial_epoch = sums
                state.stop_reason = "time budget reached mid-epoch"
                save_state(context, network, optimiser, state)
                log.info("%s: time budget reached at epoch %d step %d; resume continues here",
                         context.folder, state.global_epoch, state.step_in_epoch)
                return state
            state.partial_epoch = {}
            metrics, seconds_validation = {}, 0.0
            if _validation_due(context.plans, phase, state, context.deadline):
                validation_started = time.perf_counter()
                metrics = _agree(validate(trainer, network, phase, context) if context.rank == 0 else {})
                seconds_validation = time.perf_counter() - validation_started
            row = _history_row(phase, state, sums, metrics, optimiser, seconds_validation)
            state.history.append(row)
            state.epoch_in_phase += 1
            state.global_epoch += 1
            state.step_in_epoch = 0
            score = metrics.get(phase.score)
            improved = score is not None and (state.best_score is None or score > state.best_score)
            if improved:
                state.best_score = score
                state.epochs_without_improvement = 0
            else:
                state.epochs_without_improvement += 1
            done, reason = _phase_done(phase, state, score)
            last_phase = state.phase_index == len(phases) - 1
            if done:
                state.stop_reason = reason
            if improved and last_phase:
                save_state(context, network, optimiser, state, tag="best")
            if done:
                state.phase_index += 1
                state.finished = state.phase_index >= len(phases)
                if not state.finished:  # the last phase keeps its counters so --epochs can extend it
                    state.epoch_in_phase = 0
                    state.best_score = None
                    state.epochs_without_improvement = 0
            save_state(context, network, optimiser, state)
            _write_logs(context, state)
            # An epoch whose every step was skipped (non-finite loss) has no mean loss.
            loss_text = "n/a" if row["loss_total"] is None else f"{row['loss_total']:.4f}"
            log.info("%s epoch %d: loss %s, %s%s", phase.name, row["epoch"], loss_text,
                     ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), f" -> {reason}" if done else "")
            if not warned_about_data:
                warned_about_data = _warn_if_waiting_for_data(row, context.plans, context.rank)
            if done:
                break
            if _past(context.deadline):
                state.stop_reason = "time budget reached"
                save_state(context, network, optimiser, state)
                return state
    return state


def _warn_if_waiting_for_data(row: dict, plans: Plans, rank: int = 0) -> bool:
    """Warn (and return True) when an epoch spent more than DATA_BOUND_SHARE of its training time
    waiting for batches: the loader, not the device, sets the pace then. On a GPU the `paper`
    preset's step takes 0.03 s while one augmented sample costs 0.2-0.4 s of a CPU core
    (docs/performance.md), so the preset's 4 workers cannot keep up."""
    if rank != 0:  # one warning for the run, not one per process
        return False
    waited, computed = row["seconds_data"], row["seconds_compute"]
    if waited + computed < MIN_EPOCH_SECONDS_TO_JUDGE or waited <= DATA_BOUND_SHARE * (waited + computed):
        return False
    log.warning("epoch %d waited for data %.0f %% of its %.0f s of training: the loader sets the pace; raise "
                "training.num_workers (now %d; %d CPU cores available)", row["epoch"],
                100 * waited / (waited + computed), waited + computed, plans.training.num_workers, available_cores())
    return True


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, e.g. in a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity query
        return os.cpu_count() or 1


def _validation_due(plans: Plans, phase: Phase, state: TrainingState, deadline: float | None) -> bool:
    """Every ``validation_interval``-th epoch of a phase, and every epoch that may end it.

    Whole-case validation took 15-20 s after each 65-s epoch with valid 68³ tiles on two
    cores, which is why it can be thinned out. Epochs in between count towards patience
    like validated ones without improving; an epoch that may end the phase (its last, the
    one that exhausts patience, the first past the time budget) is validated, so that no
    phase ends without a score and a best checkpoint.
    """
    completed = state.epoch_in_phase + 1
    if completed % plans.training.validation_interval == 0 or completed >= phase.max_epochs:
        return True
    if phase.patience is not None and state.epochs_without_improvement + 1 >= phase.patience:
        return True
    return _past(deadline)  # the same decision on every rank


def _phase_done(phase: Phase, state: TrainingState, score: float | None) -> tuple[bool, str]:
    if phase.stop_at is not None and score is not None and score >= phase.stop_at:
        return True, f"{phase.score} {score:.3f} reached {phase.stop_at}"
    if phase.patience is not None and state.epochs_without_improvement >= phase.patience:
        return True, f"no improvement for {phase.patience} epochs"
    if state.epoch_in_phase >= phase.max_epochs:
        return True, f"{phase.max_epochs} epochs"
    return False, ""


def _history_row(phase: Phase, state: TrainingState, sums: dict, metrics: dict, optimiser, seconds_validation) -> dict:
    steps = max(1, sums["steps"])
    row = {"phase": phase.name, "epoch": state.global_epoch, "learning_rate": optimiser.param_groups[0]["lr"],
           "skipped_steps": sums["skipped_steps"], "seconds_data": sums["seconds_data"],
           "seconds_compute": sums["seconds_compute"], "seconds_validation": seconds_validation}
    for key in ("loss_total", "loss_high", "loss_low", "loss_classification"):
        row[key] = sums[key] / steps if sums["steps"] else None
    for key in ("val_kidney_dice", "val_tumour_dice", "val_low_dice", "val_score"):
        row[key] = metrics.get(key, "")
    return {k: (float(v) if isinstance(v, (np.floating,)) else v) for k, v in row.items()}


def _write_logs(context: RunContext, state: TrainingState) -> None:
    if context.rank != 0:
        return
    write_log(context.folder / "training_log.csv", state.history)
    plot_progress(context.folder / "progress.png", state.history)
