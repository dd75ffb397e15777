"""Exponential moving average of the weights (Polyak averaging), evaluated and exported when enabled."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModelEMA:
    """A frozen copy of a model whose weights follow ``ema = d * ema + (1 - d) * weights`` after each
    optimizer step. The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates ``n``
    (as TensorFlow's ExponentialMovingAverage does), so short runs do not average in the random init."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        weights = model.state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = weights[name].detach()
            if ema_value.is_floating_point():
                ema_value.lerp_(value.to(ema_value.dtype), 1.0 - decay)
            else:
                ema_value.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
