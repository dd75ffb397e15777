"""AdamW with the usual ViT exclusions from weight decay, and the warmup + cosine learning rate."""

from __future__ import annotations

import math

import torch
from torch import nn

from vitkit.train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weight matrices, and everything that should not shrink towards zero.

    Norm scales and all biases (every parameter with ``ndim <= 1``) and the parameters the model names in
    ``no_weight_decay()`` (position embeddings, class token) get no weight decay, as in the paper's
    training code and timm.
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name in skip or name.rsplit(".", 1)[-1] in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def no_decay_names(model: nn.Module) -> list[str]:
    """The names of the parameters :func:`param_groups` puts in the group without weight decay."""
    excluded = {id(p) for p in param_groups(model, 0.0)[1]["params"]}
    return [name for name, p in model.named_parameters() if id(p) in excluded]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    device = next(model.parameters()).device
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, fused=device.type == "cuda" or None)


def lr_at(step: int, *, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup from ``lr / warmup_steps`` to
    ``lr`` over ``warmup_steps`` steps, then a half cosine from ``lr`` down to ``min_lr`` at the last step.

    A pure function of the step, so resuming needs nothing but the step count.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
