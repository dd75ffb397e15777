"""Recover a :class:`ViTConfig` from the tensors of a timm-keyed state dict.

Every format is first renamed to vitkit's (timm's) keys, so this is the one place where shapes are
read back into hyper-parameters. Only the number of heads leaves no trace in the weights (the fused
qkv projection is D x 3D whatever the split); it comes from the caller, the file's metadata, or the
paper's Table 1 for the standard widths.

A hybrid's BiT ResNet (``patch_embed.backbone.*``) gives its stages, widths, root width and kernel
and the input channels; strides, pooling, padding and the norm constants have no parameters, so they
are :data:`STEM_ASSUMED` at the values of timm's and Google's hybrids unless the caller says otherwise.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import Tensor

from vitkit.checkpoint import CheckpointError
from vitkit.config import StemConfig, ViTConfig
from vitkit.models.resnet import BiTSpec

STANDARD_NUM_HEADS: dict[int, int] = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
"""Heads for each width of the paper's family (Ti, S, B, L, H)."""

_BLOCK = re.compile(r"blocks\.(\d+)\.")
_BACKBONE = "patch_embed.backbone."
_ROOT_KEY = re.compile(r"conv\.weight|norm\.(weight|bias)")
_UNIT_KEY = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.(conv[123]\.weight|norm[123]\.(weight|bias)|"
                       r"downsample\.(conv\.weight|norm\.(weight|bias)))")

STEM_ASSUMED: dict[str, Any] = {name: getattr(BiTSpec(), name) for name in
                                ("stem_stride", "stem_pool", "same_padding", "gn_groups", "gn_eps", "ws_eps")}
"""BiT stem fields no tensor records, at the values of timm's and Google's hybrids (stride-2 root, 3x3/2
max pooling, TF 'SAME' padding, GroupNorm(32, eps 1e-5), weight standardisation eps 1e-8)."""


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
        raise CheckpointError(f"{source}: key {key!r} not found; this does not look like a ViT checkpoint")
    return state_dict[key]


