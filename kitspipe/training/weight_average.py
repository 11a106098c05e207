"""An exponential moving average of the network's weights, validated and exported in their place.

With batch size 1 and a learning rate large enough to train in minutes, consecutive Adam steps
pull the weights towards whichever patch came last: the whole-case validation Dice of the `cpu`
preset swung by ±0.2 between neighbouring epochs. The average over the last few hundred steps
sits in the middle of that walk. Training itself never sees the average; validation, the
``best`` checkpoint and inference use it (``training.weight_average_decay``).

The first updates use a smaller decay, ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so
that the randomly initialised weights are forgotten quickly instead of weighing on the average
for ``1 / (1 - decay)`` steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class WeightAverage:
    """Exponential moving average of every floating-point parameter and buffer of a module.

    Integer buffers (batch norm's step counter) are copied, not averaged.

    Args:
        module: the plain network (not a DDP or compiled wrapper), whose current weights start
            the average.
        decay: weight of the old average per update, in [0, 1).

    Example:
        >>> net = nn.Linear(1, 1, bias=False)
        >>> average = WeightAverage(net, decay=0.5)
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(1.0)
        >>> average.update(net)
        >>> average.updates
        1
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"weight_average_decay: must be within [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.averaged = {name: value.detach().clone() for name, value in module.state_dict().items()}

    def _decay_now(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the average towards the module's current weights (call after each optimiser step)."""
        weight_of_new = 1.0 - self._decay_now()
        for name, value in module.state_dict().items():
            average = self.averaged[name]
            if average.is_floating_point():
                average.lerp_(value.detach().to(average.dtype), weight_of_new)
            else:
                average.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, with the module's own keys."""
        return self.averaged

    def load(self, averaged: dict[str, torch.Tensor], updates: int) -> None:
        """Continue from a checkpoint's average."""
        missing = set(self.averaged) ^ set(averaged)
        if missing:
            raise ValueError(f"averaged weights do not match the network: {sorted(missing)[:5]}")
        for name, value in averaged.items():
            self.averaged[name].copy_(value)
        self.updates = int(updates)

    @contextlib.contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """Run a block (validation) with the averaged weights in ``module``, then restore its own."""
        own = {name: value.detach().clone() for name, value in module.state_dict().items()}
        module.load_state_dict(self.averaged)
        try:
            yield
        finally:
            module.load_state_dict(own)
