"""Recover a :class:`ViTConfig` from the tensors of a timm-keyed state dict.

Every format is first renamed to vitkit's (timm's) keys, so this is the one place where shapes are
read back into hyper-parameters. Only the number of heads leaves no trace in the weights (the fused
qkv projection is D x 3D whatever the split); it comes from the caller, the file's metadata, or the
paper's Table 1 for the standard widths.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from vitkit.checkpoint import CheckpointError
from vitkit.config import ViTConfig

STANDARD_NUM_HEADS: dict[int, int] = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
"""Heads for each width of the paper's family (Ti, S, B, L, H)."""

_BLOCK = re.compile(r"blocks\.(\d+)\.")


def resolve_num_heads(embed_dim: int, num_heads: int | None, source: str) -> int:
    if num_heads is not None:
        return int(num_heads)
    if embed_dim in STANDARD_NUM_HEADS:
        return STANDARD_NUM_HEADS[embed_dim]
    raise CheckpointError(
        f"{source}: the number of attention heads cannot be read from the weights and width {embed_dim} is "
        f"not a standard ViT width ({', '.join(map(str, STANDARD_NUM_HEADS))}); pass num_heads= (CLI: --num-heads)"
    )


def _require(state_dict: dict[str, Tensor], key: str, source: str) -> Tensor:
    if key not in state_dict:
        raise CheckpointError(f"{source}: key {key!r} not found; this does not look like a plain ViT checkpoint")
    return state_dict[key]


def infer_config(state_dict: dict[str, Tensor], *, source: str, **known: Any) -> ViTConfig:
    """The config whose model has exactly these tensors. ``known`` holds fields stated elsewhere (the
    file's metadata, e.g. a Hugging Face config's ``norm_eps``, or the caller's ``num_heads``); those the
    weights also determine are checked against them."""
    proj = _require(state_dict, "patch_embed.proj.weight", source)
    if proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise CheckpointError(f"{source}: patch_embed.proj.weight {tuple(proj.shape)} is not a square patch "
                              "projection (embed_dim, channels, P, P)")
    embed_dim, in_chans, patch_size = proj.shape[0], proj.shape[1], proj.shape[-1]
    depths = {int(m.group(1)) for key in state_dict if (m := _BLOCK.match(key))}
    depth = max(depths) + 1 if depths else 0
    if depths != set(range(depth)) or depth == 0:
        raise CheckpointError(f"{source}: encoder blocks {sorted(depths)} are not numbered 0..depth-1")
    class_token = "cls_token" in state_dict
    fc_norm = "fc_norm.weight" in state_dict
    pos_embed = _require(state_dict, "pos_embed", source)
    num_patches = pos_embed.shape[1] - int(class_token)
    img_size = known.pop("img_size", None)
    if img_size is None:
        side = round(num_patches ** 0.5)
        if side * side != num_patches:
            raise CheckpointError(f"{source}: pos_embed {tuple(pos_embed.shape)} holds {num_patches} patch positions, "
                                  "not a square grid; pass img_size= as (height, width)")
        img_size = side * patch_size
    else:
        height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
        if (height // patch_size) * (width // patch_size) != num_patches:
            raise CheckpointError(f"{source}: image size {img_size} with patch size {patch_size} needs "
                                  f"{(height // patch_size) * (width // patch_size)} positions, but pos_embed "
                                  f"{tuple(pos_embed.shape)} holds {num_patches}")
    head = state_dict.get("head.weight")
    pre_logits = state_dict.get("pre_logits.fc.weight")
    from_weights: dict[str, Any] = dict(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
        mlp_dim=_require(state_dict, "blocks.0.mlp.fc1.weight", source).shape[0],
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        class_token=class_token, fc_norm=fc_norm,
        representation_size=None if pre_logits is None else pre_logits.shape[0],
        num_classes=0 if head is None else head.shape[0],
    )
    conflicts = [f"{k}={known[k]!r} but the weights say {v!r}" for k, v in from_weights.items()
                 if k in known and known[k] != v]
    if conflicts:
        raise CheckpointError(f"{source}: metadata disagrees with the weights: {'; '.join(conflicts)}")
    heads = known.pop("num_heads", None)
    fields = {
        "global_pool": "token" if class_token and not fc_norm else "avg",  # a guess only for cls + avg models
        **known, **from_weights,
        "num_heads": resolve_num_heads(embed_dim, heads, source),
    }
    try:
        return ViTConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from e