def infer_stem(state_dict: dict[str, Tensor], *, source: str,
               stated: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The ``ViTConfig.stem`` of a hybrid's ``patch_embed.backbone.*`` tensors (None for a plain ViT).

    ``stated`` gives the :data:`STEM_ASSUMED` fields the weights cannot tell (e.g. a stride-1 root for
    small images); any other field it names must agree with the weights.
    """
    keys = sorted(k[len(_BACKBONE):] for k in state_dict if k.startswith(_BACKBONE))
    if not keys:
        return None
    root = _root_prefix(state_dict).removeprefix(_BACKBONE)
    units: dict[int, set[int]] = {}
    for key in keys:
        if root and (m := _UNIT_KEY.fullmatch(key)):
            units.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        elif not (key.startswith(root) and _ROOT_KEY.fullmatch(key[len(root):])):
            raise CheckpointError(f"{source}: key {_BACKBONE + key!r} does not belong to a BiT ResNet stem (timm's "
                                  "ResNetV2 with GroupNorm and weight-standardised convolutions, preact=False), the "
                                  "only CNN stem vitkit's hybrid ViT implements")
    if sorted(units) != list(range(len(units))) or any(sorted(u) != list(range(len(u))) for u in units.values()):
        numbering = {s: sorted(u) for s, u in sorted(units.items())}
        raise CheckpointError(f"{source}: hybrid stem stages and units {numbering} are not numbered 0..n-1")
    root_conv = _require(state_dict, f"{_root_prefix(state_dict)}conv.weight", source)
    stated = dict(stated or {})
    stem = {k: v for k, v in stated.items() if k in STEM_ASSUMED}
    stem.update(
        layers=[len(units[s]) for s in range(len(units))],
        widths=[_require(state_dict, f"{_BACKBONE}stages.{s}.blocks.0.conv3.weight", source).shape[0]
                for s in range(len(units))],
        stem_width=root_conv.shape[0], stem_kernel=root_conv.shape[-1],
    )
    try:
        found = compact_stem(BiTSpec.from_dict(stem))
        agrees = BiTSpec.from_dict({**found, **stated}) == BiTSpec.from_dict(found)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e
    if not agrees:
        raise CheckpointError(f"{source}: stem {stated} disagrees with the weights, whose stem is {found}")
    return found


def _root_prefix(state_dict: dict[str, Tensor]) -> str:
    """Where a hybrid's root block sits: under ``stem.`` in a full BiT ResNet, directly under the backbone
    in timm's root-only (R-Ti) hybrids."""
    full = any(k.startswith((f"{_BACKBONE}stem.", f"{_BACKBONE}stages.")) for k in state_dict)
    return f"{_BACKBONE}stem." if full else _BACKBONE


def compact_stem(spec: BiTSpec) -> dict[str, Any]:
    """``spec`` as a ``ViTConfig.stem`` dict: ``layers`` and whatever differs from the defaults."""
    default = BiTSpec(layers=spec.layers)
    stem: dict[str, Any] = {"layers": list(spec.layers)}
    for f in dataclasses.fields(BiTSpec):
        value = getattr(spec, f.name)
        if f.name != "layers" and value != getattr(default, f.name):
            stem[f.name] = list(value) if isinstance(value, tuple) else value
    return stem


def unrecorded_stem_fields(stem: StemConfig | dict[str, Any] | None) -> dict[str, Any]:
    """The fields of a ``ViTConfig.stem`` that a weights-only file (timm state dict, Google .npz) would lose:
    those that differ from :data:`STEM_ASSUMED`, which is what reading the file back assumes."""
    spec = stem_spec(stem)
    if spec is None:
        return {}
    if not isinstance(spec, BiTSpec):
        return {"type": spec["type"]}  # a conv stem: timm's and Google's files know BiT ResNets only
    return {k: getattr(spec, k) for k, v in STEM_ASSUMED.items() if getattr(spec, k) != v}


def stem_spec(stem: StemConfig | dict[str, Any] | None) -> BiTSpec | dict[str, Any] | None:
    """The normalised form of a ``ViTConfig.stem`` dict, for comparing two of them (a BiT stem as a
    :class:`BiTSpec`; another type, such as a conv stem, as given)."""
    if stem is None:
        return None
    stem = stem.to_dict() if hasattr(stem, "to_dict") else dict(stem)
    if stem.get("type", "bit") != "bit":
        return stem
    stem.pop("type", None)
    return BiTSpec.from_dict(stem)


def infer_config(state_dict: dict[str, Tensor], *, source: str, **known: Any) -> ViTConfig:
    """The config whose model has exactly these tensors. ``known`` holds fields stated elsewhere (the
    file's metadata, e.g. a Hugging Face config's ``norm_eps``, or the caller's ``num_heads``); those the
    weights also determine are checked against them."""
    proj = _require(state_dict, "patch_embed.proj.weight", source)
    if proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise CheckpointError(f"{source}: patch_embed.proj.weight {tuple(proj.shape)} is not a square patch "
                              "projection (embed_dim, channels, P, P)")
    embed_dim, in_chans, patch_size = proj.shape[0], proj.shape[1], proj.shape[-1]
    stride = patch_size
    stem = infer_stem(state_dict, source=source, stated=known.pop("stem", None))
    if stem is not None:  # the projection reads the ResNet's feature map; the images enter its root conv
        spec = BiTSpec.from_dict(stem)
        root = _require(state_dict, f"{_root_prefix(state_dict)}conv.weight", source)
        if in_chans != spec.out_channels:
            raise CheckpointError(f"{source}: patch_embed.proj.weight {tuple(proj.shape)} reads {in_chans} channels "
                                  f"but the hybrid stem outputs {spec.out_channels}")
        in_chans, stride = root.shape[1], spec.stride * patch_size
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
        img_size = side * stride
    else:
        height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
        if (height // stride) * (width // stride) != num_patches:
            raise CheckpointError(f"{source}: image size {img_size} with patch stride {stride} needs "
                                  f"{(height // stride) * (width // stride)} positions, but pos_embed "
                                  f"{tuple(pos_embed.shape)} holds {num_patches}")
    head = state_dict.get("head.weight")
    pre_logits = state_dict.get("pre_logits.fc.weight")
    from_weights: dict[str, Any] = dict(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
        mlp_dim=_require(state_dict, "blocks.0.mlp.fc1.weight", source).shape[0],
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        class_token=class_token, fc_norm=fc_norm,
        representation_size=None if pre_logits is None else pre_logits.shape[0],
        num_classes=0 if head is None else head.shape[0], stem=stem,
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
