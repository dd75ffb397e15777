"""vitkit: Vision Transformers (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2020) in PyTorch."""

from pathlib import Path
from typing import Any

from torch import nn

from vitkit.config import StemConfig, ViTConfig
from vitkit.convert.pretrained import create_untrained
from vitkit.models import (
    VisionTransformer,
    build_model,
    get_model_config,
    list_models,
    register_model,
    resample_pos_embed,
)
from vitkit.models.features import maybe_feature_extractor, split_feature_options
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
    """Load weights from any supported source: timm, Hugging Face, torchvision, Google .npz, everything
    :func:`load_model` reads, and, fetched and cached by :mod:`vitkit.hub`, a pretrained name
    (``vit_base_patch16_224.augreg2_in21k_ft_in1k``), a Hugging Face repo id (``google/vit-base-patch16-224``,
    ``hf-hub:timm/...``) or a URL. See :func:`vitkit.resolver.load_source` for the keywords."""
    return _load_model(source, **kwargs)


def create_model(name: str, pretrained: bool = False, **overrides: Any) -> nn.Module:
    """Build a registered model (``create_model('vit_base_patch16_224', num_classes=10)``); with
    ``pretrained=True`` fetch and load its weights, timm-style: ``name`` is ``arch.tag``
    (``vit_base_patch16_224.augreg2_in21k_ft_in1k``) or a bare architecture (its default weights);
    ``overrides`` (``num_classes``, ``img_size``, ...) adapt it as in :func:`from_pretrained`. Without
    ``pretrained``, ``arch.tag`` builds the architecture shaped as those weights (classes, input size)."""
    overrides, features = split_feature_options(overrides)  # features_only=True: timm's feature extractor
    model = _load_model(name, **overrides) if pretrained else create_untrained(name, **overrides)
    return maybe_feature_extractor(model, features)


__all__ = [
    "ModelSource", "ResolvedModel", "StemConfig", "ViTConfig", "VisionTransformer", "build_model", "create_model",
    "from_pretrained", "get_model_config", "list_models", "load_model", "load_source", "register_model",
    "register_source_hook", "resample_pos_embed", "resolve_source", "__version__",
]
