"""vitkit: Vision Transformers (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2020) in PyTorch."""

from pathlib import Path
from typing import Any

from torch import nn

from vitkit.config import StemConfig, ViTConfig
from vitkit.models import (
    VisionTransformer,
    build_model,
    create_model,
    get_model_config,
    list_models,
    register_model,
    resample_pos_embed,
)
from vitkit.resolver import ModelSource, ResolvedModel, load_source, register_source_hook, resolve_source
from vitkit.resolver import load_model as _load_model
from vitkit.version import __version__


def load_model(source: str | Path, **kwargs: Any) -> nn.Module:
    """The model ``source`` names: a vitkit model directory (``save_pretrained``), a training run directory
    (its best checkpoint, else its last; ``checkpoint="last"``/``"step-N"``/``"model"`` picks another), a
    training checkpoint (``best.pt``, ``last.pt``, ``step-N.pt``), or any format :func:`from_pretrained` reads.
    ``img_size=`` resamples the position embeddings; other keywords as in :func:`from_pretrained`."""
    return _load_model(source, **kwargs)


def from_pretrained(source: str | Path, **kwargs: Any) -> nn.Module:
    """Load weights from any supported source: timm, Hugging Face, torchvision, Google .npz, and everything
    :func:`load_model` reads. See :func:`vitkit.resolver.load_source` for the keywords."""
    return _load_model(source, **kwargs)


__all__ = [
    "ModelSource", "ResolvedModel", "StemConfig", "ViTConfig", "VisionTransformer", "build_model", "create_model",
    "from_pretrained", "get_model_config", "list_models", "load_model", "load_source", "register_model",
    "register_source_hook", "resample_pos_embed", "resolve_source", "__version__",
]
