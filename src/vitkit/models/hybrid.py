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
from collections.abc import Callable, Iterable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
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


@torch.no_grad()
def whiten_conv_(conv: nn.Conv2d, image_batches: Iterable[Tensor], eps: float = 5e-4,
                 sum_over_processes: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Make ``conv``'s filters whiten the patches of the images it will see (airbench's patch-whitening
    initialisation, Jordan 2024), and return the patch covariance's eigenvalues (largest first).

    The filters are the eigenvectors of the covariance of the images' ``kh x kw`` patches, largest variance
    first, each scaled by ``1 / sqrt(eigenvalue + eps)`` and followed by its negation, so that both signs
    survive the activation: the first layer starts out decorrelating its input instead of mixing it at
    random. With ``2k`` output channels the top ``k`` directions are used; channels beyond twice the patch
    dimension keep their initialisation. ``eps`` keeps the near-constant directions from being amplified.
    Under data parallelism each process passes its share of the batches and ``sum_over_processes`` (an
    all-reduce) adds up the patch statistics, so that every process sets the same filters.
    """
    if conv.groups != 1:
        raise ValueError(f"whitening needs an ungrouped convolution, got groups={conv.groups}")
    kh, kw = conv.kernel_size
    dim = conv.in_channels * kh * kw
    moments = torch.zeros(dim, dim, dtype=torch.float64, device=conv.weight.device)
    total = torch.zeros(dim, dtype=torch.float64, device=conv.weight.device)
    count = 0
    for images in image_batches:
        # every patch the convolution reads, padding left out (it would add zeros the data does not have)
        patches = F.unfold(images.to(conv.weight.device, torch.float64), (kh, kw), dilation=conv.dilation,
                           stride=conv.stride).transpose(1, 2).reshape(-1, dim)
        moments += patches.T @ patches
        total += patches.sum(dim=0)
        count += patches.shape[0]
    if sum_over_processes is not None:
        sums = sum_over_processes(torch.cat([moments.flatten(), total, total.new_tensor([count])]))
        moments, total, count = sums[:dim * dim].view(dim, dim), sums[dim * dim:-1], int(sums[-1])
    if count < 2:
        raise ValueError("whitening needs at least two image patches, the image batches gave "
                         f"{count}")
    mean = total / count
    covariance = moments / count - torch.outer(mean, mean)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
    k = min(conv.out_channels // 2, dim)
    filters = eigenvectors[:, :k].T / (eigenvalues[:k, None] + eps).sqrt()
    weight = torch.cat([filters, -filters]).reshape(2 * k, conv.in_channels, kh, kw)
    conv.weight[:2 * k] = weight.to(conv.weight.dtype)
    return eigenvalues


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
