"""Measuring a classifier: loss, top-1, top-5, per-class accuracy and the confusion matrix.

Used after every epoch of training and by ``vitkit eval``. Under ``torchrun`` each process evaluates its
shard and the counts are summed, so every process gets the metrics of the whole set.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.data import ClassMismatchError, EvalTransform, load_split
from vitkit.fileio import atomic_write_text
from vitkit.resolver import load_source
from vitkit.runtime import autocast, resolve_device
from vitkit.train.distributed import World, all_reduce_sum
from vitkit.train.plots import plot_confusion


@dataclass
class EvalResult:
    num_samples: int
    loss: float
    top1: float
    top5: float
    confusion: Tensor
    """(K, K) counts, rows = true class, columns = predicted class."""

    @property
    def per_class_accuracy(self) -> Tensor:
        """Recall of each class (NaN for a class absent from the set)."""
        support = self.confusion.sum(dim=1).double()
        return self.confusion.diagonal().double() / support

    def summary(self) -> dict[str, float]:
        return {"loss": self.loss, "acc": self.top1, "top5": self.top5}


def shift(images: Tensor, dx: int, dy: int) -> Tensor:
    """``images`` (..., H, W) seen from ``dx`` pixels further right and ``dy`` further down, ``|dx|, |dy| <= 1``:
    ``out[..., y, x] = images[..., y + dy, x + dx]``, the border beyond the image filled by reflection."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    return padded[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]


def tta_views(images: Tensor, *, hflip: bool = False, translate: bool = False) -> list[Tensor]:
    """The test-time views of a batch: the images, their mirror images with ``hflip``, and with
    ``translate`` each of those shifted one pixel up-left and one down-right (airbench's translations,
    Jordan 2024): 1, 2, 3 or 6 views."""
    views = [images, images.flip(-1)] if hflip else [images]
    if translate:
        views += [shift(view, d, d) for view in list(views) for d in (-1, 1)]
    return views


