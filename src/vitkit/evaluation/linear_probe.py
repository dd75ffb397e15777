"""Full linear probe: multinomial logistic regression on all training features, fitted by L-BFGS.

The loss is the mean cross-entropy plus ``weight_decay / 2 * ||W||^2`` (bias not decayed), on
features standardised with the training set's statistics. The problem is convex, so full-batch
L-BFGS converges to the optimum without a learning-rate schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

WEIGHT_DECAY_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class ProbeResult:
    train_accuracy: float
    test_accuracy: float
    weight_decay: float
    iterations: int


@dataclass(frozen=True)
class LogisticClassifier:
    mean: Tensor
    std: Tensor
    weight: Tensor  # (d, K)
    bias: Tensor  # (K,)

    def logits(self, features: Tensor) -> Tensor:
        return ((features.float() - self.mean) / self.std) @ self.weight + self.bias

    def accuracy(self, features: Tensor, labels: Tensor) -> float:
        return (self.logits(features).argmax(1) == labels).double().mean().item()


def fit_logistic(features: Tensor, labels: Tensor, num_classes: int, *, weight_decay: float = 1e-4,
                 max_iter: int = 500) -> tuple[LogisticClassifier, int]:
    """Fit a multinomial logistic regression; returns it and the number of L-BFGS iterations run."""
    x = features.float()
    mean, std = x.mean(0), x.std(0, unbiased=False) + 1e-5
    x = (x - mean) / std
    labels = labels.long()
    weight = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, labels) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    iterations = optimizer.state[weight].get("n_iter", 0)
    return LogisticClassifier(mean, std, weight.detach(), bias.detach()), int(iterations)


def linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 *, num_classes: int | None = None, weight_decay: float | Literal["auto"] = "auto",
                 grid: Sequence[float] = WEIGHT_DECAY_GRID, val_fraction: float = 0.1, max_iter: int = 500,
                 seed: int = 0) -> ProbeResult:
    """Train on all training features and report accuracy on the test features.

    ``weight_decay="auto"`` picks it from ``grid`` on a random ``val_fraction`` of the training set,
    then refits on the whole training set.
    """
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    if weight_decay == "auto":
        order = np.random.default_rng(seed).permutation(len(train_labels))
        n_val = max(1, int(len(order) * val_fraction))
        val, fit = torch.from_numpy(order[:n_val]), torch.from_numpy(order[n_val:])
        scores = []
        for wd in grid:
            clf, _ = fit_logistic(train_features[fit], train_labels[fit], num_classes, weight_decay=wd,
                                  max_iter=max_iter)
            scores.append((clf.accuracy(train_features[val], train_labels[val]), wd))
        best = max(acc for acc, _ in scores)
        weight_decay = max(wd for acc, wd in scores if acc == best)
    clf, iterations = fit_logistic(train_features, train_labels, num_classes, weight_decay=float(weight_decay),
                                   max_iter=max_iter)
    return ProbeResult(clf.accuracy(train_features, train_labels), clf.accuracy(test_features, test_labels),
                       float(weight_decay), iterations)
