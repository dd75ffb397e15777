"""Small helpers shared by the analyses: array conversion and the split of prefix tokens from patches."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
from torch import Tensor

ArrayLike = Union[Tensor, np.ndarray]


def as_tensor(array: ArrayLike, name: str) -> Tensor:
    """A detached float tensor (float64 stays float64) on the array's own device, from torch or numpy."""
    if isinstance(array, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    elif isinstance(array, Tensor):
        tensor = array.detach()
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(array).__name__}")
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def check_grid(grid_size: tuple[int, int], num_patches: int, name: str) -> tuple[int, int]:
    grid = (int(grid_size[0]), int(grid_size[1]))
    if grid[0] * grid[1] != num_patches:
        raise ValueError(f"{name}: grid_size {grid} has {grid[0] * grid[1]} positions but the input has "
                         f"{num_patches} patch tokens (check num_prefix_tokens)")
    return grid


def query_row(matrix: Tensor, num_prefix_tokens: int) -> Tensor:
    """The row that describes what the image representation looks at: the class token's row, or, for
    models that average the patch tokens (no class token), the mean of the patch rows.

    ``matrix`` is (..., N, N); the result is (..., N - num_prefix_tokens) over the patch columns.
    """
    if num_prefix_tokens > 0:
        row = matrix[..., 0, :]
    else:
        row = matrix.mean(dim=-2)
    return row[..., num_prefix_tokens:]
