"""Model configuration: one plain dataclass that describes every ViT vitkit can build."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

from vitkit.config_engine import OMIT_DEFAULT, check_fields, from_mapping, to_plain
from vitkit.fileio import read_json_object
from vitkit.preprocessing import DEFAULT_PREPROCESSING, KNOWN_SOURCES, Preprocessing

C = TypeVar("C", bound="ModelConfig")
Pooling = Literal["token", "avg", "max", "avgmax", "map", ""]
"""timm's global_pool values: class token, mean / max / their average over the patch tokens, multihead attention
pooling, or none (all tokens)."""
HeadInit = Literal["xavier", "zeros"]
StemType = Literal["bit", "conv"]

_BIT_FIELDS = ("layers", "widths", "stem_width", "stem_kernel", "stem_stride", "stem_pool", "same_padding",
               "gn_groups", "gn_eps", "ws_eps")
_CONV_FIELDS = ("channels", "strides", "downsample", "act")


@dataclass(frozen=True)
class StemConfig:
    """The CNN in front of a hybrid ViT's patch projection (``ViTConfig.stem``).

    ``type="bit"`` (the paper's hybrids): a BiT ResNet, with the fields of
    :class:`vitkit.models.resnet.BiTSpec` (``layers`` per stage, ``widths``, ``stem_width`` ...).
    ``type="conv"`` (ViT_C, Xiao et al. 2021): 3x3 conv-BN-ReLU layers with ``channels`` and ``strides``
    (default 2 each). A field left unset (None) takes the CNN's default, and is not written: the section
    reads and writes the same compact mapping as ever, e.g. ``{"layers": [3, 4, 9]}`` or
    ``{"type": "conv", "channels": [32, 64, 128], "strides": [1, 2, 2]}``.
    """

    type: StemType = field(default="bit", metadata=OMIT_DEFAULT)
    layers: Optional[tuple[int, ...]] = field(default=None, metadata=OMIT_DEFAULT)
    """BiT: residual units per stage (default 3, 4, 9: R50's first three stages)."""
    widths: Optional[tuple[int, ...]] = field(default=None, metadata=OMIT_DEFAULT)
    stem_width: Optional[int] = field(default=None, metadata=OMIT_DEFAULT)
    stem_kernel: Optional[int] = field(default=None, metadata=OMIT_DEFAULT)
    stem_stride: Optional[int] = field(default=None, metadata=OMIT_DEFAULT)
    stem_pool: Optional[bool] = field(default=None, metadata=OMIT_DEFAULT)
    same_padding: Optional[bool] = field(default=None, metadata=OMIT_DEFAULT)
    gn_groups: Optional[int] = field(default=None, metadata=OMIT_DEFAULT)
    gn_eps: Optional[float] = field(default=None, metadata=OMIT_DEFAULT)
    ws_eps: Optional[float] = field(default=None, metadata=OMIT_DEFAULT)
    channels: Optional[tuple[int, ...]] = field(default=None, metadata=OMIT_DEFAULT)
    """conv: output channels of each 3x3 layer."""
    strides: Optional[tuple[int, ...]] = field(default=None, metadata=OMIT_DEFAULT)
    """conv: stride of each layer (default 2 each)."""
    downsample: Optional[Literal["stride", "maxpool"]] = field(default=None, metadata=OMIT_DEFAULT)
    """conv: how a layer of stride s shrinks the map: a strided convolution (the default, ViT_C's), or a
    stride-1 convolution followed by an s x s max-pool (airbench's conv -> pool -> BN -> activation)."""
    act: Optional[Literal["relu", "gelu"]] = field(default=None, metadata=OMIT_DEFAULT)
    """conv: the activation after each batch norm (default ReLU)."""

    def __post_init__(self) -> None:
        check_fields(self, prefix="stem.")
        given = {name for name, value in self.to_dict().items() if name != "type"}
        own = set(_CONV_FIELDS if self.type == "conv" else _BIT_FIELDS)
        foreign = sorted(given - own)
        if foreign:
            raise ValueError(f"stem.{foreign[0]} does not apply to a {self.type!r} stem, which takes: "
                             f"{', '.join(sorted(own))}")
        if self.type == "conv":
            if not self.channels:
                raise ValueError("stem.channels: a conv stem needs the channels of its layers")
            if self.strides is not None and len(self.strides) != len(self.channels):
                raise ValueError(f"stem: {len(self.channels)} 'channels' but {len(self.strides)} 'strides'")
        for name in ("layers", "widths", "channels", "strides"):
            values = getattr(self, name) or ()
            if any(v < 1 for v in values):
                raise ValueError(f"stem.{name} must be positive integers, got {list(values)}")
        for name in ("stem_width", "stem_kernel", "stem_stride", "gn_groups"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"stem.{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        """The compact mapping: the fields that are set, ``type`` only when it is not ``bit``."""
        return to_plain(self)

    def bit_fields(self) -> dict[str, Any]:
        """The BiT ResNet fields that are set (for ``BiTSpec.from_dict``)."""
        return {k: v for k, v in self.to_dict().items() if k in _BIT_FIELDS}

    def replace(self, **changes: Any) -> StemConfig:
        return dataclasses.replace(self, **changes)


class ModelConfig:
    """What every model config dataclass shares: JSON round trips, validated ``replace``, image size."""

    img_size: int | tuple[int, int]
    in_chans: int
    num_classes: int
    class_names: Optional[list[str]]
    preprocess: Optional[Preprocessing]

    def _validate_common(self) -> None:
        """Type the preprocessing record (also reading the untyped ``extra["preprocess"]`` of older files),
        check every field against its type (the config engine; JSON's lists become tuples), the sizes every
        model has, and the class names against the head."""
        extra = getattr(self, "extra", None)
        if self.preprocess is None and isinstance(extra, dict) and "preprocess" in extra:
            extra = dict(extra)
            self.preprocess = extra.pop("preprocess")
            self.extra = extra
        if self.preprocess is not None and not isinstance(self.preprocess, Preprocessing):
            self.preprocess = Preprocessing.from_dict(self.preprocess)
        check_fields(self)
        for name in ("in_chans",):
            _at_least(self, name, 1)
        _at_least(self, "num_classes", 0)
        if min(self.image_hw) < 1:
            raise ValueError(f"img_size must be positive, got {self.img_size}")
        if self.class_names is not None:
            if len(self.class_names) != self.num_classes:
                raise ValueError(
                    f"class_names has {len(self.class_names)} entries but num_classes is {self.num_classes}"
                )
        if self.preprocess is not None:  # the record describes this model's input: its size is the model's own
            self.preprocess = dataclasses.replace(self.preprocess, size=self.image_hw)

    def preprocessing(self) -> Preprocessing:
        """How to prepare images for this model: its recorded preprocessing, else what its checkpoint
        format implies (``extra["converted_from"]``), else :data:`DEFAULT_PREPROCESSING`; at the model's
        input size, with one mean/std value per input channel."""
        record = self.preprocess
        if record is None:
            converted_from = (getattr(self, "extra", None) or {}).get("converted_from")
            record = KNOWN_SOURCES.get(converted_from, DEFAULT_PREPROCESSING)
        return record.for_model(self.image_hw, self.in_chans)

    @property
    def image_hw(self) -> tuple[int, int]:
        size = self.img_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed; unknown field names raise a clear error."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown {type(self).__name__} field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; a section (stem, preprocessing) in its own compact form."""
        return to_plain(self)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], *, source: str = "config") -> C:
        """Build from a mapping (a ``config.json``): every value checked against its field's type, every
        error one line naming ``source`` and the field."""
        if isinstance(data, dict) and isinstance(data.get("preprocess"), dict):  # the record reads its own keys
            data = {**data, "preprocess": Preprocessing.from_dict(data["preprocess"], source=source)}
        return from_mapping(cls, data, source=source)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls: type[C], path: str | Path) -> C:
        return cls.from_dict(read_json_object(path, what="a JSON object of config fields"), source=str(path))


def _at_least(config: Any, name: str, low: int) -> None:
    value = getattr(config, name)
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


@dataclass
class ViTConfig(ModelConfig):
    """Hyper-parameters of a Vision Transformer.

    Field names follow the paper (Table 1: hidden size D = ``embed_dim``, layers = ``depth``,
    MLP size = ``mlp_dim``, heads = ``num_heads``) and timm where the paper is silent.
    """

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    class_token: bool = True
    global_pool: Pooling = "token"
    fc_norm: bool = False
    """Apply the final LayerNorm after pooling instead of before (timm/MAE style)."""
    representation_size: Optional[int] = None
    """Width of the pre-logits Dense+tanh layer used in the paper's pre-training, or None."""
    drop_rate: float = 0.0
    """Dropout after the position embedding, in the MLPs and before the head."""
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    head_init: HeadInit = "xavier"
    head_batchnorm: bool = False
    """MAE's linear-probe head: a BatchNorm1d without affine parameters (eps 1e-6) before the linear layer,
    keys ``head.0.*`` (running statistics) and ``head.1.*`` as the official ``main_linprobe.py``."""
    dynamic_img_size: bool = False
    """Accept any input size divisible by the patch size, resampling position embeddings on the fly."""
    pos_embed_interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    stem: Optional[StemConfig] = None
    """A convolutional backbone whose feature map replaces the patch projection (hybrid ViT); a mapping
    of :class:`StemConfig` fields is read as one."""
    class_names: Optional[list[str]] = None
    preprocess: Optional[Preprocessing] = None
    """How images are prepared for these weights (see :mod:`vitkit.preprocessing`); None = not recorded."""
    name: Optional[str] = None
    """Registry name the config came from, if any (informational)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata that travels with the checkpoint (source, training run, ...)."""

    def __post_init__(self) -> None:
        self._validate_common()
        for name in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_dim"):
            _at_least(self, name, 1)
        if self.representation_size is not None:
            _at_least(self, "representation_size", 1)
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        h, w = self.image_hw
        if self.stem is None and (h % self.patch_size or w % self.patch_size):
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def qk_scale(self) -> None:
        """The attention scale: None, i.e. head_dim ** -0.5 as in the paper (T2T-ViT's config can set one)."""
        return None
