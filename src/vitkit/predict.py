"""``vitkit predict``: the top-k classes of image files, with probabilities, from a trained model.

Images are prepared as the model's evaluation images were (its ``config.extra['preprocess']``, written by
``vitkit train``): converted to RGB or grayscale, the shorter side resized to ``img_size / crop_pct``,
center-cropped, scaled to [0, 1] and normalised with the training mean and std. Models without that
record get ImageNet's normalisation and a 0.875 center crop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from vitkit.data import load_eval_image
from vitkit.data.sources import IMAGENET_MEAN, IMAGENET_STD
from vitkit.train.checkpoints import load_trained

DEFAULT_CROP_PCT = 0.875
"""For models that do not record their preprocessing (e.g. converted ones): the usual ImageNet crop."""


@dataclass
class Prediction:
    image: str
    labels: list[str]
    probabilities: list[float]


def preprocess(path: str | Path, config) -> Tensor:
    """One image file -> the normalised (C, H, W) tensor the model saw at evaluation (the data module's
    evaluation transform, with the training run's size, crop and normalisation)."""

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    info = config.extra.get("preprocess", {})
    height, width = config.image_hw
    if height != width:
        raise ValueError(f"vitkit predict needs a square model input, this model takes {height}x{width}")
    rgb = config.in_chans == 3
    mean = info.get("mean") or (IMAGENET_MEAN if rgb else (0.5,))
    std = info.get("std") or (IMAGENET_STD if rgb else (0.5,))
    return load_eval_image(path, img_size=height, mean=tuple(mean), std=tuple(std),
                           crop_pct=float(info.get("crop_pct", DEFAULT_CROP_PCT)))


@torch.no_grad()
def predict(model: nn.Module, images: Sequence[str | Path], *, top_k: int = 5, device: str = "cpu",
            batch_size: int = 64) -> list[Prediction]:
    """Top-``top_k`` labels and softmax probabilities for each image file."""
    config = model.config
    names = config.class_names or [str(i) for i in range(config.num_classes)]
    k = max(1, min(top_k, config.num_classes))
    model = model.to(device).eval()
    results = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        batch = torch.stack([preprocess(p, config) for p in chunk]).to(device)
        probs = model(batch).float().softmax(dim=-1)
        top = probs.topk(k, dim=-1)
        for path, values, indices in zip(chunk, top.values.tolist(), top.indices.tolist()):
            results.append(Prediction(str(path), [names[i] for i in indices], values))
    return results


def predict_files(source: str | Path, images: Sequence[str | Path], *, top_k: int = 5,
                  device: str = "cpu") -> list[Prediction]:
    """Load a trained model (model directory, run directory or training checkpoint) and predict."""

    model, _, _ = load_trained(source)
    return predict(model, images, top_k=top_k, device=device)


def format_predictions(results: Sequence[Prediction], *, as_json: bool = False) -> str:
    if as_json:
        return json.dumps([{"image": r.image, "top_k": [{"label": label, "probability": round(p, 6)}
                                                         for label, p in zip(r.labels, r.probabilities)]}
                           for r in results], indent=1)
    lines = []
    for r in results:
        lines.append(r.image)
        lines += [f"  {100 * p:6.2f}%  {label}" for label, p in zip(r.labels, r.probabilities)]
    return "\n".join(lines)
