"""The optimizer's view of a model and the learning-rate schedule.

- :func:`param_groups`: weight decay only on weight matrices, and optional layer-wise learning-rate
  decay (each group carries an ``lr_scale`` that the scheduler multiplies in).
- :func:`build_optimizer`: AdamW, SGD with momentum (the paper's fine-tuning optimizer), or Muon for the
  encoder's weight matrices with AdamW for the rest (:class:`MuonAdamW`), over them.
- :func:`lr_at`: linear warmup then cosine decay, per optimizer step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from vitkit.train.config import OptimConfig

_EMBEDDING_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "reg_token")


def layer_id(name: str, depth: int) -> int:
    """The depth of a parameter for layer-wise decay: embeddings 0, block i is i + 1, the rest depth + 1."""
    if name.startswith(_EMBEDDING_PREFIXES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: nn.Module, weight_decay: float = 0.0,
                 layer_decay: float | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups of the trainable parameters.

    Weight decay applies to weight matrices only: never to biases, norms, the class token or the
    position embeddings. With ``layer_decay`` (e.g. 0.65-0.75 for fine-tuning, as in BEiT/MAE), the
    learning rate of layer ``l`` of ``L + 1`` is scaled by ``layer_decay ** (L + 1 - l)``: the head
    trains at the full rate, the embeddings at the smallest. Every group has ``lr_scale``, which a
    scheduler must multiply into the learning rate it sets.
    """
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    depth = len(getattr(model, "blocks", ()))
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = weight_decay > 0 and param.ndim > 1 and name not in skip and name.rsplit(".", 1)[-1] not in skip
        layer = layer_id(name, depth) if layer_decay is not None else depth + 1
        scale = layer_decay ** (depth + 1 - layer) if layer_decay is not None else 1.0
        group = groups.setdefault((layer, decay), {"params": [], "param_names": [], "lr_scale": scale,
                                                   "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]  # per layer: decayed first


def no_decay_names(model: nn.Module) -> list[str]:
    """The names of the parameters :func:`param_groups` exempts from weight decay."""
    return [n for g in param_groups(model, 1.0) if g["weight_decay"] == 0 for n in g["param_names"]]


def orthogonalize(matrix: Tensor, steps: int = 5) -> Tensor:
    """Approximately the nearest semi-orthogonal matrix ``U V^T`` to ``matrix = U S V^T``: Muon's quintic
    Newton-Schulz iteration on the Frobenius-normalised matrix, with Jordan's coefficients (3.4445, -4.7750,
    2.0315), which push every singular value into roughly [0.7, 1.2] in five steps."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix / (matrix.norm() + 1e-7)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


def is_muon_weight(name: str, param: Tensor) -> bool:
    """Muon trains the hidden layers' weight matrices: the encoder blocks' 2-D weights. The input layers
    (patch embedding or stem), the head, tokens, norms and biases stay with AdamW, as Muon's authors advise."""
    return name.startswith("blocks.") and param.ndim == 2


class MuonAdamW(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers") for the groups marked ``muon``,
    AdamW for the others.

    A Muon step takes Nesterov momentum of the gradient, orthogonalises it (:func:`orthogonalize`) and
    scales it by ``0.2 * sqrt(max(rows, cols))``, so that its RMS matches a typical AdamW update's (Liu et al.
    2025, "Muon is Scalable for LLM Training"): both kinds of group share one learning rate, schedule and
    decoupled weight decay. Used by the modded-nanoGPT and airbench CIFAR-10 speed runs. Replicated
    parameters only: a sharded matrix cannot be orthogonalised shard by shard.
    """

    def __init__(self, groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, momentum: float = 0.95) -> None:
        super().__init__(groups, {"lr": lr, "betas": tuple(betas), "eps": eps, "momentum": momentum,
                                  "weight_decay": 0.0, "muon": False})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                param.mul_(1 - lr * group["weight_decay"])
                if group["muon"]:
                    self._muon_update(param, group["momentum"], lr)
                else:
                    self._adamw_update(param, group["betas"], group["eps"], lr)
        return loss

    def _muon_update(self, param: Tensor, momentum: float, lr: float) -> None:
        state = self.state[param]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(param)
        buffer = state["momentum_buffer"]
        buffer.lerp_(param.grad, 1 - momentum)
        update = orthogonalize(param.grad.lerp(buffer, momentum))  # Nesterov
        param.add_(update, alpha=-lr * 0.2 * math.sqrt(max(param.shape)))

    def _adamw_update(self, param: Tensor, betas: tuple[float, float], eps: float, lr: float) -> None:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = betas
        grad = param.grad
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(eps)
        param.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** step))


def _split_muon(model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each group split in two by :func:`is_muon_weight` (empty halves dropped), marked ``muon``."""
    params = dict(model.named_parameters())
    split = []
    for group in groups:
        for muon in (True, False):
            names = [n for n in group["param_names"] if is_muon_weight(n, params[n]) == muon]
            if names:
                split.append({**group, "params": [params[n] for n in names], "param_names": names, "muon": muon})
    return split


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """``cfg.name`` (AdamW, SGD with momentum, or Muon with AdamW) over :func:`param_groups`; each group's
    initial ``lr`` is ``cfg.lr * lr_scale``."""
    device = next(model.parameters()).device
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_scale"]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.name == "muon":
        return MuonAdamW(_split_muon(model, groups), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                         momentum=cfg.momentum)
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
