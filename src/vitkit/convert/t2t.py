"""The official T2T-ViT release (github.com/yitu-opensource/T2T-ViT): ``.pth.tar`` training checkpoints.

vitkit's :class:`~vitkit.models.t2t.T2TViT` uses the official key names, so conversion is a check, not a
rename. A release file is a timm training checkpoint: ``state_dict`` and/or ``state_dict_ema`` (keys with
or without DataParallel's ``module.`` prefix), plus the optimizer and the run's ``argparse.Namespace``.
As the official evaluation does (``main.py --eval_checkpoint``, where ``--model-ema`` defaults to on),
the EMA weights are read when the file holds them.

The shapes record everything but the head count, the soft splits' strides and paddings, and the
attention scale: those come from the official model of the same width and depth (the registry), or
from the ``model`` the caller names. ``qk_scale`` stays None (head_dim ** -0.5), as in the official
evaluation, which builds the models with ``pretrained=False``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from vitkit.checkpoint import CheckpointError
from vitkit.models.registry import get_model_config, list_models
from vitkit.models.t2t import T2TConfig

FORMAT = "t2t"
PREFERS_EMA = True


def matches(keys: set[str]) -> bool:
    return "tokens_to_token.project.weight" in keys


def to_vitkit(state_dict: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    if not matches(set(state_dict)):
        raise CheckpointError(f"{source}: not a T2T-ViT checkpoint (no 'tokens_to_token.project.weight')")
    return dict(state_dict)


def from_vitkit(state_dict: dict[str, Tensor], config: Any) -> dict[str, Tensor]:
    if not isinstance(config, T2TConfig):
        raise ValueError("only T2T-ViT models can be written in the official T2T-ViT format")
    return dict(state_dict)


def _official_heads(tokens_type: str, embed_dim: int, depth: int) -> int | None:
    for name in list_models("t2t_vit_*"):
        ref = get_model_config(name)
        if (ref.tokens_type, ref.embed_dim, ref.depth, ref.image_hw) == (tokens_type, embed_dim, depth, (224, 224)):
            return ref.num_heads
    return None


def infer_config(state_dict: dict[str, Tensor], *, source: str, num_heads: int | None = None,
                 reference: T2TConfig | None = None) -> T2TConfig:
    """The :class:`T2TConfig` a T2T-ViT state dict was trained with.

    ``reference`` (a registry model or config) supplies what no tensor records (strides, paddings,
    heads, scale); without it, the official soft splits (7/4/2, 3/2/1, 3/2/1) are assumed.
    """
    keys = set(state_dict)
    prefix = "tokens_to_token.attention1."
    performer = f"{prefix}kqv.weight" in keys
    qkv = state_dict[f"{prefix}{'kqv' if performer else 'attn.qkv'}.weight"]
    token_dim, first_dim = qkv.shape[0] // 3, qkv.shape[1]
    project = state_dict["tokens_to_token.project.weight"]
    embed_dim = project.shape[0]
    depth = len({k.split(".")[1] for k in keys if k.startswith("blocks.")})
    hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * embed_dim
    base = reference or T2TConfig()
    k0, k1, k2 = base.kernel_sizes
    second_dim = state_dict["tokens_to_token.attention2." + ("kqv" if performer else "attn.qkv") + ".weight"].shape[1]
    k1 = round((second_dim / token_dim) ** 0.5)
    k2 = round((project.shape[1] / token_dim) ** 0.5)
    in_chans = first_dim // (k0 * k0)
    if in_chans * k0 * k0 != first_dim:
        raise CheckpointError(f"{source}: the first soft split takes {first_dim} values per token, not a multiple "
                              f"of its {k0}x{k0} window; name the model it belongs to (model=...)")
    tokens_type = "performer" if performer else "transformer"
    heads = num_heads or (reference.num_heads if reference else None) or _official_heads(tokens_type, embed_dim, depth)
    if heads is None:
        raise CheckpointError(f"{source}: a T2T-ViT of width {embed_dim} and depth {depth} is not an official "
                              "model, and no tensor records its head count: pass num_heads (--num-heads)")
    changes: dict[str, Any] = dict(
        in_chans=in_chans, tokens_type=tokens_type, token_dim=token_dim, kernel_sizes=(k0, k1, k2),
        embed_dim=embed_dim, depth=depth, num_heads=heads, mlp_ratio=hidden / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in keys,
        num_classes=state_dict["head.weight"].shape[0] if "head.weight" in keys else 0, class_names=None,
    )
    if performer:
        changes["kernel_ratio"] = state_dict[f"{prefix}w"].shape[0] / token_dim
    if reference is None:
        changes["img_size"] = _img_size(state_dict, base, source)
    return base.replace(**changes)


def _img_size(state_dict: dict[str, Tensor], base: T2TConfig, source: str) -> int:
    """The training resolution, from the length of the position table (official splits: stride 16)."""
    tokens = state_dict["pos_embed"].shape[1] - 1
    side = round(tokens ** 0.5)
    stride = base.strides[0] * base.strides[1] * base.strides[2]
    if side * side != tokens:
        raise CheckpointError(f"{source}: pos_embed holds {tokens} tokens, not a square grid; pass img_size")
    return side * stride
