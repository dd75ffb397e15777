"""The hybrid part of Google's ``.npz`` checkpoints (vit_jax's ``R50+ViT-B_16``, augreg's ``R_Ti_16``,
``R26_S_32``, ...): ``conv_root``, ``gn_root``, ``block{i}/unit{j}/{conv,gn}{1,2,3,_proj}`` and the
feature-map projection ``embedding``, mapped to and from timm's keys of :class:`vitkit.models.hybrid.HybridEmbed`
(``patch_embed.backbone.stem.conv.weight``, ``patch_embed.backbone.stages.0.blocks.0.conv1.weight``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

_BACKBONE = "patch_embed.backbone."
_UNIT = re.compile(r"^block(\d+)/unit(\d+)/(conv[123]|gn[123]|conv_proj|gn_proj)/(kernel|scale|bias)$")
_PARTS = {"conv1": "conv1", "conv2": "conv2", "conv3": "conv3", "gn1": "norm1", "gn2": "norm2",
          "gn3": "norm3", "conv_proj": "downsample.conv", "gn_proj": "downsample.norm"}
_ROOT = {"conv_root": "conv", "gn_root": "norm"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _npz_key_to_torch(key: str, stem_only: bool) -> str | None:
    """The timm key of one hybrid ``.npz`` key, or None if the key is not part of the hybrid embedding."""
    root = "" if stem_only else "stem."
    module, _, leaf = key.rpartition("/")
    if module in _ROOT and leaf in _LEAF:
        return f"{_BACKBONE}{root}{_ROOT[module]}.{_LEAF[leaf]}"
    if module == "embedding" and leaf in ("kernel", "bias"):
        return f"patch_embed.proj.{_LEAF[leaf]}"
    m = _UNIT.match(key)
    if m:
        stage, unit, part, leaf = int(m[1]) - 1, int(m[2]) - 1, m[3], m[4]
        return f"{_BACKBONE}stages.{stage}.blocks.{unit}.{_PARTS[part]}.{_LEAF[leaf]}"
    return None


def is_hybrid_npz(npz: Mapping[str, np.ndarray]) -> bool:
    """Whether a (prefix-stripped) Google checkpoint holds a hybrid's ResNet."""
    return "conv_root/kernel" in npz


def hybrid_npz_to_state_dict(npz: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
    """Map the hybrid part of a Google ViT ``.npz`` (keys without an ``opt/target/`` prefix) to timm keys.

    Converts ``conv_root``, ``gn_root``, ``block{i}/unit{j}/{conv,gn}{1,2,3,_proj}`` and the
    feature-map projection ``embedding``; Flax's HWIO kernels become OIHW. Keys of the transformer
    (``Transformer/...``, ``cls``, ``head``) are left to the plain-ViT converter.
    """
    if not is_hybrid_npz(npz):
        raise KeyError("not a hybrid ViT checkpoint: it has no 'conv_root/kernel'")
    stem_only = not any(k.startswith("block1/") for k in npz)
    state_dict = {}
    for key, value in npz.items():
        name = _npz_key_to_torch(key, stem_only)
        if name is None:
            continue
        array = np.asarray(value)
        if array.ndim == 4:
            array = array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        state_dict[name] = torch.from_numpy(np.ascontiguousarray(array))
    return state_dict


def state_dict_to_hybrid_npz(state_dict: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """The inverse of :func:`hybrid_npz_to_state_dict`: the ``patch_embed.*`` tensors of a hybrid in
    Google's ``.npz`` layout (the transformer's keys are left to the plain-ViT converter)."""
    inverse = {}
    for key in state_dict:
        if not key.startswith("patch_embed."):
            continue
        npz_key = _torch_key_to_npz(key)
        if npz_key is None:
            raise KeyError(f"{key}: no hybrid .npz equivalent")
        array = state_dict[key].detach().cpu().float().numpy()
        if array.ndim == 4:
            array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        inverse[npz_key] = np.ascontiguousarray(array)
    return inverse


def _torch_key_to_npz(key: str) -> str | None:
    if key.startswith("patch_embed.proj."):
        return f"embedding/{'kernel' if key.endswith('weight') else 'bias'}"
    rest = key.removeprefix(_BACKBONE).removeprefix("stem.")
    module, _, leaf = rest.rpartition(".")
    for npz_name, torch_name in _ROOT.items():
        if module == torch_name:
            return f"{npz_name}/{_npz_leaf(npz_name, leaf)}"
    m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$", module)
    if m:
        part = {v: k for k, v in _PARTS.items()}.get(m[3])
        if part is not None:
            return f"block{int(m[1]) + 1}/unit{int(m[2]) + 1}/{part}/{_npz_leaf(part, leaf)}"
    return None


def _npz_leaf(module: str, leaf: str) -> str:
    if leaf == "bias":
        return "bias"
    return "kernel" if module.startswith("conv") else "scale"
