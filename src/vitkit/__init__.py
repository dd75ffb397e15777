"""vitkit: Vision Transformers (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2020) in PyTorch.

The names below are imported on first use (PEP 562), so that ``import vitkit`` and ``vitkit --help`` do not
pay for torch, matplotlib and every subsystem before they are needed.

Loading, one entry per meaning:

- :func:`load_model` (alias :func:`from_pretrained`, the name the Hugging Face and timm users know; the README
  uses both): the model any SOURCE names, whatever it is: a vitkit model directory, a training run or
  checkpoint, a timm / Hugging Face / torchvision / Google .npz checkpoint, a pretrained name, a Hugging
  Face repo id or a URL;
- :func:`create_model`: a registered model by name, with random weights, or its published weights with
  ``pretrained=True`` (timm-style ``arch.tag`` names);
- :func:`build_model`: the model a config describes (random weights).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from vitkit.version import __version__

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports these on first use
    from vitkit.config import StemConfig, ViTConfig
    from vitkit.models import (
        VisionTransformer,
        build_model,
        get_model_config,
        list_models,
        register_model,
        resample_pos_embed,
    )
    from vitkit.resolver import (
        ModelSource,
        ResolvedModel,
        create_model,
        load_model,
        load_source,
        register_source_hook,
        resolve_source,
    )
    from vitkit.resolver import load_model as from_pretrained

_LAZY: dict[str, tuple[str, str]] = {
    "StemConfig": ("vitkit.config", "StemConfig"),
    "ViTConfig": ("vitkit.config", "ViTConfig"),
    "VisionTransformer": ("vitkit.models", "VisionTransformer"),
    "build_model": ("vitkit.models", "build_model"),
    "get_model_config": ("vitkit.models", "get_model_config"),
    "list_models": ("vitkit.models", "list_models"),
    "register_model": ("vitkit.models", "register_model"),
    "resample_pos_embed": ("vitkit.models", "resample_pos_embed"),
    "ModelSource": ("vitkit.resolver", "ModelSource"),
    "ResolvedModel": ("vitkit.resolver", "ResolvedModel"),
    "create_model": ("vitkit.resolver", "create_model"),
    "load_model": ("vitkit.resolver", "load_model"),
    "from_pretrained": ("vitkit.resolver", "load_model"),
    "load_source": ("vitkit.resolver", "load_source"),
    "register_source_hook": ("vitkit.resolver", "register_source_hook"),
    "resolve_source": ("vitkit.resolver", "resolve_source"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value  # later look-ups skip this function
        return value
    if importlib.util.find_spec(f"vitkit.{name}") is not None:  # a subpackage: ``vitkit.train.TrainConfig``
        return importlib.import_module(f"vitkit.{name}")
    raise AttributeError(f"module 'vitkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "ModelSource", "ResolvedModel", "StemConfig", "ViTConfig", "VisionTransformer", "__version__", "build_model",
    "create_model", "from_pretrained", "get_model_config", "list_models", "load_model", "load_source",
    "register_model", "register_source_hook", "resample_pos_embed", "resolve_source",
]
