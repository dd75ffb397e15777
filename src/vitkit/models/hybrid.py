"""The hybrid ViT (paper Sec. 3.1, "Hybrid Architecture"): a BiT ResNet's feature map is the patch
sequence.

The patch projection is applied to the CNN's feature map instead of raw pixels, with patch size 1 on
that map (``patch_size`` > 1 groups feature-map pixels, as timm's ``R-Ti`` hybrids do). Class token,
position embeddings and encoder are those of the plain ViT. A hybrid is a :class:`ViTConfig` whose
``stem`` holds a :class:`~vitkit.models.resnet.BiTSpec` as a dict; its key names are timm's
(``patch_embed.backbone.stem.conv.weight``, ``patch_embed.backbone.stages.0.blocks.0.conv1.weight``,
``patch_embed.proj.weight``), so timm's hybrid weights load directly.

This module also maps the hybrid part of Google's ``.npz`` checkpoints (``conv_root``, ``gn_root``,
``block{i}/unit{j}/...``, ``embedding``) to and from those keys.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from vitkit.config import ViTConfig
from vitkit.models.registry import SIZES, register_model
from vitkit.models.resnet import BiTSpec, build_bit_backbone
from vitkit.models.vit import _lecun_normal_


class HybridEmbed(nn.Module):
    """Images -> BiT ResNet feature map -> PxP projection to D -> tokens (B, N, D) and their grid."""

    def __init__(self, in_chans: int, embed_dim: int, spec: BiTSpec, patch_size: int = 1) -> None:
        super().__init__()
        self.backbone = build_bit_backbone(in_chans, spec)
        self.proj = nn.Conv2d(spec.out_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.stride = spec.stride * patch_size
        _lecun_normal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(self.backbone(images))
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class ConvStemEmbed(nn.Module):
    """Images -> a few 3x3 conv-BN-ReLU layers -> 1x1 projection to D -> tokens (B, N, D) and their grid.

    The "convolutional stem" of Xiao et al. 2021 ("Early Convolutions Help Transformers See Better"):
    a handful of small convolutions in place of the PxP patchify, which makes a ViT train faster and
    more robustly, above all on small data. Its stride is the product of the layers' strides (times
    ``patch_size`` of the final projection, usually 1).
    """

    def __init__(self, in_chans: int, embed_dim: int, channels: Sequence[int], strides: Sequence[int],
                 patch_size: int = 1) -> None:
        super().__init__()
        layers = []
        for out_chans, stride in zip(channels, strides):
            layers.append(nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False),
                bn=nn.BatchNorm2d(out_chans),
                act=nn.ReLU(inplace=True),
            )))
            in_chans = out_chans
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.stride = math.prod(strides) * patch_size
        for m in self.stem.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        _lecun_normal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        # Channels-last convolutions are faster on CPU (oneDNN) and GPU alike, and a channels-last
        # (B, D, H, W) map is already the (B, H*W, D) token layout, so the final transpose is free.
        x = self.proj(self.stem(images.contiguous(memory_format=torch.channels_last)))
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


def build_stem(config: ViTConfig) -> nn.Module:
    """The ``patch_embed`` of a hybrid ViT (called by ``vitkit.models.vit.build_patch_embed``).

    ``config.stem.type`` picks the CNN: ``"bit"`` (the default; the paper's BiT ResNet, fields of
    :class:`BiTSpec`) or ``"conv"`` (a conv stem: ``channels`` and ``strides`` of its 3x3 layers).
    """
    stem = config.stem
    h, w = config.image_hw
    if stem.type == "conv":
        channels = list(stem.channels)
        strides = list(stem.strides) if stem.strides is not None else [2] * len(channels)
        stride = math.prod(strides) * config.patch_size
        if h % stride or w % stride:
            raise ValueError(f"img_size {config.img_size} is not divisible by the conv stem's stride {stride}")
        return ConvStemEmbed(config.in_chans, config.embed_dim, channels, strides, config.patch_size)
    spec = BiTSpec.from_dict(stem.bit_fields())
    stride = spec.stride * config.patch_size
    if h % stride or w % stride:
        raise ValueError(f"img_size {config.img_size} is not divisible by the hybrid's stride {stride} "
                         f"(ResNet stride {spec.stride} x patch_size {config.patch_size})")
    return HybridEmbed(config.in_chans, config.embed_dim, spec, config.patch_size)


# ------------------------------------------------------------------------------- Google .npz keys
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


# ------------------------------------------------------------------------------------- registry
_PAPER = {"tiny": "Ti", "small": "S", "base": "B", "large": "L"}
_HYBRIDS = [
    # name, ViT size, ResNet stages, patch size on the feature map, resolutions (timm's set)
    ("vit_tiny_r_s16_p8", "tiny", [], 8, (224, 384)),
    ("vit_small_r26_s32", "small", [2, 2, 2, 2], 1, (224, 384)),
    ("vit_base_r26_s32", "base", [2, 2, 2, 2], 1, (224,)),
    ("vit_base_r50_s16", "base", [3, 4, 9], 1, (224, 384)),
    ("vit_large_r50_s32", "large", [3, 4, 6, 3], 1, (224, 384)),
]
for _name, _size, _layers, _patch, _resolutions in _HYBRIDS:
    _resnet = f"R{2 + 3 * sum(_layers)}" if _layers else "R-root"
    _stride = BiTSpec(layers=_layers).stride * _patch
    for _res in _resolutions:
        register_model(
            f"{_name}_{_res}",
            ViTConfig(img_size=_res, patch_size=_patch, stem={"layers": _layers}, **SIZES[_size]),
            description=f"{_resnet}+ViT-{_PAPER[_size]} hybrid, stride {_stride}, {_res}px, 1000 classes",
        )

# The paper's ImageNet-21k pre-training layout of R50+ViT-B/16 (21,843 classes, representation layer).
register_model(
    "vit_base_r50_s16_224_in21k",
    ViTConfig(img_size=224, patch_size=1, stem={"layers": [3, 4, 9]}, num_classes=21843,
              representation_size=768, **SIZES["base"]),
    description="R50+ViT-B hybrid, ImageNet-21k pre-training layout (with pre-logits)",
)

# A hybrid for 32x32 images: a small BiT ResNet to stride 4 (3x3 stride-1 root without pooling, three
# one-unit stages of 128/256/256 channels), then the encoder of vit_cifar_patch4_32 on its 8x8 grid.
register_model(
    "vit_hybrid_cifar_32",
    ViTConfig(img_size=32, patch_size=1, num_classes=10, embed_dim=192, depth=9, num_heads=12, mlp_dim=384,
              stem={"layers": [1, 1, 1], "widths": [128, 256, 256], "stem_width": 64, "stem_kernel": 3,
                    "stem_stride": 1, "stem_pool": False}),
    description="R+ViT hybrid for 32x32 images (CIFAR): small BiT ResNet to stride 4 + vit_cifar_patch4_32's encoder",
)

# ViTs with a convolutional stem (ViT_C of Xiao et al. 2021): three 3x3 conv-BN-ReLU layers (strides
# 1, 2, 2) give a grid of stride 4, projected 1x1 to the tokens. For CIFAR, the encoder of
# vit_mini_patch4_32, so the two differ only in how images become tokens (the data-regime study's pair);
# with 4 blocks, the CIFAR-10 recipe's model, which trains 1.35x faster and so sees more epochs in an hour.
_CIFAR_CONV_STEM = {"type": "conv", "channels": [32, 64, 128], "strides": [1, 2, 2]}
register_model(
    "vit_convstem_cifar_32",
    ViTConfig(img_size=32, patch_size=1, num_classes=10, embed_dim=128, depth=6, num_heads=2, mlp_dim=256,
              stem=dict(_CIFAR_CONV_STEM)),
    description="ViT with a 3-layer conv stem for 32x32 images (CIFAR): 8x8 tokens, D 128, depth 6",
)
register_model(
    "vit_convstem_cifar_d4_32",
    ViTConfig(img_size=32, patch_size=1, num_classes=10, embed_dim=128, depth=4, num_heads=2, mlp_dim=256,
              stem=dict(_CIFAR_CONV_STEM)),
    description="vit_convstem_cifar_32 with 4 blocks (0.65M params): the CIFAR-10 recipe's model",
)
register_model(
    "vit_convstem_mnist_28",
    ViTConfig(img_size=28, patch_size=1, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=1,
              mlp_dim=128, stem={"type": "conv", "channels": [16, 32, 64], "strides": [1, 2, 2]}),
    description="ViT with a 3-layer conv stem for 28x28 grayscale images (MNIST): 7x7 tokens, D 64, depth 4",
)
