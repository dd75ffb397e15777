"""Model configuration: one plain dataclass that describes every ViT vitkit can build."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

from vitkit.preprocessing import DEFAULT_PREPROCESSING, KNOWN_SOURCES, Preprocessing

C = TypeVar("C", bound="ModelConfig")
T = TypeVar("T")
Pooling = Literal["token", "avg"]
HeadInit = Literal["xavier", "zeros"]


class ModelConfig:
    """What every model config dataclass shares: JSON round trips, validated ``replace``, image size."""

    img_size: int | tuple[int, int]
    in_chans: int
    num_classes: int
    class_names: Optional[list[str]]
    preprocess: Optional[Preprocessing]

    def _validate_common(self) -> None:
        """Normalise JSON's lists back to tuples, check the class names against the head, and type the
        preprocessing record (also reading the untyped ``extra["preprocess"]`` of older files)."""
        if isinstance(self.img_size, list):
            self.img_size = tuple(self.img_size)
        if self.class_names is not None:
            self.class_names = list(self.class_names)
            if len(self.class_names) != self.num_classes:
                raise ValueError(
                    f"class_names has {len(self.class_names)} entries but num_classes is {self.num_classes}"
                )
        extra = getattr(self, "extra", None)
        if self.preprocess is None and isinstance(extra, dict) and "preprocess" in extra:
            extra = dict(extra)
            self.preprocess = extra.pop("preprocess")
            self.extra = extra
        if self.preprocess is not None:
            record = Preprocessing.from_dict(self.preprocess, source="config: preprocess")
            # the record describes this model's input: its size is the model's own
            self.preprocess = dataclasses.replace(record, size=self.image_hw)

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
        d = dataclasses.asdict(self)
        if isinstance(d["img_size"], tuple):
            d["img_size"] = list(d["img_size"])
        d["preprocess"] = self.preprocess.to_dict() if self.preprocess is not None else None
        return d

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], *, source: str = "config") -> C:
        return from_known_keys(cls, data, f"{source}: {cls.__name__}")

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls: type[C], path: str | Path) -> C:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(data, source=str(path))


def from_known_keys(cls: type[T], data: dict[str, Any], what: str) -> T:
    """``cls(**data)`` for a dataclass; a key it does not have is an error that names the key and lists
    the known ones (``what`` says whose keys they are, e.g. ``"stem"``)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**data)


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
    dynamic_img_size: bool = False
    """Accept any input size divisible by the patch size, resampling position embeddings on the fly."""
    pos_embed_interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    stem: Optional[dict[str, Any]] = None
    """A convolutional backbone whose feature map replaces the patch projection (hybrid ViT)."""
    class_names: Optional[list[str]] = None
    preprocess: Optional[Preprocessing] = None
    """How images are prepared for these weights (see :mod:`vitkit.preprocessing`); None = not recorded."""
    name: Optional[str] = None
    """Registry name the config came from, if any (informational)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata that travels with the checkpoint (source, training run, ...)."""

    def __post_init__(self) -> None:
        self._validate_common()
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if self.head_init not in ("xavier", "zeros"):
            raise ValueError(f"head_init must be 'xavier' or 'zeros', got {self.head_init!r}")
        h, w = self.image_hw
        if self.stem is None and (h % self.patch_size or w % self.patch_size):
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads
