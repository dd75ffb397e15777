"""The linear-evaluation protocol end to end: features of a data set's train and test splits (one
forward pass each, cached), few-shot regression for several shot counts and seeds, and optionally a
full logistic-regression probe."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from vitkit.data.splits import Split, load_split
from vitkit.data.transforms import EvalTransform, eval_transform
from vitkit.evaluation.features import ExtractionProgress, FeatureCache
from vitkit.evaluation.fewshot import DEFAULT_L2, FewShotResult, fewshot_evaluate
from vitkit.evaluation.linear_probe import ProbeResult, linear_probe


@dataclass
class LinearEvalReport:
    dataset: str
    num_train: int
    num_test: int
    feature_dim: int
    fewshot: list[FewShotResult] = field(default_factory=list)
    probe: ProbeResult | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fewshot"] = [dict(shots=r.shots, mean=r.mean, std=r.std, accuracies=r.accuracies, l2=r.l2)
                        for r in self.fewshot]
        return d

    def format_table(self) -> str:
        lines = [f"{self.dataset}: {self.num_train} train / {self.num_test} test images, "
                 f"{self.feature_dim}-d features",
                 f"{'evaluation':22s} {'accuracy %':>16s}  {'seeds':>5s}  {'L2 / wd':>10s}"]
        for r in self.fewshot:
            l2 = _fmt_l2(r.l2[0]) if len(set(r.l2)) == 1 else f"{_fmt_l2(min(r.l2))}..{_fmt_l2(max(r.l2))}"
            lines.append(f"{f'{r.shots}-shot ridge':22s} {100 * r.mean:9.2f} ± {100 * r.std:5.2f}  "
                         f"{len(r.accuracies):5d}  {l2:>10s}")
        if self.probe is not None:
            p = self.probe
            lines.append(f"{'linear probe (full)':22s} {100 * p.test_accuracy:9.2f}{'':8s}  {'-':>5s}  "
                         f"{p.weight_decay:>10g}   (train {100 * p.train_accuracy:.2f}, {p.iterations} L-BFGS it)")
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def _fmt_l2(value: float) -> str:
    exponent = math.log2(value)
    return f"2^{int(exponent)}" if exponent.is_integer() else f"{value:.3g}"


def subsample(data: Split, limit: int | None, seed: int = 0) -> Split:
    """A random subset of ``limit`` images (all if ``limit`` is None or larger than the data)."""
    if limit is None or limit >= len(data.labels):
        return data
    idx = np.sort(np.random.default_rng(seed).choice(len(data.labels), size=limit, replace=False))
    return data.subset(idx, f"{limit}@{seed}")


def check_shots(labels: np.ndarray, class_names: Sequence[str], shots: Sequence[int], *,
                held_out: int = 0, source: str = "the training split") -> None:
    """Raise, before any feature is computed, if a class has fewer training images than the largest
    shot count (plus ``held_out`` images per class for choosing L2); the message names the classes."""
    counts = np.bincount(labels, minlength=len(class_names))
    need = max(shots) + held_out
    short = [(class_names[c], int(n)) for c, n in enumerate(counts) if n < need]
    if short:
        listed = ", ".join(f"{name} ({n})" for name, n in short[:10]) + (", ..." if len(short) > 10 else "")
        extra = f" + {held_out} held out for --l2 auto" if held_out else ""
        raise ValueError(f"--shots {max(shots)}{extra} needs {need} images per class, but in {source} "
                         f"{len(short)} class(es) have fewer: {listed}; lower --shots or --max-train")


def linear_evaluation(model: nn.Module, dataset: str, *, shots: Sequence[int] = (1, 5, 10, 25),
                      seeds: int = 3, l2: float | Literal["auto"] = DEFAULT_L2, probe: bool = False,
                      probe_weight_decay: float | Literal["auto"] = "auto", cache: FeatureCache | None = None,
                      transform: EvalTransform | None = None, batch_size: int = 256,
                      max_train: int | None = None, max_test: int | None = None,
                      data_dir: str | None = None, device: str | torch.device | None = None,
                      progress: bool = True, val_shots: int = 10) -> LinearEvalReport:
    """Few-shot (and optionally full-probe) accuracy of ``model``'s frozen features on ``dataset``.

    Both splits are read through :func:`vitkit.data.load_split` and labelled by the training split's
    class list (a test split with other classes is an error naming them); images go through the
    model's eval transform unless ``transform`` is given. The shot counts are checked against the
    class sizes before any feature is extracted; extraction reports progress and an estimate.
    """
    cache = cache or FeatureCache()
    transform = transform or eval_transform(model.config)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    train = load_split(dataset, "train", data_dir=data_dir)
    test = load_split(dataset, "test", data_dir=data_dir, classes=train.class_names, require_all_classes=True)
    train, test = subsample(train, max_train), subsample(test, max_test)
    check_shots(train.labels, train.class_names, shots, held_out=val_shots if l2 == "auto" else 0,
                source=f"{train.name} ({train.location})")
    seconds["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    todo = sum(len(split) for split in (train, test) if not cache.cached(model, split, transform))
    meter = ExtractionProgress(todo, enabled=progress) if todo else None
    try:
        train_x = cache.features(model, train, transform=transform, batch_size=batch_size, device=device,
                                 progress=meter)
        test_x = cache.features(model, test, transform=transform, batch_size=batch_size, device=device,
                                progress=meter)
    finally:
        if meter is not None:
            meter.close()
    seconds["features"] = time.perf_counter() - t0
    train_y, test_y = torch.from_numpy(train.labels.copy()), torch.from_numpy(test.labels.copy())  # read-only arrays
    num_classes = train.num_classes
    report = LinearEvalReport(str(dataset), len(train_y), len(test_y), train_x.shape[1])
    t0 = time.perf_counter()
    report.fewshot = fewshot_evaluate(train_x, train_y, test_x, test_y, shots=shots, seeds=seeds, l2=l2,
                                      num_classes=num_classes, val_shots=val_shots)
    seconds["fewshot"] = time.perf_counter() - t0
    if probe:
        t0 = time.perf_counter()
        report.probe = linear_probe(train_x, train_y, test_x, test_y, num_classes=num_classes,
                                    weight_decay=probe_weight_decay)
        seconds["probe"] = time.perf_counter() - t0
    report.seconds = seconds
    return report
