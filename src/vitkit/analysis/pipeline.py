"""Run every analysis on one model and a batch of images, keeping only the small arrays they produce.

Attention is read from the model's own ``attention_maps`` (post-softmax probabilities), batch by
batch, and reduced at once, so memory stays at one batch of attention however many images are used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from vitkit.analysis.attention import attention_rollout, class_attention
from vitkit.analysis.distance import grid_mean_distance, mean_attention_distance
from vitkit.analysis.filters import FilterPCA, patch_embedding_pca
from vitkit.analysis.position import position_embedding_similarity


@dataclass
class ModelAnalysis:
    """The numbers behind every figure of the report."""

    grid_size: tuple[int, int]
    patch_pixels: float
    """Input pixels between neighbouring patch centres (the patch size, or a hybrid stem's stride)."""
    num_prefix_tokens: int
    num_images: int
    mean_distance: np.ndarray
    """(depth, heads): mean attention distance in pixels, averaged over the images."""
    mean_distance_std: np.ndarray
    """(depth, heads): its standard deviation across the images."""
    uniform_distance: float
    """The mean attention distance of uniform attention over the grid (a fully global head)."""
    rollout: np.ndarray
    """(num_show, H, W): attention rollout maps of the first ``num_show`` images."""
    last_layer_attention: np.ndarray
    """(num_show, heads, H, W): raw class-token attention of every head in the last layer."""
    filters: Optional[FilterPCA] = None
    position_similarity: Optional[np.ndarray] = None
    """(H, W, H, W) cosine similarities of the position embeddings."""
    notes: dict[str, str] = field(default_factory=dict)
    """Why an analysis was skipped, keyed by analysis name."""
    seconds: dict[str, float] = field(default_factory=dict)


def patch_projection_weight(model: nn.Module) -> Optional[Tensor]:
    """The (D, C, P, P) weight of a plain patch projection, or None when the stem is something else
    (a hybrid's CNN, whose final 1x1 projection has no pixel-space meaning)."""
    patch_embed = getattr(model, "patch_embed", None)
    proj = getattr(patch_embed, "proj", None)
    stride = getattr(patch_embed, "stride", None)
    if not isinstance(proj, nn.Conv2d) or stride is None or proj.groups != 1:
        return None
    if tuple(proj.kernel_size) != (stride, stride) or tuple(proj.stride) != (stride, stride):
        return None
    return proj.weight


def _patch_pixels(model: nn.Module) -> float:
    image_h, _ = model.config.image_hw
    return image_h / model.grid_size[0]


@torch.inference_mode()
def analyze_model(model: nn.Module, images: Tensor, *, num_show: int = 8, batch_size: int = 32,
                  num_components: int = 28) -> ModelAnalysis:
    """Analyse ``model`` on normalised ``images`` (B, C, H, W) at the model's input size.

    Mean attention distance uses all images; rollout and per-head maps are kept for the first
    ``num_show`` only.
    """
    if not hasattr(model, "attention_maps"):
        raise ValueError(f"{type(model).__name__} has no attention_maps(images): "
                         "only Vision Transformers can be analysed")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images: expected a non-empty (B, C, H, W) batch, got shape {tuple(images.shape)}")
    if num_show < 1 or batch_size < 1:
        raise ValueError("num_show (--show) and batch_size (--batch-size) must be at least 1, "
                         f"got {num_show} and {batch_size}")
    model.eval()
    device = next(model.parameters()).device
    grid = tuple(model.grid_size)
    prefix = model.num_prefix_tokens
    patch_pixels = _patch_pixels(model)
    num_show = min(num_show, images.shape[0])
    notes: dict[str, str] = {}
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    weight = patch_projection_weight(model)
    filters = None
    if weight is None:
        notes["filters"] = ("skipped: the patch embedding is not a plain linear patch projection (e.g. a hybrid's "
                            "CNN stem), so its weights are not filters in pixel space")
    else:
        filters = patch_embedding_pca(weight, num_components)
    pos_embed = getattr(model, "pos_embed", None)
    similarity = None
    if pos_embed is None:
        notes["position"] = "skipped: the model has no learned position embedding table"
    else:
        similarity = position_embedding_similarity(pos_embed, grid, prefix)
    seconds["weights"] = time.perf_counter() - start

    start = time.perf_counter()
    distances, rollouts, last_layer = [], [], []
    for first in range(0, images.shape[0], batch_size):
        batch = images[first:first + batch_size].to(device)
        maps = model.attention_maps(batch)
        distances.append(np.stack([mean_attention_distance(m, grid, patch_pixels, prefix) for m in maps], axis=1))
        keep = max(0, min(num_show - first, batch.shape[0]))
        if keep:
            rollouts.append(attention_rollout([m[:keep] for m in maps], grid, prefix))
            last_layer.append(class_attention(maps[-1][:keep], grid, prefix))
    per_image = np.concatenate(distances)  # (images, depth, heads)
    seconds["attention"] = time.perf_counter() - start

    return ModelAnalysis(
        grid_size=grid, patch_pixels=patch_pixels, num_prefix_tokens=prefix, num_images=int(images.shape[0]),
        mean_distance=per_image.mean(axis=0), mean_distance_std=per_image.std(axis=0),
        uniform_distance=grid_mean_distance(grid, patch_pixels),
        rollout=np.concatenate(rollouts), last_layer_attention=np.concatenate(last_layer),
        filters=filters, position_similarity=similarity, notes=notes, seconds=seconds,
    )
