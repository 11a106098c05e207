"""Everything a resumed run needs to continue exactly where a killed one stopped."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch


@dataclass
class TrainingState:
    phase_index: int = 0
    epoch_in_phase: int = 0  # epochs completed in the current phase
    step_in_epoch: int = 0  # steps completed in the epoch in progress (a time-budget stop)
    global_epoch: int = 0  # seeds the sampler: epoch e draws the same patches in every run
    best_score: float | None = None
    epochs_without_improvement: int = 0
    finished: bool = False
    stop_reason: str = ""
    skipped_steps: int = 0
    history: list[dict] = field(default_factory=list)
    partial_epoch: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TrainingState":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def rng_state() -> dict:
    """RNG states as tensors, so they travel in a weights-only checkpoint."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": torch.tensor([numpy_state[2], numpy_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([numpy_state[4]], dtype=torch.float64),
        "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss = (int(v) for v in state["numpy_pos"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(state["numpy_gauss"][0])))
    random.setstate((3, tuple(int(v) for v in state["python"]), None))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
