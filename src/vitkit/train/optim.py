"""AdamW with the usual ViT exclusions from weight decay, and the warmup + cosine learning rate."""

from __future__ import annotations

import math

import torch
from torch import nn

from vitkit.finetune import param_groups as _param_groups
from vitkit.train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Parameter groups without weight decay for norms, biases, position embeddings and the class token,
    and with an ``lr_scale`` per layer when ``layer_decay`` is set (see :func:`vitkit.finetune.param_groups`)."""
    return _param_groups(model, weight_decay=weight_decay, layer_decay=layer_decay)


def no_decay_names(model: nn.Module) -> list[str]:
    """The names of the parameters :func:`param_groups` exempts from weight decay."""
    return [n for g in param_groups(model, 1.0) if g["weight_decay"] == 0 for n in g["param_names"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    device = next(model.parameters()).device
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_scale"]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=device.type == "cuda" or None)


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The learning rate reached after warmup: ``lr``, or ``blr * global_batch / 256`` when ``blr`` is set."""
    return cfg.lr if cfg.blr is None else cfg.blr * global_batch / 256


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
    """Set every group's learning rate to ``lr`` times its ``lr_scale`` (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
