"""The hybrid ViT (paper Sec. 3.1, "Hybrid Architecture"): a BiT ResNet's feature map is the patch
sequence.

The patch projection is applied to the CNN's feature map instead of raw pixels, with patch size 1 on
that map (``patch_size`` > 1 groups feature-map pixels, as timm's ``R-Ti`` hybrids do). Class token,
position embeddings and encoder are those of the plain ViT. A hybrid is a :class:`ViTConfig` whose
``stem`` holds a :class:`~vitkit.models.resnet.BiTSpec` as a dict; its key names are timm's
(``patch_embed.backbone.stem.conv.weight``, ``patch_embed.backbone.stages.0.blocks.0.conv1.weight``,
``patch_embed.proj.weight``), so timm's hybrid weights load directly.

The named hybrids are registered in :mod:`vitkit.models.zoo`; the key maps of Google's ``.npz`` hybrids
are in :mod:`vitkit.convert.jax_hybrid`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from vitkit.config import ViTConfig
from vitkit.models.init import lecun_normal_
from vitkit.models.resnet import BiTSpec, build_bit_backbone


class HybridEmbed(nn.Module):
    """Images -> BiT ResNet feature map -> PxP projection to D -> tokens (B, N, D) and their grid."""

    def __init__(self, in_chans: int, embed_dim: int, spec: BiTSpec, patch_size: int = 1) -> None:
        super().__init__()
        self.backbone = build_bit_backbone(in_chans, spec)
        self.proj = nn.Conv2d(spec.out_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.stride = spec.stride * patch_size
        lecun_normal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(self.backbone(images))
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class ConvStemEmbed(nn.Module):
    """Images -> a few 3x3 conv-BN-activation layers -> 1x1 projection to D -> tokens (B, N, D) and their grid.

    The "convolutional stem" of Xiao et al. 2021 ("Early Convolutions Help Transformers See Better"):
    a handful of small convolutions in place of the PxP patchify, which makes a ViT train faster and
    more robustly, above all on small data. Its stride is the product of the layers' strides (times
    ``patch_size`` of the final projection, usually 1). A layer downsamples either by its stride (ViT_C)
    or, with ``downsample="maxpool"``, by a max-pool between its convolution and its norm, the order of
    airbench's conv blocks (Jordan 2024), which keeps the 3x3 filters at the finer resolution.
    """

    def __init__(self, in_chans: int, embed_dim: int, channels: Sequence[int], strides: Sequence[int],
                 patch_size: int = 1, downsample: str = "stride", act: str = "relu") -> None:
        super().__init__()
        if downsample not in ("stride", "maxpool"):
            raise ValueError(f"stem.downsample must be 'stride' or 'maxpool', got {downsample!r}")
        activations = {"relu": partial(nn.ReLU, inplace=True), "gelu": nn.GELU}
        if act not in activations:
            raise ValueError(f"stem.act must be one of {sorted(activations)}, got {act!r}")
        layers = []
        for out_chans, stride in zip(channels, strides):
            pooled = downsample == "maxpool" and stride > 1
            layer = OrderedDict(conv=nn.Conv2d(in_chans, out_chans, 3, stride=1 if pooled else stride,
                                               padding=1, bias=False))
            if pooled:
                layer["pool"] = nn.MaxPool2d(stride)
            layer["bn"] = nn.BatchNorm2d(out_chans)
            layer["act"] = activations[act]()
            layers.append(nn.Sequential(layer))
            in_chans = out_chans
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.stride = math.prod(strides) * patch_size
        for m in self.stem.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        lecun_normal_(self.proj.weight)
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
        return ConvStemEmbed(config.in_chans, config.embed_dim, channels, strides, config.patch_size,
                             downsample=stem.downsample or "stride", act=stem.act or "relu")
    spec = BiTSpec.from_dict(stem.bit_fields())
    stride = spec.stride * config.patch_size
    if h % stride or w % stride:
        raise ValueError(f"img_size {config.img_size} is not divisible by the hybrid's stride {stride} "
                         f"(ResNet stride {spec.stride} x patch_size {config.patch_size})")
    return HybridEmbed(config.in_chans, config.embed_dim, spec, config.patch_size)
