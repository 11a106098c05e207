"""The trainer interface: what differs between methods, and nothing the training loop shares.

A trainer builds the network and loss from the plans, lists its training phases, computes
the loss of a batch and scores a validation case. The loop (``kitspipe.training.loop``) does
everything else — data, optimiser, schedule, validation cadence, checkpoints, resume, early
stopping, logs — the same way for every trainer. A variant overrides one hook.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import nn

from kitspipe.losses import LossTerms
from kitspipe.plans import Plans
from kitspipe.trainers.registry import register


@dataclass(frozen=True)
class Phase:
    """One stage of training with its own optimiser and learning-rate schedule.

    Args:
        name: shown in logs and checkpoints.
        max_epochs: upper bound on epochs in this phase.
        score: validation metric that selects the best checkpoint and drives early stopping.
        stop_at: end the phase once ``score`` reaches this value (paper: low-res Dice 0.90).
        patience: end after this many epochs without improvement of ``score``; None = never.
    """

    name: str
    max_epochs: int
    score: str
    stop_at: float | None = None
    patience: int | None = None


class Trainer(ABC):
    """Base class; subclasses register themselves under their class name."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register(cls)

    def __init__(self, plans: Plans):
        self.plans = plans

    @abstractmethod
    def build_network(self) -> nn.Module:
        """The network, from the plans."""

    @abstractmethod
    def build_loss(self) -> nn.Module:
        """The loss module, from the plans."""

    def phases(self) -> list[Phase]:
        t = self.plans.training
        return [Phase("full", t.max_epochs, "val_score", patience=t.patience)]

    def trainable_parameters(self, network: nn.Module, phase: Phase) -> Iterable[nn.Parameter]:
        """Parameters the phase's optimiser updates (and everything else is frozen)."""
        return network.parameters()

    def set_train_mode(self, network: nn.Module, phase: Phase) -> None:
        """Put the network in training mode; frozen parts go to eval mode so that their batch
        norm statistics stay fixed too."""
        network.train()

    @abstractmethod
    def loss(self, network: nn.Module, loss_fn: nn.Module, batch: dict[str, torch.Tensor], phase: Phase) -> LossTerms:
        """Forward pass and loss terms of one batch in ``phase``."""

    def validation_metrics(self, network: nn.Module, case, phase: Phase, device: torch.device) -> dict[str, float]:
        """Metrics of one whole validation case (see ``kitspipe.training.validation``)."""
        from kitspipe.training.validation import whole_case_metrics

        return whole_case_metrics(network, case, self.plans, device, low_only=False)

    @staticmethod
    def summarise(per_case: list[dict[str, float]]) -> dict[str, float]:
        keys = per_case[0].keys() if per_case else []
        summary = {k: float(np.mean([m[k] for m in per_case])) for k in keys}
        if "val_kidney_dice" in summary and "val_tumour_dice" in summary:
            summary["val_score"] = (summary["val_kidney_dice"] + summary["val_tumour_dice"]) / 2
        return summary
