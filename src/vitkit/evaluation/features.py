"""Frozen image features: the input of a model's classifier head, computed once and cached.

The feature of an image is exactly what the head sees: the class token after the final norm (or the
pooled tokens after ``fc_norm``), passed through the representation layer if the model has one:
``model.forward_head(model.forward_features(x), pre_logits=True)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.checkpoint import load_state_dict
from vitkit.evaluation.datasets import LabeledImages
from vitkit.fileio import save_state_dict


@dataclass(frozen=True)
class Preprocess:
    """uint8 (N, H, W, C) images -> normalised float (N, C, H, W) at the model's input size."""

    image_size: tuple[int, int]
    in_chans: int
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __call__(self, images: Tensor) -> Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        if x.shape[1] != self.in_chans:
            if x.shape[1] == 1:
                x = x.expand(-1, self.in_chans, -1, -1)  # grey -> RGB
            elif self.in_chans == 1:
                x = x.mean(dim=1, keepdim=True)
            else:
                raise ValueError(f"cannot feed {x.shape[1]}-channel images to a {self.in_chans}-channel model")
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean[: self.in_chans] if len(self.mean) > 1 else self.mean * self.in_chans)
        std = torch.tensor(self.std[: self.in_chans] if len(self.std) > 1 else self.std * self.in_chans)
        return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)

    @classmethod
    def for_model(cls, model: nn.Module, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> Preprocess:
        """The model's input size and channels; normalisation from the arguments, else what the model was
        trained with (``config.extra['preprocess']``, written by ``vitkit train``), else the paper's
        [-1, 1] scaling (mean = std = 0.5)."""
        config = model.config
        recorded_mean, recorded_std = config.input_normalisation()
        mean = tuple(float(v) for v in (mean if mean is not None else recorded_mean))
        std = tuple(float(v) for v in (std if std is not None else recorded_std))
        if len(mean) != len(std):
            raise ValueError(f"normalisation mean {mean} and std {std} have different lengths")
        return cls(tuple(config.image_hw), config.in_chans, mean, std)


@torch.inference_mode()
def extract_features(model: nn.Module, data: LabeledImages, *, preprocess: Preprocess | None = None,
                     batch_size: int = 256, device: str | torch.device | None = None) -> Tensor:
    """(N, F) float32 features of every image in ``data``, in order, with the model in eval mode."""
    preprocess = preprocess or Preprocess.for_model(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    images = torch.from_numpy(data.images)
    chunks = []
    try:
        for start in range(0, len(images), batch_size):
            x = preprocess(images[start:start + batch_size]).to(device)
            chunks.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


class FeatureCache:
    """Features per (model weights, data, preprocessing), kept in memory and optionally on disk.

    The key hashes the model's config and every weight, the images and labels, and the
    preprocessing, so a changed model or data set never reads stale features. Disk entries are
    safetensors files written atomically.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else None
        self._memory: dict[str, Tensor] = {}
        self.hits = 0
        self.misses = 0

    def features(self, model: nn.Module, data: LabeledImages, *, preprocess: Preprocess | None = None,
                 batch_size: int = 256, device: str | torch.device | None = None) -> Tensor:
        preprocess = preprocess or Preprocess.for_model(model)
        key = hashlib.sha256("|".join([model_fingerprint(model), data_fingerprint(data),
                                       repr(preprocess)]).encode()).hexdigest()[:32]
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self.directory / f"features-{key}.safetensors" if self.directory is not None else None
        if path is not None and path.is_file():
            feats = load_state_dict(path)["features"]
            self.hits += 1
        else:
            feats = extract_features(model, data, preprocess=preprocess, batch_size=batch_size, device=device)
            self.misses += 1
            if path is not None:
                save_state_dict({"features": feats}, path, metadata={"data": data.name})
        self._memory[key] = feats
        return feats


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's config and all its weights and buffers."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(data: LabeledImages) -> str:
    h = hashlib.sha256(data.name.encode())
    h.update(str(data.images.shape).encode())
    h.update(np.ascontiguousarray(data.images).tobytes())
    h.update(np.ascontiguousarray(data.labels).tobytes())
    return h.hexdigest()
