"""Batches of patch pairs for one training epoch, drawn in background workers.

Determinism: sample ``k`` of epoch ``e`` (``k = step · batch_size + position in batch``) is
drawn by the sampler from ``np.random.default_rng([seed, e, k])`` and from nothing else. A
batch therefore does not depend on how many workers there are, which worker drew it, or
what was drawn before it, and a run resumed at (epoch, step) gets exactly the batches it
would have seen had it not stopped: pass that step as ``start_step``.

The loader is a torch ``DataLoader`` over a map-style dataset of sample indices, without
shuffling (the randomness is in the seeds), so batches arrive in step order.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader, Dataset

from kitspipe.data.sampling import PatchSampler
from kitspipe.errors import KitspipeError, Problem
from kitspipe.plans import Plans
from kitspipe.preflight import require_shared_memory

# A worker that has produced nothing for this long is taken to be hung; the loader then raises.
DEFAULT_TIMEOUT_S = 300.0
# Batches each worker prepares ahead (torch's default, set explicitly so the /dev/shm estimate holds).
PREFETCH_BATCHES = 2


class PatchPairDataset(Dataset):
    """Samples ``first_sample .. first_sample + length − 1`` of one epoch, as arrays.

    Args:
        sampler: draws one pair from a generator.
        seed: the run's seed (``training.seed``).
        epoch: the epoch, part of every sample's seed.
        first_sample: index within the epoch of this dataset's first sample.
        length: number of samples.
    """

    def __init__(self, sampler: PatchSampler, seed: int, epoch: int, first_sample: int, length: int) -> None:
        self.sampler = sampler
        self.seed = seed
        self.epoch = epoch
        self.first_sample = first_sample
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.epoch, self.first_sample + index])
        pair = self.sampler.sample(rng)
        return {
            "high_image": pair.high_image[np.newaxis],
            "low_image": pair.low_image[np.newaxis],
            "high_target": pair.high_target,
            "low_target": pair.low_target,
            "tumour_present": np.array([pair.tumour_present], dtype=np.float32),
        }


def limit_worker_threads(worker_id: int) -> None:
    """Run each worker on one thread: parallelism comes from the workers, not inside them."""
    torch.set_num_threads(1)
    threadpool_limits(limits=1)


def batch_bytes(plans: Plans) -> int:
    """Bytes of one float32 batch as ``make_loader`` yields it (see its docstring for the shapes)."""
    voxels = (math.prod(plans.high.input_patch) + math.prod(plans.low.input_patch)
              + 2 * math.prod(plans.high.output_patch) + math.prod(plans.low.output_patch) + 1)
    return 4 * plans.training.batch_size * voxels


def shared_memory_bytes(plans: Plans, num_workers: int) -> int:
    """/dev/shm the workers use at once: every prefetched batch, plus the one being trained on."""
    return (num_workers * PREFETCH_BATCHES + 1) * batch_bytes(plans) if num_workers > 0 else 0


class WatchedLoader:
    """A DataLoader whose worker failures become one-line errors naming the stage.

    torch reports a hung worker (``timeout``) or one killed by the OOM killer as a
    RuntimeError with a traceback through its internals, which says neither which stage
    stopped nor what to change.
    """

    def __init__(self, loader: DataLoader, stage: str) -> None:
        self.loader = loader
        self.stage = stage

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        iterator = iter(self.loader)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except RuntimeError as error:
                failure = self.worker_failure(error, iterator)
                if failure is None:
                    raise
                raise failure from None
            yield batch

    def worker_failure(self, error: RuntimeError, iterator: object = None) -> KitspipeError | None:
        """The one-line error for a hung or dead worker (stopping the workers), else None."""
        problem = self._problem(str(error))
        if problem is None:
            return None
        if iterator is not None:
            _stop_workers(iterator)
        return KitspipeError(problem)

    def _problem(self, message: str) -> Problem | None:
        workers = f"{self.loader.num_workers} workers"
        if "timed out" in message:
            return Problem(self.stage, "-", "data loader", "a worker process hung; no batch arrived in time "
                           "(slow or stalled disk?); rerun, or set training.num_workers to 0 to see where",
                           f"nothing for {self.loader.timeout:g} s from {workers}", "a batch")
        if "exited unexpectedly" in message or "killed by signal" in message:
            return Problem(self.stage, "-", "data loader", "a worker process died (killed for memory?); "
                           "lower training.num_workers or set it to 0", workers, "fewer workers")
        return None


def _stop_workers(iterator: object) -> None:
    # torch joins each worker for up to 5 s when the iterator is collected, so a hung worker
    # would only delay the error; it is ended now. Its pid is first taken off torch's SIGCHLD
    # watch list, which would otherwise raise "worker killed" from a signal handler at some
    # later, arbitrary point. Both are private torch details, hence the guards.
    from torch.utils.data import _utils

    try:
        _utils.signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    except (AttributeError, KeyError):
        pass
    for worker in getattr(iterator, "_workers", []):
        if worker.is_alive():
            worker.kill()


def make_loader(sampler: PatchSampler, plans: Plans, epoch: int, steps: int, num_workers: int, seed: int,
                start_step: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S, stage: str = "train",
                check_shared_memory: bool = True) -> WatchedLoader:
    """The batches of steps ``start_step .. steps − 1`` of one epoch.

    Each batch is a dict of float32 tensors: ``high_image`` (B, 1, P_h³), ``low_image``
    (B, 1, P_l³), ``high_target`` (B, 2, O_h³), ``low_target`` (B, 1, O_l³) and
    ``tumour_present`` (B, 1), with ``B = training.batch_size``.

    Args:
        sampler: draws the patch pairs.
        plans: the resolved plan (batch size).
        epoch: the epoch index, part of every sample's seed.
        steps: steps in the epoch (usually ``training.steps_per_epoch``).
        num_workers: background worker processes; 0 draws in the calling process.
        seed: the run's seed.
        start_step: first step to produce, to resume inside an epoch.
        timeout_s: seconds to wait for a batch from a worker before the stage stops with an error.
        stage: the stage named in error lines.
        check_shared_memory: check that /dev/shm holds the workers' batches (see ``preflight``).

    Raises:
        KitspipeError: /dev/shm too small for the workers (checked here, before any is started);
            while iterating, a worker that hangs past ``timeout_s`` or dies.
    """
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step must be within [0, {steps}], got {start_step}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if num_workers > 0 and check_shared_memory:
        require_shared_memory(stage, shared_memory_bytes(plans, num_workers))
    batch_size = plans.training.batch_size
    dataset = PatchPairDataset(sampler, seed, epoch, start_step * batch_size, (steps - start_step) * batch_size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        timeout=timeout_s if num_workers > 0 else 0,
        worker_init_fn=limit_worker_threads if num_workers > 0 else None,
        prefetch_factor=PREFETCH_BATCHES if num_workers > 0 else None,
    )
    return WatchedLoader(loader, stage)
