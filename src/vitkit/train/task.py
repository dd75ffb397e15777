"""What the training loop trains for: a :class:`Task` says what one batch costs and what an evaluation
measures, so the same loop (checkpoints, resumption, signals, DDP, EMA, logging) serves classification
and other objectives such as masked-autoencoder pre-training.

A task is built once per run by :func:`build_task` from ``cfg.task``. The loop calls, in this order:

- :meth:`Task.build_model` once, for the model to train (before the optimizer and the EMA exist);
- :meth:`Task.train_step` for every micro-batch: the loss to minimise and a vector of sums over the
  batch (one per :attr:`Task.stat_names`, then the number of samples), which the loop accumulates,
  all-reduces across processes and divides into the means it logs (``loss``, ``acc``, ...);
- :meth:`Task.evaluate` at evaluation epochs: validation metrics (``val_*`` keys) of the model and,
  with EMA, of the averaged model; :attr:`Task.best_metric` of the latter picks ``best.pt``;
  then :meth:`Task.figures`, pictures of the model that the loop writes to the run directory and
  TensorBoard;
- :meth:`Task.export` once at the end, for what the run leaves in ``run_dir/model``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.data import Data
from vitkit.models.init import whiten_conv_
from vitkit.runtime import autocast
from vitkit.train.config import TrainConfig
from vitkit.train.distributed import World, all_reduce_sum
from vitkit.train.evaluate import evaluate
from vitkit.train.mae import MAEPretraining
from vitkit.train.rundir import build_run_model, export_model


class Task(Protocol):
    """A training objective. Implementations keep what they need (config, data, device) from
    construction; the loop hands them only the model and the batch."""

    stat_names: tuple[str, ...]
    """Names of the per-batch sums that :meth:`train_step` returns (before the sample count)."""
    best_metric: str
    """The evaluation key that picks the best checkpoint, e.g. ``"val_acc"``."""
    higher_is_better: bool

    def build_model(self) -> nn.Module:
        """The model to train, on the CPU (the loop moves it to the device)."""
        ...

    def train_step(self, model: nn.Module, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Forward one micro-batch: (the scalar loss to back-propagate, a float64 vector of
        ``len(stat_names) + 1`` sums over the batch, the last one the number of samples)."""
        ...

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of ``model`` on the validation split (keys ``val_*``), the same on every process."""
        ...

    def figures(self, model: nn.Module) -> dict[str, Any]:
        """Matplotlib figures of ``model`` to keep after an evaluation, by name (may be empty)."""
        ...

    def export(self, model: nn.Module, run_dir: Path, *, best: float | None, train_seconds: float) -> Path:
        """Write the final model (``model`` is the EMA model when there is one) and return its directory."""
        ...


class ClassificationTask:
    """Cross-entropy on integer labels or soft (B, K) targets (mixup, cutmix, label smoothing); logs loss
    and top-1 accuracy (against the argmax of soft targets), evaluates top-1, top-5 and loss, keeps the
    most accurate model as ``best.pt``."""

    stat_names = ("loss", "acc")
    best_metric = "val_acc"
    higher_is_better = True

    def __init__(self, cfg: TrainConfig, data: Data, *, device: torch.device, world: World) -> None:
        self.cfg, self.data, self.device, self.world = cfg, data, device, world

    def build_model(self) -> nn.Module:
        model = build_run_model(self.cfg, self.data)
        if self.cfg.whiten_stem:
            whiten_stem_(model, self.data, self.world)
        return model

    def train_step(self, model: nn.Module, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        with autocast(self.cfg.precision, self.device):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), targets)
        with torch.no_grad():
            labels = targets if targets.ndim == 1 else targets.argmax(dim=1)
            n = labels.numel()
            sums = torch.stack([loss.detach().double() * n, (logits.argmax(dim=1) == labels).sum().double(),
                                torch.tensor(float(n), dtype=torch.float64, device=loss.device)])
        return loss, sums

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        result = evaluate(model, self.data.val.batches(), self.data.num_classes, device=self.device,
                          precision=self.cfg.precision, world=self.world, hflip_tta=self.cfg.eval_hflip_tta,
                          translate_tta=self.cfg.eval_translate_tta)
        return {"val_loss": result.loss, "val_acc": result.top1, "val_top5": result.top5}

    def figures(self, model: nn.Module) -> dict[str, Any]:
        return {}

    def export(self, model: nn.Module, run_dir: Path, *, best: float | None, train_seconds: float) -> Path:
        return export_model(model, run_dir, best_acc=float("-inf") if best is None else best,
                            total_time=train_seconds, skipped_files=self.data.skipped_files())


WHITENING_IMAGES = 5000
"""Training images whose patches set the whitening filters (``whiten_stem``), airbench's number."""


def whiten_stem_(model: nn.Module, data: Data, world: World, num_images: int = WHITENING_IMAGES) -> None:
    """Initialise the first convolution of ``model``'s patch embedding (a conv stem's first layer, or the PxP
    patch projection) to whiten the patches of the first ``num_images`` training images, as the first epoch's
    global batches deliver them (config key ``whiten_stem``): the same filters on any number of processes."""
    embed = getattr(model, "patch_embed", None)
    modules = embed.named_modules() if isinstance(embed, nn.Module) else []
    convs = [(n, m) for n, m in modules if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"whiten_stem: {type(model).__name__} has no patch embedding with a convolution to "
                         "whiten")
    name, conv = convs[0]
    if type(conv) is not nn.Conv2d:
        raise ValueError(f"whiten_stem: the first convolution, patch_embed.{name}, is a {type(conv).__name__}, "
                         "whose weights are transformed before use; whitening needs a plain Conv2d")
    steps = math.ceil(num_images / (data.train.batch_size * world.size))
    batches = itertools.islice(data.train.batches(0), steps)
    whiten_conv_(conv, (images for images, _ in batches), sum_over_processes=partial(all_reduce_sum, world=world))


TaskFactory = Callable[..., Task]
TASKS: dict[str, TaskFactory] = {"classification": ClassificationTask, "mae": MAEPretraining}
"""``cfg.task`` -> the class (or factory) that builds it with ``(cfg, data, device=, world=)``."""


def build_task(cfg: TrainConfig, data: Data, *, device: torch.device, world: World) -> Task:
    """The task ``cfg.task`` names (the config engine has already checked the name)."""
    return TASKS[cfg.task](cfg, data, device=device, world=world)


def register_task(name: str, factory: TaskFactory) -> None:
    """Add a task; its name must also be one of ``TaskName`` in :mod:`vitkit.train.config`."""
    TASKS[name] = factory


def format_metric(name: str, value: Any, label: str | None = None) -> str:
    """``acc 81.23%`` for accuracies, ``loss 0.4312`` for the rest (``label`` replaces the name shown)."""
    shown = name if label is None else label
    if name.endswith(("acc", "top5")):
        return f"{shown} {100 * value:.2f}%"
    return f"{shown} {value:.4f}"
