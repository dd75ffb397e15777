"""``vitkit predict``: the top-k classes of image files, with probabilities, from a trained model.

Images are prepared by the model's one eval transform (:func:`vitkit.data.eval_transform`, from the
:class:`~vitkit.preprocessing.Preprocessing` record in its config: size, crop, interpolation, mean, std),
exactly as ``vitkit eval``, ``fewshot`` and ``analyze`` prepare them, except that a photo is first turned
as its EXIF orientation tag says (what an image viewer shows, and what transformers' ``pipeline`` does;
data sets are read as stored, as timm's and torchvision's data sets read them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from vitkit.data.transforms import EvalTransform, eval_transform
from vitkit.resolver import ResolvedModel, load_source
from vitkit.runtime import DEFAULT_DEVICE, resolve_device


@dataclass
class Prediction:
    image: str
    labels: list[str]
    probabilities: list[float]


def preprocess(path: str | Path, config, transform: EvalTransform | None = None) -> Tensor:
    """One image file -> the normalised (C, H, W) tensor the model sees (its eval transform, after the
    file's EXIF orientation)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    transform = transform or eval_transform(config)
    return transform.normalize(transform.load(path, orient=True))


@torch.no_grad()
def predict(model: nn.Module, images: Sequence[str | Path], *, top_k: int = 5,
            device: str | torch.device | None = DEFAULT_DEVICE, batch_size: int = 64) -> list[Prediction]:
    """Top-``top_k`` labels and softmax probabilities for each image file."""
    config = model.config
    names = config.class_names or [str(i) for i in range(config.num_classes)]
    k = max(1, min(top_k, config.num_classes))
    device = resolve_device(device)
    model = model.to(device).eval()
    transform = eval_transform(config)
    results = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        batch = torch.stack([preprocess(p, config, transform) for p in chunk]).to(device)
        logits = model(batch).float()
        finite = torch.isfinite(logits).all(dim=-1)
        if not bool(finite.all()):
            bad = [str(p) for p, ok in zip(chunk, finite.tolist()) if not ok]
            raise ValueError(f"{bad[0]}: the model's logits are NaN or infinite"
                             f"{f' (and for {len(bad) - 1} more image(s))' if len(bad) > 1 else ''}; "
                             "its weights or its precision cannot give an answer")
        probs = logits.softmax(dim=-1)
        top = probs.topk(k, dim=-1)
        for path, values, indices in zip(chunk, top.values.tolist(), top.indices.tolist()):
            results.append(Prediction(str(path), [names[i] for i in indices], values))
    return results


def predict_files(source: str | Path | ResolvedModel, images: Sequence[str | Path], *, top_k: int = 5,
                  device: str | torch.device = DEFAULT_DEVICE) -> list[Prediction]:
    """Load the model ``source`` names (run directory, training checkpoint, model directory, any format
    :func:`vitkit.load_model` reads) and predict."""
    resolved = source if isinstance(source, ResolvedModel) else load_source(source)
    try:
        return predict(resolved.model, images, top_k=top_k, device=device)
    except ValueError as e:
        if "logits are NaN" in str(e):
            raise ValueError(f"{resolved.description}: {e}") from None
        raise


def format_predictions(results: Sequence[Prediction], *, as_json: bool = False) -> str:
    if as_json:
        return json.dumps([{"image": r.image, "top_k": [{"label": label, "probability": round(p, 6)}
                                                         for label, p in zip(r.labels, r.probabilities)]}
                           for r in results], indent=1, allow_nan=False)
    lines = []
    for r in results:
        lines.append(r.image)
        lines += [f"  {100 * p:6.2f}%  {label}" for label, p in zip(r.labels, r.probabilities)]
    return "\n".join(lines)
