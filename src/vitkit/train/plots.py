"""Pictures of a run: loss and accuracy curves from ``metrics.jsonl``, and confusion matrices."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from torch import Tensor

from vitkit.fileio import atomic_path
from vitkit.train.monitor import read_metrics

CURVES_NAME = "curves.png"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend. Imported on first use, not with vitkit, so that
    importing vitkit neither pays for pyplot nor switches the backend of a user's notebook."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(run_dir: str | Path, path: Optional[str | Path] = None) -> Path:
    """Training loss and accuracy per logging step, validation per epoch, against the optimizer step."""
    plt = pyplot()
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    val = [r for r in epochs if "val_loss" in r]
    panels = [("loss", "loss")] + ([("acc", "accuracy")] if any("train_acc" in r for r in epochs) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        scale = 100 if key == "acc" else 1
        if train:
            ax.plot([r["step"] for r in train], [scale * r[key] for r in train], lw=1, alpha=0.6, label="train")
        ax.plot([r["step"] for r in epochs], [scale * r[f"train_{key}"] for r in epochs], "o-", ms=3,
                label="train (epoch)")
        if val and f"val_{key}" in val[0]:
            ax.plot([r["step"] for r in val], [scale * r[f"val_{key}"] for r in val], "s-", ms=3, label="val")
        if val and f"val_{key}_ema" in val[0]:
            ax.plot([r["step"] for r in val], [scale * r[f"val_{key}_ema"] for r in val], "^-", ms=3,
                    label="val (EMA)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"{title} (%)" if key == "acc" else title)
        ax.grid(alpha=0.3)
        ax.legend()
    if val and "best_acc" in val[-1]:
        title = f" - best val acc {100 * val[-1]['best_acc']:.2f}%"
    elif val and "best_loss" in val[-1]:
        title = f" - best val loss {val[-1]['best_loss']:.4f}"
    else:
        title = ""
    fig.suptitle(f"{run_dir.name}{title}")
    fig.tight_layout()
    path = Path(path) if path is not None else run_dir / CURVES_NAME
    with atomic_path(path) as tmp:  # redrawn during a run: a kill never leaves half a picture
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def plot_confusion(confusion: Tensor, class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """A row-normalised confusion matrix (rows: true class, columns: predicted), counts in the cells
    when there are few classes."""
    plt = pyplot()
    counts = confusion.double()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    k = len(class_names)
    size = min(4 + 0.45 * k, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 30:
        ax.set_xticks(range(k), class_names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), class_names, fontsize=8)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if counts[i, j] > 0:
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
