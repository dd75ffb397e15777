"""Matplotlib figures for the analyses (arrays in, ``Figure`` out).

Figures are built on ``matplotlib.figure.Figure`` directly, never through pyplot, so nothing here
touches a global backend or opens a window; ``save_png`` renders them with Agg.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from vitkit.analysis.filters import FilterPCA
from vitkit.fileio import atomic_path


def save_png(figure: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Render ``figure`` to a PNG atomically (a crash never leaves half a file)."""

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def _to_display(patch: np.ndarray) -> np.ndarray:
    """A (C, P, P) array scaled to [0, 1] as (P, P, 3) RGB or (P, P) grey."""
    low, high = patch.min(), patch.max()
    scaled = (patch - low) / (high - low) if high > low else np.zeros_like(patch)
    return scaled[0] if scaled.shape[0] == 1 else np.moveaxis(scaled[:3], 0, -1)


def plot_filters(pca: FilterPCA, columns: int = 7) -> Figure:
    """The principal components of the patch filters as image patches (each scaled to its own range)."""
    count = len(pca.components)
    rows = -(-count // columns)
    figure = Figure(figsize=(1.3 * columns, 1.45 * rows + 0.5))
    axes = figure.subplots(rows, columns, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < count:
            ax.imshow(_to_display(pca.components[i]), cmap="gray", interpolation="nearest")
            ax.set_title(f"{i + 1}: {100 * pca.explained_variance_ratio[i]:.1f}%", fontsize=7)
    figure.suptitle(f"Principal components of the patch-embedding filters (top {count})", fontsize=10)
    return figure


def plot_position_similarity(similarity: np.ndarray) -> Figure:
    """A grid of H x W heat maps laid out like the image: tile (r, c) is the cosine similarity of the
    position embedding of patch (r, c) with every other patch's."""
    rows, cols = similarity.shape[:2]
    mosaic = np.full((rows * (rows + 1) - 1, cols * (cols + 1) - 1), np.nan)
    for r in range(rows):
        for c in range(cols):
            mosaic[r * (rows + 1):r * (rows + 1) + rows, c * (cols + 1):c * (cols + 1) + cols] = similarity[r, c]
    size = min(10.0, 2.5 + 0.45 * max(rows, cols))
    figure = Figure(figsize=(size + 1.2, size))
    ax = figure.subplots()
    image = ax.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    step = max(1, rows // 8)
    shown_rows = range(0, rows, step)
    ax.set_yticks([r * (rows + 1) + (rows - 1) / 2 for r in shown_rows], [str(r + 1) for r in shown_rows])
    step = max(1, cols // 8)
    shown_cols = range(0, cols, step)
    ax.set_xticks([c * (cols + 1) + (cols - 1) / 2 for c in shown_cols], [str(c + 1) for c in shown_cols])
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title("Position embedding similarity", fontsize=10)
    for spine in ax.spines.values():
        spine.set_visible(False)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    return figure


def plot_attention_distance(mean_distance: np.ndarray, uniform_distance: float, image_size: int) -> Figure:
    """Mean attention distance of each head (dots) against network depth, with the uniform-attention
    distance as a reference line (the paper's Fig. 7, right)."""
    depth, heads = mean_distance.shape
    figure = Figure(figsize=(6.0, 4.2))
    ax = figure.subplots()
    colors = [matplotlib.colormaps["tab20"](h % 20) for h in range(heads)]
    layers = np.arange(1, depth + 1)
    for h in range(heads):
        jitter = (h - (heads - 1) / 2) * min(0.4 / heads, 0.04)
        ax.scatter(layers + jitter, mean_distance[:, h], s=16, color=colors[h], label=f"head {h + 1}",
                   edgecolors="none")
    ax.axhline(uniform_distance, color="0.4", linestyle="--", linewidth=1)
    ax.text(depth + 0.45, uniform_distance, "uniform\nattention", fontsize=7, va="center", color="0.3")
    ax.set_xlim(0.5, depth + 0.5)
    ax.set_ylim(0, max(uniform_distance, float(mean_distance.max())) * 1.12)
    ax.set_xticks(layers)
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel(f"mean attention distance (pixels, {image_size}px input)")
    ax.set_title("Size of attended area by head and depth", fontsize=10)
    if heads <= 16:
        ax.legend(fontsize=6, ncol=2, loc="lower right", frameon=False)
    ax.grid(alpha=0.3)
    return figure


def _upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) -> (N, H, W) with bilinear interpolation."""
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


def _normalise_each(maps: np.ndarray) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    low, high = flat.min(axis=1), flat.max(axis=1)
    span = np.where(high > low, high - low, 1.0)
    return ((flat - low[:, None]) / span[:, None]).reshape(maps.shape)


def _show_image(ax, image: np.ndarray) -> None:
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
    ax.set_axis_off()


def plot_rollout(images: np.ndarray, maps: np.ndarray, titles: Optional[Sequence[str]] = None,
                 title: str = "Attention rollout: what the class token attends to, through all layers") -> Figure:
    """For each image: the input, the rollout map as a heat overlay, and the input masked by the map
    (the paper's Fig. 6 style). Maps are scaled to [0, 1] per image."""
    count = len(images)
    size = images.shape[1:3]
    scaled = _normalise_each(_upsample(maps, size))
    figure = Figure(figsize=(1.6 * count + 0.6, 5.2))
    axes = figure.subplots(3, count, squeeze=False)
    for i in range(count):
        _show_image(axes[0, i], images[i])
        if titles is not None:
            axes[0, i].set_title(titles[i], fontsize=8)
        _show_image(axes[1, i], images[i])
        axes[1, i].imshow(scaled[i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
        masked = (images[i].astype(np.float32) * scaled[i][..., None]).round().astype(np.uint8)
        _show_image(axes[2, i], masked)
    for row, label in enumerate(("input", "rollout", "input x rollout")):
        axes[row, 0].text(-0.08, 0.5, label, transform=axes[row, 0].transAxes, rotation=90, ha="right",
                          va="center", fontsize=8)
    figure.suptitle(title, fontsize=10)
    return figure


def plot_head_attention(images: np.ndarray, maps: np.ndarray, titles: Optional[Sequence[str]] = None,
                        title: str = "Raw class-token attention of each head in the last layer") -> Figure:
    """Rows of images; per row the input then each head's raw class-token attention map (per-map scale)."""
    count, heads = maps.shape[:2]
    size = images.shape[1:3]
    figure = Figure(figsize=(1.15 * (heads + 1), 1.3 * count + 0.6))
    axes = figure.subplots(count, heads + 1, squeeze=False)
    for i in range(count):
        _show_image(axes[i, 0], images[i])
        if titles is not None:
            axes[i, 0].set_title(titles[i], fontsize=7)
        scaled = _normalise_each(_upsample(maps[i], size))
        for h in range(heads):
            ax = axes[i, h + 1]
            _show_image(ax, images[i])
            ax.imshow(scaled[h], cmap="jet", alpha=0.55, vmin=0, vmax=1)
            if i == 0:
                ax.set_title(f"head {h + 1}", fontsize=7)
    figure.suptitle(title, fontsize=10)
    return figure
