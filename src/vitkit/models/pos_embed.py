"""Resampling learned position embeddings to a new patch grid (paper Sec. 3.2, "Fine-tuning and
higher resolution"): the 1-D table is viewed as the 2-D grid it was trained on and interpolated.

Which interpolation each public source uses when it resizes:
- timm: bicubic with antialiasing (``F.interpolate(..., mode='bicubic', antialias=True)``);
- Hugging Face ``ViTModel(interpolate_pos_encoding=True)``: bicubic, no antialiasing;
- Google's vit_jax: ``scipy.ndimage.zoom(order=1)``, i.e. bilinear.
vitkit defaults to bicubic (with antialiasing when shrinking) and offers bilinear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def grid_of(num_patches: int) -> tuple[int, int]:
    """The square grid a table of ``num_patches`` entries was trained on (the only guess possible)."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"cannot infer a square patch grid from {num_patches} position embeddings; "
                         "pass old_grid explicitly")
    return side, side


def resample_pos_embed(pos_embed: Tensor, new_grid: tuple[int, int], *, old_grid: tuple[int, int] | None = None,
                       num_prefix_tokens: int = 1, mode: str = "bicubic", antialias: bool = True) -> Tensor:
    """Resample a (1, prefix + H*W, D) position table to ``new_grid``, keeping prefix tokens apart.

    The class token's entry is not part of the image grid, so it is carried over unchanged.
    """
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
    grid_tokens = pos_embed[:, num_prefix_tokens:]
    old_grid = old_grid or grid_of(grid_tokens.shape[1])
    if old_grid[0] * old_grid[1] != grid_tokens.shape[1]:
        raise ValueError(f"old_grid {old_grid} does not match {grid_tokens.shape[1]} position embeddings")
    return resample_grid(pos_embed, (int(new_grid[0]), int(new_grid[1])), (int(old_grid[0]), int(old_grid[1])),
                         num_prefix_tokens, mode, antialias)


def resample_grid(pos_embed: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int], num_prefix_tokens: int,
                  mode: str, antialias: bool = True) -> Tensor:
    """:func:`resample_pos_embed` without the checks, positional arguments only (TorchScript compiles it)."""
    if old_grid[0] == new_grid[0] and old_grid[1] == new_grid[1]:
        return pos_embed
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid_tokens.shape[-1]
    dtype = grid_tokens.dtype
    grid = grid_tokens.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=False, antialias=antialias)
    grid_tokens = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(dtype)
    return torch.cat([prefix, grid_tokens], dim=1)


def sincos_2d_pos_embed(embed_dim: int, grid: tuple[int, int], *, cls_token: bool = True) -> Tensor:
    """Fixed 2-D sine-cosine position table (MAE, He et al. 2022), shape (1, [1 +] H*W, D), float32.

    Half the channels encode a patch's column, half its row, each as ``[sin(p * w_k), cos(p * w_k)]`` with
    ``w_k = 10000^(-k / (D/4))``; the column half comes first, as in the official release (whose
    ``meshgrid(grid_w, grid_h)`` puts w first) and Hugging Face's ViTMAE. The class token's row is zero.
    """
    if embed_dim % 4:
        raise ValueError(f"a 2-D sine-cosine table needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")
    col_angles = cols.flatten()[:, None] * omega  # (H*W, D/4), row-major patch order
    row_angles = rows.flatten()[:, None] * omega
    table = torch.cat([col_angles.sin(), col_angles.cos(), row_angles.sin(), row_angles.cos()], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table])
    return table.float().unsqueeze(0)
