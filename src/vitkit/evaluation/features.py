"""Frozen image features: the input of a model's classifier head, computed once and cached.

The feature of an image is exactly what the head sees: the class token after the final norm (or the
pooled tokens after ``fc_norm``), passed through the representation layer if the model has one:
``model.forward_head(model.forward_features(x), pre_logits=True)``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import TextIO

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vitkit.checkpoint import load_state_dict
from vitkit.data.splits import Split
from vitkit.data.transforms import EvalTransform, eval_transform
from vitkit.fileio import save_state_dict
from vitkit.runtime import resolve_device


class ExtractionProgress:
    """Progress of a feature-extraction job (possibly several splits): a tqdm bar on a terminal, else a
    line every ``interval`` seconds; after the first batch, an estimate of the whole job's time."""

    def __init__(self, total: int, *, stream: TextIO | None = None, interval: float = 30.0,
                 enabled: bool = True) -> None:
        self.total, self.done, self.interval, self.enabled = total, 0, interval, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.start = self.last = time.perf_counter()
        terminal = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(total=total, unit="img", desc="features", file=self.stream) if terminal else None

    def _say(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def update(self, count: int) -> None:
        first = self.done == 0
        self.done += count
        now = time.perf_counter()
        rate = self.done / max(now - self.start, 1e-9)
        if first:
            self._say(f"features: {self.total} images to extract, about {_duration(self.total / rate)} "
                      f"({rate:.0f} images/s on the first batch)")
        if self.bar is not None:
            self.bar.update(count)
        elif now - self.last >= self.interval and self.done < self.total:
            self.last = now
            self._say(f"features: {self.done}/{self.total} images, {rate:.0f} images/s, "
                      f"{_duration((self.total - self.done) / rate)} left")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.done:
            self._say(f"features: {self.done} images in {_duration(time.perf_counter() - self.start)}")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@torch.inference_mode()
def extract_features(model: nn.Module, data: Split, *, transform: EvalTransform | None = None,
                     batch_size: int = 256, device: str | torch.device | None = None,
                     progress: ExtractionProgress | None = None) -> Tensor:
    """(N, F) float32 features of every image in ``data``, in order, with the model in eval mode;
    images go through ``transform`` (default: the model's eval transform)."""
    transform = transform or eval_transform(model.config)
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for x in data.batches(transform, batch_size):
            chunks.append(features_of(model, x.to(device)).float().cpu())
            if progress is not None:
                progress.update(len(x))
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def features_of(model: nn.Module, inputs: Tensor) -> Tensor:
    """What the classifier head sees: ``forward_head(forward_features(x), pre_logits=True)``."""
    return model.forward_head(model.forward_features(inputs), pre_logits=True)


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

    def key(self, model: nn.Module, data: Split, transform: EvalTransform) -> str:
        return hashlib.sha256("|".join([model_fingerprint(model), data.fingerprint(),
                                        repr(transform)]).encode()).hexdigest()[:32]

    def cached(self, model: nn.Module, data: Split, transform: EvalTransform) -> bool:
        """Whether :meth:`features` would be served without running the model."""
        key = self.key(model, data, transform)
        return key in self._memory or (self.directory is not None
                                       and (self.directory / f"features-{key}.safetensors").is_file())

    def features(self, model: nn.Module, data: Split, *, transform: EvalTransform | None = None,
                 batch_size: int = 256, device: str | torch.device | None = None,
                 progress: ExtractionProgress | None = None) -> Tensor:
        transform = transform or eval_transform(model.config)
        key = self.key(model, data, transform)
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self.directory / f"features-{key}.safetensors" if self.directory is not None else None
        if path is not None and path.is_file():
            feats = load_state_dict(path)["features"]
            self.hits += 1
        else:
            feats = extract_features(model, data, transform=transform, batch_size=batch_size, device=device,
                                     progress=progress)
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
