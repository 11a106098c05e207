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

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader, Dataset

from kitspipe.data.sampling import PatchSampler
from kitspipe.plans import Plans

# A worker that has produced nothing for this long is taken to be hung; the loader then raises.
DEFAULT_TIMEOUT_S = 300.0


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


def make_loader(sampler: PatchSampler, plans: Plans, epoch: int, steps: int, num_workers: int, seed: int,
                start_step: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S) -> DataLoader:
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
        timeout_s: seconds to wait for a batch from a worker before raising.
    """
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step must be within [0, {steps}], got {start_step}")
    batch_size = plans.training.batch_size
    dataset = PatchPairDataset(sampler, seed, epoch, start_step * batch_size, (steps - start_step) * batch_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        timeout=timeout_s if num_workers > 0 else 0,
        worker_init_fn=limit_worker_threads if num_workers > 0 else None,
    )
