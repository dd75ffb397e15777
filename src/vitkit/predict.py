"""``vitkit predict``: the top-k classes of image files, with probabilities, from a trained model.

Images are prepared as the model's evaluation images were (its ``config.extra['preprocess']``, written by
``vitkit train``): converted to RGB or grayscale, the shorter side resized to ``img_size / crop_pct``,
center-cropped, scaled to [0, 1] and normalised with the training mean and std.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Prediction:
    image: str
    labels: list[str]
    probabilities: list[float]


def preprocess(path: str | Path, config) -> Tensor:
    """One image file -> a normalised (C, H, W) float tensor the model accepts."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2 import functional as TF

    info = config.extra.get("preprocess", {})
    height, width = config.image_hw
    try:
        with Image.open(path) as image:
            image = image.convert("L" if config.in_chans == 1 else "RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from e
    x = TF.pil_to_tensor(image)
    crop_pct = float(info.get("crop_pct", 1.0))
    x = TF.resize(x, [round(min(height, width) / crop_pct)], interpolation=TF.InterpolationMode.BICUBIC,
                  antialias=True)
    x = TF.center_crop(x, [height, width])
    x = x.float() / 255.0
    mean = info.get("mean") or (IMAGENET_MEAN if config.in_chans == 3 else (0.5,))
    std = info.get("std") or (IMAGENET_STD if config.in_chans == 3 else (0.5,))
    return TF.normalize(x, list(mean), list(std))


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
    from vitkit.train.checkpoints import load_trained

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
