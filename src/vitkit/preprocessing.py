"""The preprocessing record bound to a model's weights: how an image becomes the model's input.

One typed record, written in the model's ``config.json`` (key ``preprocess``): the input size, the
per-channel mean and std of the [0, 1] pixels, the crop fraction (the shorter side is resized to
``size / crop_pct`` and the central ``size`` square kept, as timm's ``crop_pct``), the crop mode (timm's
``crop_mode``: ``center`` keeps the aspect ratio, ``squash`` resizes both sides, as transformers'
ViTImageProcessor and Google's input pipeline do), and the resize interpolation. Training writes it;
converters attach the source's (timm/Hugging Face configs, the known torchvision and Google constants).
A model without one gets :data:`DEFAULT_PREPROCESSING`: the paper's [-1, 1] scaling (mean = std = 0.5), no crop,
bilinear.

This module imports only the config engine from vitkit, so model configs (the lowest layer) can hold the
record.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

from vitkit.config_engine import OMIT_DEFAULT, check_fields, from_mapping, to_plain

Interpolation = Literal["bilinear", "bicubic", "nearest"]
CropMode = Literal["center", "squash"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

_LEGACY_KEYS = {"img_size": "size"}
"""Keys of the untyped ``extra["preprocess"]`` dict older vitkit versions wrote."""


@dataclass(frozen=True)
class Preprocessing:
    """How evaluation images are prepared for a model (see the module docstring)."""

    size: tuple[int, int] = (224, 224)
    """(height, width) of the model input; always the model's own input size."""
    mean: tuple[float, ...] = HALF
    """Per-channel mean of the [0, 1] pixels (one value per input channel)."""
    std: tuple[float, ...] = HALF
    crop_pct: float = 1.0
    """Fraction of the resized image kept by the centre crop: resize the shorter side to
    ``size / crop_pct``, then crop ``size``. 1.0 = resize only (square images are not cropped)."""
    interpolation: Interpolation = "bilinear"
    """``nearest`` is PIL's (and transformers') nearest neighbour: the pixel whose centre is closest."""
    crop_mode: CropMode = dataclasses.field(default="center", metadata=OMIT_DEFAULT)  # older files lack it
    """``center``: resize the shorter side (a non-square input: both sides) to ``size / crop_pct``, keeping the
    aspect ratio; ``squash``: resize both sides to ``size / crop_pct`` whatever the image's aspect ratio. Then
    the centre ``size`` is kept, its offset rounded down (``(resized - size) // 2``), as transformers does."""
    dataset: Optional[str] = dataclasses.field(default=None, metadata=OMIT_DEFAULT)
    """The data set the statistics come from (informational; ``vitkit eval``'s default data set)."""

    def __post_init__(self) -> None:
        # a single number is short for a square size, or for one value per channel
        if isinstance(self.size, int) and not isinstance(self.size, bool):
            object.__setattr__(self, "size", (self.size, self.size))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                object.__setattr__(self, name, (value,))
        check_fields(self, prefix="preprocess.")  # types, and the interpolation's Literal values

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"preprocess.{name}={getattr(self, name)!r}: {why}")

        if min(self.size) < 1:
            raise bad("size", "must be a positive integer or [height, width]")
        if not self.mean:
            raise bad("mean", "needs at least one value")
        if len(self.mean) != len(self.std):
            raise bad("std", f"has {len(self.std)} values but mean has {len(self.mean)}")
        if min(self.std) <= 0:
            raise bad("std", "values must be positive")
        if not 0.0 < self.crop_pct <= 1.0:
            raise bad("crop_pct", "must be a number in (0, 1]")

    @property
    def resize_size(self) -> int | tuple[int, int]:
        """The resize before the centre crop: the shorter side for a square input in ``center`` mode (an int,
        as torchvision's ``Resize``), else (height, width); ``floor(size / crop_pct)`` like timm."""
        h, w = self.size
        if h == w and self.crop_mode == "center":
            return math.floor(h / self.crop_pct + 1e-9)
        return math.floor(h / self.crop_pct + 1e-9), math.floor(w / self.crop_pct + 1e-9)

    def for_model(self, size: tuple[int, int], channels: int) -> Preprocessing:
        """This record at a model's input size, with mean/std given per channel of ``channels``.

        A single value is repeated; three values for a one-channel model are averaged (luma input)."""
        mean, std = self.mean, self.std
        if len(mean) != channels:
            if len(mean) == 1:
                mean, std = mean * channels, std * channels
            elif channels == 1:
                mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
            else:
                raise ValueError(f"preprocess: {len(mean)}-channel mean/std for a {channels}-channel model")
        return dataclasses.replace(self, size=tuple(size), mean=mean, std=std)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (lists, not tuples); ``crop_mode`` and ``dataset`` only when set."""
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "") -> Preprocessing:
        """Build from a mapping (also the legacy ``extra["preprocess"]`` dict with ``img_size``) through the
        config engine: an unknown key or a bad value is an error naming ``preprocess.FIELD`` (after
        ``source``, e.g. the config.json, when given)."""
        if isinstance(data, Preprocessing):
            return data
        if isinstance(data, dict):
            data = {_LEGACY_KEYS.get(k, k): v for k, v in data.items()}
            if isinstance(data.get("size"), int) and not isinstance(data["size"], bool):  # `size: 224`
                data["size"] = [data["size"]] * 2
            for name in ("mean", "std"):  # `mean: 0.5`: one value for every channel
                if isinstance(data.get(name), (int, float)) and not isinstance(data[name], bool):
                    data[name] = [data[name]]
        return from_mapping(cls, data, source=source, prefix="preprocess.")


DEFAULT_PREPROCESSING = Preprocessing()
"""For models that record none (random weights, old checkpoints): mean = std = 0.5 (the paper's
[-1, 1] scaling), resize without crop, bilinear."""

KNOWN_SOURCES: dict[str, Preprocessing] = {
    # torchvision's ViT_*_Weights.IMAGENET1K_V1 transforms: resize 256, crop 224, bilinear, ImageNet stats.
    "torchvision": Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=224 / 256, interpolation="bilinear"),
    # Google's vision_transformer / big_vision: pixels scaled to [-1, 1], images resized to the input size.
    "jax": Preprocessing(mean=HALF, std=HALF, crop_pct=1.0, interpolation="bilinear"),
    # transformers' ViTImageProcessor defaults (image_mean = image_std = 0.5, resample bilinear, both sides
    # resized to the input size).
    "huggingface": Preprocessing(mean=HALF, std=HALF, crop_pct=1.0, interpolation="bilinear", crop_mode="squash"),
    # The official T2T-ViT release (models/t2t_vit.py default_cfgs): ImageNet stats, crop 0.9, bicubic.
    "t2t": Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.9, interpolation="bicubic"),
}
"""What a checkpoint format implies when its files state nothing more (keyed by format name)."""
