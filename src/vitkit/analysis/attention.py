"""Attention maps: attention rollout (Abnar & Zuidema 2020; paper Fig. 6 and Appendix D.8) and the
raw attention of single heads.

Rollout tracks how information flows from the input patches to the class token through all layers:
average the attention over heads, add the identity for the residual connection, renormalise the
rows, and multiply the per-layer matrices from the first layer to the last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from vitkit.analysis._arrays import ArrayLike, as_tensor, check_grid, query_row

HeadFusion = Literal["mean", "max", "min"]


def rollout_matrix(attentions: Sequence[ArrayLike], head_fusion: HeadFusion = "mean") -> Tensor:
    """The rolled-out (B, N, N) token-to-token matrix of per-layer attention (B, heads, N, N), first
    layer first: ``R = Â_L ... Â_2 Â_1`` with ``Â_l = normalise_rows(fuse_heads(A_l) + I)``."""
    if len(attentions) == 0:
        raise ValueError("attentions: need the attention of at least one layer")
    rollout = None
    for depth, attention in enumerate(attentions):
        attn = as_tensor(attention, f"attentions[{depth}]")
        if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
            raise ValueError(f"attentions[{depth}]: expected (B, heads, N, N), got shape {tuple(attn.shape)}")
        if head_fusion == "mean":
            fused = attn.mean(dim=1)
        elif head_fusion == "max":
            fused = attn.amax(dim=1)
        elif head_fusion == "min":
            fused = attn.amin(dim=1)
        else:
            raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")
        fused = fused + torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        fused = fused / fused.sum(dim=-1, keepdim=True)
        if rollout is not None and rollout.shape != fused.shape:
            raise ValueError(f"attentions[{depth}]: shape {tuple(attn.shape)} does not match the earlier layers")
        rollout = fused if rollout is None else fused @ rollout
    return rollout


def attention_rollout(attentions: Sequence[ArrayLike], grid_size: tuple[int, int], num_prefix_tokens: int = 1,
                      head_fusion: HeadFusion = "mean") -> np.ndarray:
    """(B, H, W) rollout maps: how much each patch contributes to the class token after all the given
    layers. Models without a class token get the mean over the patch tokens' rows (what average
    pooling sees). Each map's values sum to at most 1; the rest stays with the prefix tokens."""
    rollout = rollout_matrix(attentions, head_fusion)
    row = query_row(rollout, num_prefix_tokens)
    grid = check_grid(grid_size, row.shape[-1], "attentions")
    return row.reshape(row.shape[0], *grid).cpu().numpy()


def class_attention(attention: ArrayLike, grid_size: tuple[int, int], num_prefix_tokens: int = 1) -> np.ndarray:
    """(B, heads, H, W): where each head's class-token query looks in one layer's raw attention
    (B, heads, N, N); the mean over patch queries for models without a class token."""
    attn = as_tensor(attention, "attention")
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention: expected (B, heads, N, N), got shape {tuple(attn.shape)}")
    row = query_row(attn, num_prefix_tokens)
    grid = check_grid(grid_size, row.shape[-1], "attention")
    return row.reshape(*row.shape[:2], *grid).cpu().numpy()
