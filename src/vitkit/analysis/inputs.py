"""What the analysis reads: a sample of images from a data set (the model comes from ``vitkit.resolver``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from torch import Tensor, nn

from vitkit.data.splits import Split, load_split
from vitkit.data.transforms import eval_transform


@dataclass
class ImageSample:
    """A seeded sample of a data set's evaluation split."""

    split: Split
    """The sampled images (a :class:`vitkit.data.Split` subset), read through the one data layer."""
    indices: np.ndarray
    """Positions of the sampled images in the split (or in its sorted file list)."""

    @property
    def labels(self) -> np.ndarray:
        return self.split.labels

    @property
    def class_names(self) -> list[str]:
        return self.split.class_names

    @property
    def source(self) -> str:
        return self.split.location


def load_images(dataset: str, num_images: int, *, data_dir: str | Path | None = None, seed: int = 0) -> ImageSample:
    """``num_images`` images drawn without replacement (seeded) from the evaluation split of ``dataset``
    (a named set, ``folder:PATH`` or a data set directory, found as every command finds data)."""
    if num_images < 1:
        raise ValueError(f"--images must be at least 1, got {num_images}")
    split = load_split(dataset, "test", data_dir=data_dir)
    if len(split) == 0:
        raise ValueError(f"{split.location}: the evaluation split has no images")
    count = min(num_images, len(split))
    chosen = np.sort(np.random.default_rng(seed).choice(len(split), size=count, replace=False))
    return ImageSample(split.subset(chosen, f"{count}@{seed}"), chosen)


def prepare_images(sample: ImageSample, model: nn.Module) -> tuple[Tensor, np.ndarray]:
    """The sample as (normalised float (N, C, h, w) model input, uint8 (N, h, w, C) for display), through
    the model's one eval transform (its preprocessing record: size, crop, interpolation, mean, std)."""
    transform = eval_transform(model.config)
    resized = sample.split.resized(transform)
    return transform.normalize(resized), resized.permute(0, 2, 3, 1).numpy()


def describe_labels(labels: Sequence[int], class_names: Optional[list[str]]) -> list[str]:
    return [class_names[int(y)] if class_names and 0 <= int(y) < len(class_names) else str(int(y)) for y in labels]
