"""Similarity of position embeddings (paper Fig. 7, centre).

For each patch position, the cosine similarity of its learned embedding with every other position's.
A model that learned the image's 2-D topology shows, for each position, a bright blob around itself
and often bright stripes along its own row and column.
"""

from __future__ import annotations

import numpy as np

from vitkit.analysis._arrays import ArrayLike, as_tensor, check_grid


def position_embedding_similarity(pos_embed: ArrayLike, grid_size: tuple[int, int],
                                  num_prefix_tokens: int = 1) -> np.ndarray:
    """Cosine similarities between the patch positions of a (1, prefix + H*W, D) or (prefix + H*W, D)
    position table, shaped (H, W, H, W): ``sim[r, c]`` is the H x W map for the patch at row r, column c.

    Prefix tokens (class token, registers) have no place on the image grid and are left out.
    """
    table = as_tensor(pos_embed, "pos_embed")
    if table.ndim == 3 and table.shape[0] == 1:
        table = table[0]
    if table.ndim != 2:
        raise ValueError(f"pos_embed: expected shape (1, N, D) or (N, D), got {tuple(table.shape)}")
    patches = table[num_prefix_tokens:]
    grid = check_grid(grid_size, patches.shape[0], "pos_embed")
    unit = patches / patches.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similarity = unit @ unit.T
    return similarity.reshape(grid[0], grid[1], grid[0], grid[1]).cpu().numpy()


def similarity_by_distance(similarity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean similarity between distinct positions as a function of their grid distance.

    ``similarity`` is (H, W, H, W); returns (distances, mean similarities) with distances the Euclidean
    patch distances rounded to whole patches (1, 2, ...). Learned 2-D structure shows as a decreasing
    curve; unstructured embeddings give a flat one.
    """
    rows, cols = similarity.shape[:2]
    yy, xx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    centres = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(float)
    distance = np.rint(np.linalg.norm(centres[:, None] - centres[None], axis=-1)).astype(int)
    flat = np.asarray(similarity, dtype=float).reshape(rows * cols, rows * cols)
    bins = np.unique(distance[distance > 0])
    return bins, np.array([flat[distance == d].mean() for d in bins])
