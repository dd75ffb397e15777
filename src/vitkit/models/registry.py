"""The registry mechanism: ``build_registered(name, **overrides)``, ``list_models(pattern)``.

A registry entry is a name, an architecture and a config. Architectures pair a config dataclass with
the module class it builds, so that a saved ``config.json`` can be turned back into a model without
knowing its registry name. This module holds no models: each model family registers its architecture
and names in its own module (``vitkit.models.zoo`` for the ViTs, ``vitkit.models.resnet`` for the CNN
baselines), and ``vitkit.models`` imports them all, so the registry is full once ``vitkit.models`` is
imported.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitkit.models.features import maybe_feature_extractor, split_feature_options
from vitkit.version import __version__


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
    try:
        return _ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(_ARCHITECTURES))}") from None


def architecture_of(config: Any) -> str:
    """The architecture name whose config class ``config`` is an instance of."""
    for arch in _ARCHITECTURES.values():
        if type(config) is arch.config_class:
            return arch.name
    raise ValueError(f"no architecture is registered for config type {type(config).__name__}")


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; ``pattern`` is a shell wildcard such as ``'vit_base*'``."""
    names = sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def get_model_entry(name: str) -> ModelEntry:
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


def build_registered(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model with random weights, e.g. ``build_registered('vit_base_patch16_224', num_classes=10)``
    (the models layer's part of :func:`vitkit.create_model`, which also takes catalog names and fetches weights);
    ``features_only=True`` (with ``out_indices``, ``feature_norm``, ``output_fmt``) gives timm's feature extractor."""
    overrides, options = split_feature_options(overrides)
    entry = get_model_entry(name)
    config = entry.config.replace(**overrides)
    return maybe_feature_extractor(get_architecture(entry.architecture).build(config), options)


def count_parameters(name: str, **overrides: Any) -> int:
    """The parameter count of a registered model, built on the meta device: shapes without memory or
    initialisation, so that ViT-H counts in a fraction of a second instead of allocating and initialising 632M
    weights."""
    with torch.device("meta"):
        model = build_registered(name, **overrides)
    return sum(p.numel() for p in model.parameters())


def config_record(config: Any) -> dict[str, Any]:
    """What ``config.json`` holds for a model built from ``config``: its architecture name, its fields and
    the vitkit version that wrote it (read back by :func:`vitkit.checkpoint.read_config`)."""
    return {"architecture": architecture_of(config), **config.to_dict(), "vitkit_version": __version__}
