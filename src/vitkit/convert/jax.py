"""Google's original JAX/Flax checkpoints (``.npz``): the vit_jax layout and big_vision's.

Flax stores Dense kernels as (in, out), the patch-embedding kernel as (P, P, C, D) ("HWIO"), the
attention projections per head ((D, heads, head_dim) for query/key/value, (heads, head_dim, D) for
out), and LayerNorm weights as ``scale``. The head count is therefore part of the file.

The layouts differ in names only:

=====================  ==========================================  ============================
                       vit_jax (``models_vit.py``)                 big_vision (``models/vit.py``)
=====================  ==========================================  ============================
position embedding     ``Transformer/posembed_input/pos_embedding``  ``pos_embedding``
block i                ``Transformer/encoderblock_{i}/``           same, or ``encoderblock/`` with
                                                                   a leading depth axis (scan)
first LayerNorm        ``LayerNorm_0``                             ``LayerNorm_0``
attention              ``MultiHeadDotProductAttention_1``          ``MultiHeadDotProductAttention_0``
second LayerNorm       ``LayerNorm_2``                             ``LayerNorm_1``
MLP                    ``MlpBlock_3/Dense_{0,1}``                  ``MlpBlock_0/Dense_{0,1}``
=====================  ==========================================  ============================

Both have ``embedding``, ``cls`` (class-token models only), ``Transformer/encoder_norm``,
``pre_logits`` (optional) and ``head``. Optimiser checkpoints prefix everything with
``opt/target/`` (vit_jax) or ``params/`` (big_vision).

Hybrids (vit_jax's ``R50+ViT-B_16``, augreg's ``R_Ti_16``, ``R26_S_32``, ...) add a BiT ResNet at the
top level (``conv_root``, ``gn_root``, ``block{i}/unit{j}/{conv,gn}{1,2,3,_proj}``), and ``embedding``
then projects its feature map; :mod:`vitkit.convert.jax_hybrid` maps those keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vitkit.checkpoint import CheckpointError
from vitkit.config import ViTConfig
from vitkit.convert.infer import STEM_ASSUMED, unrecorded_stem_fields
from vitkit.convert.jax_hybrid import hybrid_npz_to_state_dict, is_hybrid_npz, state_dict_to_hybrid_npz
from vitkit.fileio import atomic_path

FORMAT = "jax"
_PREFIXES = ("opt/target/", "params/")


@dataclass(frozen=True)
class Layout:
    name: str
    pos_embed: str
    ln1: str
    attn: str
    ln2: str
    mlp: str


VIT_JAX = Layout("vit_jax", "Transformer/posembed_input/pos_embedding", "LayerNorm_0",
                 "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
BIG_VISION = Layout("big_vision", "pos_embedding", "LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1",
                    "MlpBlock_0")


def matches(keys: set[str]) -> bool:
    return any(k.endswith("embedding/kernel") for k in keys)


def _strip_prefix(arrays: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _PREFIXES:
        if f"{prefix}embedding/kernel" in arrays:
            return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    return arrays


def _layout_of(arrays: dict[str, Tensor], source: str) -> Layout:
    for layout in (VIT_JAX, BIG_VISION):
        if any(k.startswith("Transformer/encoderblock") and f"/{layout.attn}/" in k for k in arrays):
            return layout
    raise CheckpointError(f"{source}: no encoder blocks in a known layout (vit_jax or big_vision)")


class _Reader:
    """Pops arrays by name so that anything left over can be reported."""

    def __init__(self, arrays: dict[str, Tensor], source: str) -> None:
        self.arrays, self.source = dict(arrays), source

    def pop(self, key: str) -> Tensor:
        if key not in self.arrays:
            raise CheckpointError(f"{self.source}: key {key!r} not found")
        return self.arrays.pop(key)

    def has(self, key: str) -> bool:
        return key in self.arrays


def to_vitkit(arrays: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], dict[str, int]]:
    """timm-keyed tensors, plus the head count the attention kernels reveal."""
    arrays = _strip_prefix(arrays)
    layout = _layout_of(arrays, source)
    r = _Reader(arrays, source)
    sd: dict[str, Tensor] = {}
    if is_hybrid_npz(arrays):  # the ResNet and the projection of its feature map
        sd.update(hybrid_npz_to_state_dict(arrays))
        for key in state_dict_to_hybrid_npz(sd):
            r.pop(key)
    else:
        kernel = r.pop("embedding/kernel")
        sd["patch_embed.proj.weight"] = kernel.permute(3, 2, 0, 1)  # HWIO -> OIHW
        sd["patch_embed.proj.bias"] = r.pop("embedding/bias")
    if r.has("cls"):
        sd["cls_token"] = r.pop("cls")
    if not r.has(layout.pos_embed):
        raise CheckpointError(f"{source}: no learned position embedding {layout.pos_embed!r} (fixed sin-cos "
                              "position embeddings are not supported)")
    sd["pos_embed"] = r.pop(layout.pos_embed)

    stacked = any(k.startswith("Transformer/encoderblock/") for k in r.arrays)
    if stacked:  # big_vision with nn.scan: one array per parameter, depth first
        depth = r.arrays[f"Transformer/encoderblock/{layout.ln1}/scale"].shape[0]
        blocks = {k: v for k, v in r.arrays.items() if k.startswith("Transformer/encoderblock/")}
        for k in blocks:
            del r.arrays[k]
        for i in range(depth):
            for k, v in blocks.items():
                r.arrays[k.replace("encoderblock/", f"encoderblock_{i}/")] = v[i]
    depth = sum(1 for k in r.arrays if k.startswith("Transformer/encoderblock_") and k.endswith(f"/{layout.ln1}/scale"))
    num_heads = None
    for i in range(depth):
        p = f"Transformer/encoderblock_{i}"
        b = f"blocks.{i}"
        _layer_norm(r, f"{p}/{layout.ln1}", sd, f"{b}.norm1")
        q = r.pop(f"{p}/{layout.attn}/query/kernel")
        dim, num_heads = q.shape[0], q.shape[1]
        qkv = [q] + [r.pop(f"{p}/{layout.attn}/{n}/kernel") for n in ("key", "value")]
        sd[f"{b}.attn.qkv.weight"] = torch.cat([w.reshape(dim, -1).T for w in qkv])
        if r.has(f"{p}/{layout.attn}/query/bias"):
            sd[f"{b}.attn.qkv.bias"] = torch.cat([r.pop(f"{p}/{layout.attn}/{n}/bias").reshape(-1)
                                                  for n in ("query", "key", "value")])
        out = r.pop(f"{p}/{layout.attn}/out/kernel")
        sd[f"{b}.attn.proj.weight"] = out.reshape(-1, out.shape[-1]).T
        sd[f"{b}.attn.proj.bias"] = r.pop(f"{p}/{layout.attn}/out/bias")
        _layer_norm(r, f"{p}/{layout.ln2}", sd, f"{b}.norm2")
        _dense(r, f"{p}/{layout.mlp}/Dense_0", sd, f"{b}.mlp.fc1")
        _dense(r, f"{p}/{layout.mlp}/Dense_1", sd, f"{b}.mlp.fc2")
    _layer_norm(r, "Transformer/encoder_norm", sd, "norm")
    if r.has("pre_logits/kernel"):
        _dense(r, "pre_logits", sd, "pre_logits.fc")
    if r.has("head/kernel"):
        _dense(r, "head", sd, "head")
    if any(k.startswith("MAPHead") for k in r.arrays):
        raise CheckpointError(f"{source}: attention-pooling (MAP head) models are not supported")
    if r.arrays:
        raise CheckpointError(f"{source}: arrays with no counterpart in vitkit's ViT ({layout.name} layout): "
                              f"{', '.join(sorted(r.arrays)[:10])}")
    return {k: v.contiguous() for k, v in sd.items()}, ({"num_heads": int(num_heads)} if num_heads else {})


def _layer_norm(r: _Reader, prefix: str, sd: dict[str, Tensor], ours: str) -> None:
    sd[f"{ours}.weight"] = r.pop(f"{prefix}/scale")
    sd[f"{ours}.bias"] = r.pop(f"{prefix}/bias")


def _dense(r: _Reader, prefix: str, sd: dict[str, Tensor], ours: str) -> None:
    sd[f"{ours}.weight"] = r.pop(f"{prefix}/kernel").T
    sd[f"{ours}.bias"] = r.pop(f"{prefix}/bias")


# ------------------------------------------------------------------------------------- export
def from_vitkit(state_dict: dict[str, Tensor], config: ViTConfig) -> dict[str, np.ndarray]:
    """Arrays in the vit_jax layout (what ``vit_jax.checkpoint.load`` and timm's npz loader read)."""
    problems = []
    lost = unrecorded_stem_fields(config.stem)
    if lost:
        problems.append(f"the hybrid stem's {lost} (no array holds them; Google's hybrids use {STEM_ASSUMED})")
    if config.fc_norm:
        problems.append("a LayerNorm after pooling (fc_norm)")
    if config.class_token and config.global_pool != "token":
        problems.append("average pooling together with a class token")
    if not config.qkv_bias:
        problems.append("qkv without bias")
    if problems:
        raise ValueError(f"the vit_jax layout cannot represent {', '.join(problems)}")
    sd = {k: v.detach().cpu() for k, v in state_dict.items()}
    dim, heads, head_dim = config.embed_dim, config.num_heads, config.head_dim
    L = VIT_JAX
    if config.stem is None:
        out: dict[str, Tensor] = {"embedding/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0),
                                  "embedding/bias": sd["patch_embed.proj.bias"]}
    else:  # the ResNet and its projection, named as in vit_jax's hybrids
        out = {k: torch.from_numpy(v) for k, v in state_dict_to_hybrid_npz(sd).items()}
    out |= {
        L.pos_embed: sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    if config.class_token:
        out["cls"] = sd["cls_token"]
    for i in range(config.depth):
        p, b = f"Transformer/encoderblock_{i}", f"blocks.{i}"
        out[f"{p}/{L.ln1}/scale"], out[f"{p}/{L.ln1}/bias"] = sd[f"{b}.norm1.weight"], sd[f"{b}.norm1.bias"]
        for name, w, bias in zip(("query", "key", "value"), sd[f"{b}.attn.qkv.weight"].chunk(3),
                                 sd[f"{b}.attn.qkv.bias"].chunk(3)):
            out[f"{p}/{L.attn}/{name}/kernel"] = w.T.reshape(dim, heads, head_dim)
            out[f"{p}/{L.attn}/{name}/bias"] = bias.reshape(heads, head_dim)
        out[f"{p}/{L.attn}/out/kernel"] = sd[f"{b}.attn.proj.weight"].T.reshape(heads, head_dim, dim)
        out[f"{p}/{L.attn}/out/bias"] = sd[f"{b}.attn.proj.bias"]
        out[f"{p}/{L.ln2}/scale"], out[f"{p}/{L.ln2}/bias"] = sd[f"{b}.norm2.weight"], sd[f"{b}.norm2.bias"]
        for j, fc in enumerate(("fc1", "fc2")):
            out[f"{p}/{L.mlp}/Dense_{j}/kernel"] = sd[f"{b}.mlp.{fc}.weight"].T
            out[f"{p}/{L.mlp}/Dense_{j}/bias"] = sd[f"{b}.mlp.{fc}.bias"]
    for ours, theirs in (("pre_logits.fc", "pre_logits"), ("head", "head")):
        if f"{ours}.weight" in sd:
            out[f"{theirs}/kernel"] = sd[f"{ours}.weight"].T
            out[f"{theirs}/bias"] = sd[f"{ours}.bias"]
    return {k: v.contiguous().numpy() for k, v in out.items()}


def write_npz(arrays: dict[str, np.ndarray], path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: numpy adds no suffix
        np.savez(f, **arrays)
    return path
