"""Mean attention distance (paper Fig. 7, right, and Appendix D.7).

For one head, the average distance in image space between a query patch and the patches it attends
to, weighted by the attention weights: the transformer analogue of a CNN's receptive-field size. The
paper finds some heads attend globally already in the lowest layers, others stay local, and the
distance grows with depth.

The definition is over patch positions, so prefix tokens (the class token) are left out on both
sides: they are not queries, and the attention a patch pays to the class token is dropped and the
remaining weights renormalised to sum to 1. The result is thus "how far away, among the patches it
looks at, does this query look".
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vitkit.analysis._arrays import ArrayLike, as_tensor, check_grid


def patch_distances(grid_size: tuple[int, int], patch_size: float = 1.0, dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None) -> Tensor:
    """(H*W, H*W) Euclidean distances between patch centres in pixels, patches in row-major order."""
    rows, cols = int(grid_size[0]), int(grid_size[1])
    yy, xx = torch.meshgrid(torch.arange(rows, dtype=dtype, device=device),
                            torch.arange(cols, dtype=dtype, device=device), indexing="ij")
    centres = torch.stack([yy.flatten(), xx.flatten()], dim=1) * patch_size
    return torch.cdist(centres, centres)


def grid_mean_distance(grid_size: tuple[int, int], patch_size: float = 1.0) -> float:
    """The mean attention distance of uniform attention: the average distance over all ordered pairs of
    patches (self-pairs included). A head near this value attends globally."""
    return float(patch_distances(grid_size, patch_size).mean())


def mean_attention_distance(attention: ArrayLike, grid_size: tuple[int, int], patch_size: float = 1.0,
                            num_prefix_tokens: int = 1) -> np.ndarray:
    """Mean attention distance of attention probabilities (..., N, N), N = prefix + H*W.

    Returns (...): for each leading index (e.g. image, head) the attention-weighted mean distance in
    pixels from each query patch to the key patches, averaged over the query patches. ``patch_size``
    is the number of input pixels between neighbouring patch centres (the patch stride).
    """
    attn = as_tensor(attention, "attention")
    if attn.ndim < 2 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention: expected (..., N, N) probabilities, got shape {tuple(attn.shape)}")
    patch_attn = attn[..., num_prefix_tokens:, num_prefix_tokens:]
    grid = check_grid(grid_size, patch_attn.shape[-1], "attention")
    weights = patch_attn / patch_attn.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    distances = patch_distances(grid, patch_size, dtype=weights.dtype, device=weights.device)
    per_query = (weights * distances).sum(dim=-1)
    return per_query.mean(dim=-1).cpu().numpy()