def num_tta_views(*, hflip: bool = False, translate: bool = False) -> int:
    """How many forward passes :func:`tta_views` costs per image."""
    return (2 if hflip else 1) * (3 if translate else 1)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], num_classes: int, *,
             device: torch.device, precision: str = "fp32", world: Optional[World] = None,
             hflip_tta: bool = False, translate_tta: bool = False) -> EvalResult:
    """Run ``model`` over labelled ``batches`` and count what it gets right.

    ``hflip_tta``: test-time augmentation, the mean of the logits of each image and of its mirror image
    (a second forward pass; usually a fraction of a point of accuracy on natural images).
    ``translate_tta``: also each view shifted one pixel up-left and down-right (:func:`tta_views`), all
    views weighted equally."""
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-5 hits, samples
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(precision, device):
            views = tta_views(images, hflip=hflip_tta, translate=translate_tta)
            logits = sum(model(view) for view in views) / len(views)
        logits = logits.float()
        top = logits.topk(k, dim=1).indices
        totals[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        totals[1] += (top == labels[:, None]).any(dim=1).sum()
        totals[2] += labels.numel()
        # A one-hot product instead of bincount: exact, and allowed in deterministic mode on CUDA.
        truth = F.one_hot(labels, num_classes).float()
        predicted = F.one_hot(top[:, 0], num_classes).float()
        confusion += (truth.T @ predicted).double()
    model.train(was_training)
    if world is not None:
        all_reduce_sum(totals, world)
        all_reduce_sum(confusion, world)
    n = int(totals[2].item())
    if n == 0:
        raise ValueError("the evaluation set is empty")
    confusion = confusion.round().long().cpu()
    return EvalResult(num_samples=n, loss=float(totals[0]) / n, top1=float(confusion.trace()) / n,
                      top5=float(totals[1]) / n, confusion=confusion)


# ------------------------------------------------------------------------------- vitkit eval
@dataclass
class EvalReport:
    source: str
    dataset: str
    class_names: list[str]
    result: EvalResult
    out_dir: Path
    hflip_tta: bool = False
    translate_tta: bool = False
    loaded: str = ""
    """What the source resolved to (e.g. a run's best checkpoint, with its epoch and step)."""

    def to_dict(self) -> dict:
        per_class = self.result.per_class_accuracy.tolist()
        return {
            "source": self.source, "loaded": self.loaded, "dataset": self.dataset,
            "num_samples": self.result.num_samples,
            "hflip_tta": self.hflip_tta, "translate_tta": self.translate_tta,
            "top1": self.result.top1, "top5": self.result.top5, "loss": self.result.loss,
            "per_class_accuracy": {name: (None if math.isnan(acc) else acc)
                                   for name, acc in zip(self.class_names, per_class)},
            "confusion": self.result.confusion.tolist(),
        }

    def format(self) -> str:
        r = self.result
        width = max(len(n) for n in self.class_names)
        kinds = [kind for kind, on in (("flip", self.hflip_tta), ("translate", self.translate_tta)) if on]
        tta = f", {' + '.join(kinds)} TTA" if kinds else ""
        lines = [f"{self.source} on {self.dataset} ({r.num_samples} images{tta})",
                 *([f"loaded: {self.loaded}"] if self.loaded else []),
                 f"top-1 {100 * r.top1:.2f}%   top-5 {100 * r.top5:.2f}%   loss {r.loss:.4f}", "per-class accuracy:"]
        support = r.confusion.sum(dim=1).tolist()
        for name, acc, n in zip(self.class_names, r.per_class_accuracy.tolist(), support):
            lines.append(f"  {name:<{width}}  {'-' if math.isnan(acc) else f'{100 * acc:6.2f}%'}  ({n} images)")
        lines.append(f"wrote {self.out_dir / 'eval.json'} and {self.out_dir / 'confusion.png'}")
        return "\n".join(lines)


def model_labels(model_classes: list[str], data_classes: list[str], num_classes: int, *, source: str,
                 dataset: str, allow_mismatch: bool = False) -> Tensor:
    """For each of the data set's class indices, the model's index of the same class.

    Classes are matched by name, so folders named ``tench`` or ``n01440764`` in any order give the right labels
    as long as the model uses the same names; the data set may hold a subset of the model's classes. Names the
    model does not know are an error that lists them; ``allow_mismatch`` pairs the classes by position
    instead (the data set's i-th class in sorted order is the model's i-th).
    """
    unknown = [name for name in data_classes if name not in model_classes]
    if model_classes and not unknown:
        index = {name: i for i, name in enumerate(model_classes)}
        return torch.tensor([index[name] for name in data_classes], dtype=torch.long)
    if model_classes and not allow_mismatch:
        missing = [name for name in model_classes if name not in data_classes]
        raise ClassMismatchError(
            f"the class names of {dataset} do not match those of {source}: {_names(unknown)} "
            f"{'is' if len(unknown) == 1 else 'are'} not among the model's classes"
            + (f", and the data set has no {_names(missing)}" if missing else "")
            + "; rename the folders to the model's class names, or pass --allow-class-mismatch to pair the "
              "classes by their sorted position")
    if len(data_classes) != num_classes:
        raise ValueError(f"{source} predicts {num_classes} classes but {dataset} has {len(data_classes)}")
    return torch.arange(num_classes)


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def evaluate_trained(source: str | Path, *, dataset: Optional[str] = None, data_dir: Optional[str] = None,
                     batch_size: int = 256, device: str | None = None, precision: str = "fp32",
                     out_dir: Optional[str | Path] = None, hflip_tta: bool = False, translate_tta: bool = False,
                     checkpoint: Optional[str] = None, allow_class_mismatch: bool = False) -> EvalReport:
    """Evaluate any model SOURCE (a run: its best state, or ``checkpoint``; a training checkpoint; a model
    directory; a foreign checkpoint) on a data set's evaluation split (by default the one it was trained on,
    with its training normalisation); write ``eval.json`` and ``confusion.png``.

    The data set's classes are matched to the model's by name (see :func:`model_labels`)."""
    resolved = load_source(source, checkpoint=checkpoint)
    model, train_cfg, run_dir = resolved.model, resolved.training_config, resolved.run_dir
    config = model.config
    preprocessing = config.preprocessing()
    trained_on = (train_cfg or {}).get("data", {})
    dataset = dataset or trained_on.get("dataset") or preprocessing.dataset
    if not dataset:
        raise ValueError(f"{source}: the model does not record its training data set; pass --dataset")
    if data_dir is None and dataset == trained_on.get("dataset"):
        data_dir = trained_on.get("data_dir")
    device_ = resolve_device(device)
    # the evaluation split alone, through the reader and the eval transform fewshot, analyze and predict use
    split = load_split(dataset, "test", data_dir=data_dir)
    transform = EvalTransform(preprocessing, config.in_chans)
    to_model = model_labels(list(config.class_names or []), list(split.class_names), config.num_classes,
                            source=str(source), dataset=dataset, allow_mismatch=allow_class_mismatch)
    labels = to_model[torch.tensor(split.labels, dtype=torch.long)]  # a copy: the split's array is read-only
    batches = ((images, labels[start:start + len(images)])
               for start, images in zip(range(0, len(split), batch_size), split.batches(transform, batch_size)))
    result = evaluate(model.to(device_), batches, config.num_classes, device=device_, precision=precision,
                      hflip_tta=hflip_tta, translate_tta=translate_tta)
    if not math.isfinite(result.loss):
        raise ValueError(f"{resolved.description}: the model's logits are NaN or infinite on {dataset} (loss "
                         f"{result.loss}); its weights or --precision {precision} cannot give an answer")
    class_names = list(config.class_names or split.class_names)

    tag = dataset.removeprefix("folder:").rstrip("/").rsplit("/", 1)[-1]
    out = Path(out_dir) if out_dir is not None else (run_dir or Path(".")) / f"eval-{tag}"
    out.mkdir(parents=True, exist_ok=True)
    report = EvalReport(str(source), dataset, class_names, result, out, hflip_tta, translate_tta,
                        resolved.description)
    atomic_write_text(json.dumps(report.to_dict(), indent=1) + "\n", out / "eval.json")
    plot_confusion(result.confusion, class_names, out / "confusion.png",
                   title=f"{Path(source).name} on {tag}: top-1 {100 * result.top1:.2f}%")
    return report
