"""timm's ``VisionTransformer``: vitkit uses timm's key names, so conversion is a check, not a rename.

timm's hybrids (``vit_base_r50_s16_384``, ...) are the same class with a ``ResNetV2`` under
``patch_embed.backbone``; :mod:`vitkit.convert.infer` reads the stem's shape from those tensors.

timm features vitkit's ViT does not implement (register tokens, layer scale, ...) are refused by name
instead of being silently dropped. timm removed the representation layer (``pre_logits.fc``) in
0.6; older files that have one are read, but such a model cannot be exported to timm.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from vitkit.checkpoint import CheckpointError
from vitkit.config import ViTConfig
from vitkit.convert.infer import STEM_ASSUMED, unrecorded_stem_fields
from vitkit.models.registry import get_model_config, list_models
from vitkit.preprocessing import Preprocessing

FORMAT = "timm"

UNSUPPORTED: dict[str, str] = {
    ".reg_token": "register tokens",
    ".dist_token": "a distillation token (DeiT)",
    ".head_dist.": "a distillation head (DeiT)",
    ".ls1.": "layer scale",
    ".q_norm.": "QK normalisation",
    ".attn.norm.": "a LayerNorm inside the attention (scale_attn_norm)",
    ".mlp.norm.": "a LayerNorm inside the MLP (scale_mlp_norm)",
    ".attn_pool.": "attention pooling (MAP head)",
    ".norm_pre.": "a pre-encoder LayerNorm (CLIP style)",
    ".patch_embed.norm.": "a normalised patch embedding",
}


def matches(keys: set[str]) -> bool:
    return "patch_embed.proj.weight" in keys


def check_supported(keys: set[str], source: str) -> None:
    """Refuse, by name, checkpoints of timm variants that vitkit's ViT cannot reproduce."""
    for key in sorted(keys):
        for marker, feature in UNSUPPORTED.items():
            if marker in f".{key}":
                raise CheckpointError(f"{source}: key {key!r} belongs to {feature}, which vitkit's ViT does not "
                                      "implement")


def to_vitkit(state_dict: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    check_supported(set(state_dict), source)
    return dict(state_dict)


def from_vitkit(state_dict: dict[str, Tensor], config: ViTConfig) -> dict[str, Tensor]:
    lost = unrecorded_stem_fields(config.stem)
    if lost:
        raise ValueError(f"a timm state dict cannot record this hybrid stem's {lost}: no tensor holds them, and "
                         "timm's hybrids (what reading the file back assumes) use "
                         f"{STEM_ASSUMED}")
    if config.representation_size is not None:
        raise ValueError("timm's VisionTransformer has no representation layer (pre_logits) since timm 0.6; "
                         "drop it with model.reset_head(num_classes)")
    return dict(state_dict)


def hints_from_hub_config(data: dict[str, Any]) -> dict[str, Any]:
    """Fields a timm Hub ``config.json`` (``architecture``, ``num_classes``, ``pretrained_cfg``) states.

    timm's architecture names are vitkit's registry names, so the registry supplies the head count.
    """

    hints: dict[str, Any] = {}
    arch = str(data.get("architecture", "")).split(".")[0]
    if arch in list_models():
        reference = get_model_config(arch)
        hints["num_heads"] = reference.num_heads
    labels = data.get("label_names") or data.get("pretrained_cfg", {}).get("label_names")
    if labels and len(labels) == data.get("num_classes"):
        hints["class_names"] = list(labels)
    return hints


def preprocessing_from_hub_config(data: dict[str, Any], source: str) -> Preprocessing | None:
    """The eval preprocessing a timm Hub ``config.json`` states (``pretrained_cfg``: ``mean``, ``std``,
    ``crop_pct``, ``interpolation``, ``crop_mode``); None when it states no mean/std."""
    cfg = data.get("pretrained_cfg") or {}
    if "mean" not in cfg or "std" not in cfg:
        return None
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        interpolation = "bicubic"  # timm's "random" or "lanczos" have no v2 counterpart here; bicubic is timm's default
    crop_mode = cfg.get("crop_mode") or "center"
    if crop_mode not in ("center", "squash"):  # timm's "border": the longer side resized, then padded
        raise CheckpointError(f"{source}: pretrained_cfg crop_mode={crop_mode!r} is not one vitkit's eval transform "
                              "reproduces (center, squash)")
    try:
        return Preprocessing(mean=cfg["mean"], std=cfg["std"], crop_pct=cfg.get("crop_pct", 0.875),
                             interpolation=interpolation, crop_mode=crop_mode)
    except ValueError as e:
        raise CheckpointError(f"{source}: pretrained_cfg {e}") from None
