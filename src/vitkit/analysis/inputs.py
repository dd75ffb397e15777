"""What the analysis reads: a model from a source string, and a sample of images from a data set.

Both live here, each in one function, so that they can be routed through ``vitkit.from_pretrained``
and ``vitkit.data`` without touching the analyses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from vitkit.convert import from_pretrained
from vitkit.hub import find_entry, is_hub_source
from vitkit.models.registry import create_model, list_models

"""Normalisation used when a model's config does not carry its own (the paper's (x - 0.5) / 0.5)."""

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _load_source(source: str) -> tuple[nn.Module, str]:
    """A model from anything ``vitkit.from_pretrained`` reads (vitkit, timm, Hugging Face, torchvision,
    Google .npz), or a registry name (random weights, for smoke tests).

    Returns the model and a one-line description of what was loaded.
    """

    if Path(source).exists():
        return from_pretrained(source), f"checkpoint {source}"
    if source in list_models():
        return create_model(source), f"registry model {source} with RANDOM weights (not trained)"
    if is_hub_source(source) or find_entry(source) is not None or "/" in source:
        return from_pretrained(source), f"pretrained {source}"
    raise ValueError(f"SOURCE {source!r} is neither a checkpoint (vitkit/Hugging Face directory, timm/torchvision "
                     "state dict, Google .npz), a pretrained name (see `vitkit models --pretrained`), a Hugging Face "
                     "repo id or URL, nor a registered model name (see `vitkit models`)")


def input_normalisation(config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel the model expects its [0, 1] inputs normalised with (see
    ``ModelConfig.input_normalisation``)."""
    return config.input_normalisation()


@dataclass
class ImageSample:
    images: np.ndarray
    """uint8 (N, H, W, C)."""
    labels: np.ndarray
    indices: np.ndarray
    """Positions of the sampled images in the split (or in the sorted file list)."""
    class_names: Optional[list[str]]
    source: str


def default_data_dir() -> Path:
    """``$VITKIT_DATA``, else ``../shared/data`` beside the current directory or the source checkout."""
    if os.environ.get("VITKIT_DATA"):
        return Path(os.environ["VITKIT_DATA"])
    candidates = [Path.cwd() / ".." / "shared" / "data", Path(__file__).resolve().parents[3] / ".." / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return candidates[0]


def load_images(dataset: str, num_images: int, *, data_dir: str | Path | None = None, seed: int = 0,
                image_size: tuple[int, int] | None = None) -> ImageSample:
    """``num_images`` images drawn without replacement (seeded) from a data set's evaluation split.

    Reads ``<data_dir>/<dataset>/test.npz`` (+ ``meta.json`` for class names), or a class-folder
    layout ``<data_dir>/<dataset>/{val,test}/<class>/*.jpg``, whose images are resized and
    centre-cropped to ``image_size``.
    """
    if num_images < 1:
        raise ValueError(f"--images must be at least 1, got {num_images}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    folder = root / dataset
    if not folder.is_dir():
        known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        hint = f"; data sets there: {', '.join(known)}" if known else "; set --data-dir or VITKIT_DATA"
        raise FileNotFoundError(f"data set {dataset!r}: no folder {folder}{hint}")
    class_names = _class_names(folder / "meta.json")
    if (folder / "test.npz").is_file():
        return _sample_npz(folder / "test.npz", num_images, seed, class_names)
    for split in ("val", "test"):
        if (folder / split).is_dir():
            return _sample_folder(folder / split, num_images, seed, class_names, image_size)
    raise FileNotFoundError(f"data set {dataset!r}: {folder} holds neither test.npz nor val/ or test/ class folders")


def _class_names(meta: Path) -> Optional[list[str]]:
    if not meta.is_file():
        return None
    try:
        classes = json.loads(meta.read_text()).get("classes")
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta}: not valid JSON ({e})") from e
    return list(classes) if classes else None


def _choose(total: int, num_images: int, seed: int) -> np.ndarray:
    count = min(num_images, total)
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))


def _sample_npz(path: Path, num_images: int, seed: int, class_names: Optional[list[str]]) -> ImageSample:
    with np.load(path, allow_pickle=False) as data:
        for key in ("images", "labels"):
            if key not in data.files:
                raise ValueError(f"{path}: missing array {key!r} (has {', '.join(data.files)})")
        images, labels = data["images"], data["labels"]
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"{path}: 'images' must be uint8 (N, H, W[, C]), got {images.dtype} {images.shape}")
    if images.ndim == 3:
        images = images[..., None]
    chosen = _choose(len(images), num_images, seed)
    return ImageSample(images[chosen], labels[chosen].astype(np.int64), chosen, class_names, str(path))


def _sample_folder(split: Path, num_images: int, seed: int, class_names: Optional[list[str]],
                   image_size: tuple[int, int] | None) -> ImageSample:
    classes = sorted(p.name for p in split.iterdir() if p.is_dir())
    files = [(f, label) for label, c in enumerate(classes) for f in sorted((split / c).iterdir())
             if f.suffix.lower() in _IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"{split}: no image files in class folders")
    chosen = _choose(len(files), num_images, seed)
    size = image_size or (224, 224)
    images = []
    for i in chosen:
        with Image.open(files[i][0]) as image:
            images.append(np.asarray(_resize_centre_crop(image.convert("RGB"), size)))
    if class_names is None or len(class_names) != len(classes):
        class_names = classes
    labels = np.array([files[i][1] for i in chosen], dtype=np.int64)
    return ImageSample(np.stack(images), labels, chosen, class_names, str(split))


def _resize_centre_crop(image, size: tuple[int, int]):
    height, width = size
    scale = max(height / image.height, width / image.width)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.BICUBIC)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def prepare_images(images: np.ndarray, model: nn.Module) -> tuple[Tensor, np.ndarray]:
    """uint8 (N, H, W, C) images -> (normalised float (N, C, h, w) model input, uint8 (N, h, w, C) for
    display), at the model's input size (resized with bilinear interpolation) and channel count."""
    config = model.config
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    channels = config.in_chans
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise ValueError(f"images have {x.shape[1]} channels but the model expects {channels}")
    if tuple(x.shape[-2:]) != tuple(config.image_hw):
        x = F.interpolate(x, size=config.image_hw, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    display = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    mean, std = input_normalisation(config)
    normalised = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return normalised, display


def describe_labels(labels: Sequence[int], class_names: Optional[list[str]]) -> list[str]:
    return [class_names[int(y)] if class_names and 0 <= int(y) < len(class_names) else str(int(y)) for y in labels]
