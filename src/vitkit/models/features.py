"""Feature extraction the timm way: ``create_model(name, features_only=True)`` and ``feature_info``.

A model with ``forward_intermediates`` (every ViT family) becomes a module whose forward returns the feature
maps after chosen blocks (timm's ``FeatureGetterNet``): the blocks after the last one asked for, and the
head, are pruned away.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn


class FeatureInfo(list):
    """timm's ``feature_info``: one dict per feature (``module``, ``num_chs``, ``reduction``) with timm's
    accessors (``channels()``, ``reduction()``, ``module_name()``, ``get_dicts()``)."""

    def _get(self, key: str, idx: int | Sequence[int] | None) -> Any:
        if idx is None:
            return [info[key] for info in self]
        if isinstance(idx, int):
            return self[idx][key]
        return [self[i][key] for i in idx]

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self._get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self._get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self._get("module", idx)

    def get_dicts(self) -> list[dict[str, Any]]:
        return [dict(info) for info in self]


class FeatureExtractor(nn.Module):
    """The feature maps a model's ``forward_intermediates`` gives after the blocks ``out_indices`` (a count of
    final blocks or a list; timm's ViT default: the last 3), as a list, NCHW by default."""

    def __init__(self, model: nn.Module, out_indices: int | Iterable[int] = 3, *, norm: bool = False,
                 output_fmt: str = "NCHW", prune: bool = True) -> None:
        super().__init__()
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"features_only: {type(model).__name__} has no forward_intermediates "
                             "(feature extraction is supported for the ViT families)")
        if prune:
            indices = model.prune_intermediate_layers(out_indices, prune_norm=not norm, prune_head=True)
        else:
            indices = model._resolve_indices(out_indices)
        self.model = model
        self.out_indices = list(indices)
        self.norm = norm
        self.output_fmt = output_fmt
        info = model.feature_info
        self.feature_info = FeatureInfo(info[i] for i in self.out_indices)

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(images, self.out_indices, norm=self.norm, output_fmt=self.output_fmt,
                                                intermediates_only=True)


FEATURE_OPTIONS = ("features_only", "out_indices", "feature_norm", "output_fmt")
"""The ``create_model`` keywords that ask for a :class:`FeatureExtractor` rather than a classifier."""


def split_feature_options(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config overrides, feature-extraction options) from ``create_model``'s keywords."""
    options = {k: overrides[k] for k in FEATURE_OPTIONS if k in overrides}
    return {k: v for k, v in overrides.items() if k not in FEATURE_OPTIONS}, options


def maybe_feature_extractor(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    """``model``, or its :class:`FeatureExtractor` when ``options`` say ``features_only=True``."""
    options = dict(options)
    if not options.pop("features_only", False):
        if options:
            raise ValueError(f"{', '.join(sorted(options))}: only with features_only=True")
        return model
    return FeatureExtractor(model, options.pop("out_indices", 3), norm=options.pop("feature_norm", False),
                            output_fmt=options.pop("output_fmt", "NCHW"))
