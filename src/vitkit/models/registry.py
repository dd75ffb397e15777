"""One registry for every named model: ``create_model(name, **overrides)``, ``list_models(pattern)``.

A registry entry is a name, an architecture ("vit", and whatever later modules register) and a
config. Architectures pair a config dataclass with the module class it builds, so that a saved
``config.json`` can be turned back into a model without knowing its registry name.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from vitkit.config import ViTConfig
from vitkit.models.vit import VisionTransformer


@dataclass(frozen=True)
class Architecture:
    name: str
    config_class: type
    build: Callable[[Any], nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    architecture: str
    config: Any
    description: str = ""


_ARCHITECTURES: dict[str, Architecture] = {}
_MODELS: dict[str, ModelEntry] = {}


def register_architecture(name: str, config_class: type, build: Callable[[Any], nn.Module]) -> None:
    _ARCHITECTURES[name] = Architecture(name, config_class, build)


def register_model(name: str, config: Any, *, architecture: str = "vit", description: str = "") -> None:
    """Add a named model. Re-registering a name replaces it (useful in notebooks)."""
    if architecture not in _ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(_ARCHITECTURES)}")
    config = config.replace(name=name)
    _MODELS[name] = ModelEntry(name, architecture, config, description)


def get_architecture(name: str) -> Architecture:
    _load_optional_architectures()
    try:
        return _ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(_ARCHITECTURES))}") from None


def architecture_of(config: Any) -> str:
    """The architecture name whose config class ``config`` is an instance of."""
    _load_optional_architectures()
    for arch in _ARCHITECTURES.values():
        if type(config) is arch.config_class:
            return arch.name
    raise ValueError(f"no architecture is registered for config type {type(config).__name__}")


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; ``pattern`` is a shell wildcard such as ``'vit_base*'``."""
    _load_optional_architectures()
    names = sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def get_model_entry(name: str) -> ModelEntry:
    _load_optional_architectures()
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _MODELS, n=5, cutoff=0.5)
        hint = f"; did you mean: {', '.join(close)}?" if close else "; see vitkit.list_models()"
        raise ValueError(f"unknown model {name!r}{hint}") from None


def get_model_config(name: str, **overrides: Any) -> Any:
    """The registered config of ``name`` with ``overrides`` applied."""
    return get_model_entry(name).config.replace(**overrides)


def build_model(config: Any) -> nn.Module:
    """Build the module a config describes (any registered architecture)."""
    return get_architecture(architecture_of(config)).build(config)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model, e.g. ``create_model('vit_base_patch16_224', num_classes=10)``."""
    entry = get_model_entry(name)
    config = entry.config.replace(**overrides)
    return get_architecture(entry.architecture).build(config)


_OPTIONAL_MODULES = ("vitkit.models.hybrid", "vitkit.models.resnet", "vitkit.models.t2t")
_loaded_optional = False


def _load_optional_architectures() -> None:
    """Import modules that register further architectures (hybrid, CNN baselines) on first use."""
    global _loaded_optional
    if _loaded_optional:
        return
    _loaded_optional = True
    import importlib.util

    for module in _OPTIONAL_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


# ----------------------------------------------------------------------------------- the family
register_architecture("vit", ViTConfig, VisionTransformer)

# Table 1 of the paper (Ti and S from DeiT / "How to train your ViT").
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, mlp_dim=768),
    "small": dict(embed_dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "base": dict(embed_dim=768, depth=12, num_heads=12, mlp_dim=3072),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, mlp_dim=5120),
}
_PAPER_NAME = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H"}

for _size, _dims in SIZES.items():
    for _patch in (32, 16, 14):
        for _res in (224, 384):
            if _res % _patch:
                continue  # 384 is not a multiple of 14; timm has no such model either
            register_model(
                f"vit_{_size}_patch{_patch}_{_res}",
                ViTConfig(img_size=_res, patch_size=_patch, **_dims),
                description=f"ViT-{_PAPER_NAME[_size]}/{_patch} at {_res}px, 1000 classes",
            )
    # The paper's ImageNet-21k pre-training models: 21,843 classes and a representation layer.
    for _patch in (32, 16, 14):
        register_model(
            f"vit_{_size}_patch{_patch}_224_in21k",
            ViTConfig(img_size=224, patch_size=_patch, num_classes=21843,
                      representation_size=_dims["embed_dim"], **_dims),
            description=f"ViT-{_PAPER_NAME[_size]}/{_patch} ImageNet-21k pre-training layout (with pre-logits)",
        )

# Small-image models, trained from scratch by vitkit's recipes.
register_model("vit_tiny_patch4_32", ViTConfig(img_size=32, patch_size=4, num_classes=10, **SIZES["tiny"]),
               description="ViT-Ti/4 for 32x32 images (CIFAR)")
register_model("vit_small_patch4_32", ViTConfig(img_size=32, patch_size=4, num_classes=10, **SIZES["small"]),
               description="ViT-S/4 for 32x32 images (CIFAR)")
register_model("vit_tiny_patch2_32", ViTConfig(img_size=32, patch_size=2, num_classes=10, **SIZES["tiny"]),
               description="ViT-Ti/2 for 32x32 images: 256 patches, slower, more accurate")
register_model("vit_cifar_patch4_32",
               ViTConfig(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=9, num_heads=12,
                         mlp_dim=384),
               description="compact ViT for CIFAR-10 from scratch (D 192, depth 9, 12 heads, MLP 384)")
register_model("vit_mini_patch4_32",
               ViTConfig(img_size=32, patch_size=4, num_classes=10, embed_dim=128, depth=6, num_heads=2,
                         mlp_dim=256),
               description="ViT for CIFAR-sized images on a CPU budget (D 128, depth 6, 2 heads, MLP 256; 0.81M)")
register_model("vit_mnist_patch4_28",
               ViTConfig(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=6,
                         num_heads=4, mlp_dim=256),
               description="compact ViT for 28x28 grayscale images (MNIST, Fashion-MNIST)")
