"""Few-shot linear evaluation (paper Sec. 4.1 and Appendix): regularised least squares on frozen features.

For each class, ``shots`` training images are drawn; a linear map from their standardised features
(plus a bias column) to {-1, +1} one-hot targets is solved in closed form, and test images are
classified by the largest output. As in big_vision: feature statistics come from the few-shot
training set, the bias column holds a large constant (100) so the bias is all but unregularised,
and the L2 strength defaults to 2^10.

The normal equations are solved through one eigen-decomposition of either the d x d Gram matrix
X^T X ("primal", cheaper when n >= d) or the n x n kernel matrix X X^T ("dual", cheaper when
n < d); with it, the solution for any L2 strength costs one matrix product, so choosing L2 on a
held-out split is nearly free:

    primal: W = (X^T X + l2 I)^-1 X^T Y = Q diag(1 / (e + l2)) Q^T X^T Y,   X^T X = Q diag(e) Q^T
    dual:   W = X^T (X X^T + l2 I)^-1 Y = X^T Q diag(1 / (e + l2)) Q^T Y,   X X^T = Q diag(e) Q^T
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

BIAS_CONSTANT = 100.0
DEFAULT_L2 = 2.0 ** 10
L2_GRID = tuple(2.0 ** i for i in range(-10, 21))
STD_EPS = 1e-5

Form = Literal["auto", "primal", "dual"]


@dataclass(frozen=True)
class RidgeClassifier:
    """A fitted linear classifier on standardised features with a bias column."""

    mean: Tensor  # (d,)
    std: Tensor  # (d,)
    weight: Tensor  # (d + 1, K), last row multiplies the bias constant
    l2: float

    def decision_function(self, features: Tensor) -> Tensor:
        return _design(features.to(self.weight.dtype), self.mean, self.std) @ self.weight

    def predict(self, features: Tensor) -> Tensor:
        return self.decision_function(features).argmax(dim=1)

    def accuracy(self, features: Tensor, labels: Tensor) -> float:
        return (self.predict(features) == labels.to(self.weight.device)).double().mean().item()


class RidgeSolver:
    """Closed-form L2-regularised least squares to {-1, +1} one-hot targets, for any number of L2 strengths.

    ``form`` picks the decomposition: ``"primal"`` (d x d), ``"dual"`` (n x n) or ``"auto"`` (the
    smaller). Both give the same solution; the computation runs in float64.
    """

    def __init__(self, features: Tensor, labels: Tensor, num_classes: int, form: Form = "auto") -> None:
        if features.ndim != 2 or labels.shape != features.shape[:1]:
            raise ValueError(f"expected features (n, d) and labels (n,), got {tuple(features.shape)} and "
                             f"{tuple(labels.shape)}")
        if form not in ("auto", "primal", "dual"):
            raise ValueError(f"form must be 'auto', 'primal' or 'dual', got {form!r}")
        x = features.double()
        self.mean = x.mean(dim=0)
        self.std = x.std(dim=0, unbiased=False) + STD_EPS
        x = _design(x, self.mean, self.std)
        y = 2.0 * torch.nn.functional.one_hot(labels.long(), num_classes).double() - 1.0
        n, d = x.shape
        self.form = ("primal" if n >= d else "dual") if form == "auto" else form
        if self.form == "primal":
            self.eigenvalues, q = torch.linalg.eigh(x.T @ x)
            self._left, self._right = q, q.T @ (x.T @ y)
        else:
            self.eigenvalues, q = torch.linalg.eigh(x @ x.T)
            self._left, self._right = x.T @ q, q.T @ y

    def solve(self, l2: float = DEFAULT_L2) -> RidgeClassifier:
        if not l2 > 0:
            raise ValueError(f"l2 must be positive, got {l2}")
        # The eigenvalues of a Gram matrix are >= 0; clamp rounding noise so e + l2 stays positive.
        scale = 1.0 / (self.eigenvalues.clamp_min(0.0) + l2)
        weight = self._left @ (scale[:, None] * self._right)
        return RidgeClassifier(self.mean, self.std, weight, float(l2))


def fit_ridge(features: Tensor, labels: Tensor, num_classes: int, l2: float = DEFAULT_L2,
              form: Form = "auto") -> RidgeClassifier:
    """Fit the few-shot classifier of the paper (see the module docstring)."""
    return RidgeSolver(features, labels, num_classes, form).solve(l2)


def _design(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Standardise and append the bias column."""
    x = (x - mean) / std
    return torch.cat([x, x.new_full((x.shape[0], 1), BIAS_CONSTANT)], dim=1)


# ----------------------------------------------------------------------------------- protocol
@dataclass
class FewShotResult:
    shots: int
    accuracies: list[float] = field(default_factory=list)  # one per seed
    l2: list[float] = field(default_factory=list)  # the L2 strength used for each seed

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 for a single seed)."""
        return float(np.std(self.accuracies, ddof=1)) if len(self.accuracies) > 1 else 0.0


def sample_shots(labels: np.ndarray, shots: int, rng: np.random.Generator, num_classes: int,
                 exclude: np.ndarray | None = None) -> np.ndarray:
    """``shots`` indices per class drawn without replacement, skipping ``exclude``."""
    available = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        available[exclude] = False
    picked = []
    for c in range(num_classes):
        pool = np.flatnonzero((labels == c) & available)
        if len(pool) < shots:
            raise ValueError(f"class {c} has {len(pool)} training images available, fewer than {shots} shots")
        picked.append(rng.choice(pool, size=shots, replace=False))
    return np.sort(np.concatenate(picked))


def fewshot_evaluate(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                     *, shots: Sequence[int] = (1, 5, 10, 25), seeds: int | Sequence[int] = 3,
                     l2: float | Literal["auto"] = DEFAULT_L2, l2_grid: Sequence[float] = L2_GRID,
                     val_shots: int = 10, num_classes: int | None = None) -> list[FewShotResult]:
    """Few-shot accuracy on the test features for each shot count, over several random draws.

    ``l2="auto"`` chooses the L2 strength per draw from ``l2_grid`` by accuracy on a held-out split
    of ``val_shots`` further training images per class (disjoint from the shots; the test set is
    never looked at).
    """
    labels = train_labels.cpu().numpy()
    num_classes = num_classes or int(max(labels.max(), int(test_labels.max()))) + 1
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ValueError("need at least one seed")
    results = []
    for n_shots in shots:
        if n_shots < 1:
            raise ValueError(f"shots must be >= 1, got {n_shots}")
        result = FewShotResult(int(n_shots))
        for seed in seed_list:
            rng = np.random.default_rng([seed, n_shots])
            idx = sample_shots(labels, n_shots, rng, num_classes)
            solver = RidgeSolver(train_features[idx], train_labels[idx], num_classes)
            if l2 == "auto":
                val = sample_shots(labels, val_shots, rng, num_classes, exclude=idx)
                chosen = _best_l2(solver, train_features[val], train_labels[val], l2_grid)
            else:
                chosen = float(l2)
            result.accuracies.append(solver.solve(chosen).accuracy(test_features, test_labels))
            result.l2.append(chosen)
        results.append(result)
    return results


def _best_l2(solver: RidgeSolver, features: Tensor, labels: Tensor, grid: Sequence[float]) -> float:
    """The strongest regularisation among those with the best held-out accuracy."""
    scored = [(solver.solve(l2).accuracy(features, labels), l2) for l2 in grid]
    best = max(acc for acc, _ in scored)
    return max(l2 for acc, l2 in scored if acc == best)
