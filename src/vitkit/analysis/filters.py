"""Principal components of the patch-embedding filters (paper Fig. 7, left).

The projection E maps each flattened P x P x C patch to D dimensions; its D rows are "filters" in
pixel space. The paper shows the top principal components of these filters, which resemble plausible
basis functions for a low-dimensional representation of the fine structure within each patch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from vitkit.analysis._arrays import ArrayLike, as_tensor


class FilterPCA(NamedTuple):
    components: np.ndarray
    """(k, C, P, P): the principal directions, unit norm, as image patches (largest first)."""
    explained_variance_ratio: np.ndarray
    """(k,): fraction of the filters' total variance along each component."""


def patch_embedding_pca(weight: ArrayLike, num_components: int = 28) -> FilterPCA:
    """PCA over the D filters of a patch projection with weight (D, C, P, P) (a Conv2d's layout).

    The filters are centred (their mean is removed) before the SVD, as in ordinary PCA. Each
    component's sign is fixed so that its largest-magnitude entry is positive, so results are
    reproducible across runs. ``num_components`` is capped at the rank bound ``min(D, C*P*P)``.
    """
    w = as_tensor(weight, "weight")
    if w.ndim != 4:
        raise ValueError(f"weight: expected a (D, C, P, P) patch-projection weight, got shape {tuple(w.shape)}")
    if num_components < 1:
        raise ValueError(f"num_components must be at least 1, got {num_components}")
    filters = w.reshape(w.shape[0], -1).double()
    filters = filters - filters.mean(dim=0, keepdim=True)
    _, singular_values, directions = torch.linalg.svd(filters, full_matrices=False)
    variance = singular_values ** 2
    total = variance.sum()
    k = min(num_components, directions.shape[0])
    directions = directions[:k]
    peak = directions.abs().argmax(dim=1)
    signs = torch.sign(directions[torch.arange(k), peak])
    directions = directions * signs[:, None]
    ratio = variance[:k] / total if total > 0 else torch.zeros_like(variance[:k])
    return FilterPCA(components=directions.reshape(k, *w.shape[1:]).float().cpu().numpy(),
                     explained_variance_ratio=ratio.float().cpu().numpy())
