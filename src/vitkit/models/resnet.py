"""ResNets, in the two flavours the paper compares ViT with.

- :class:`BiTResNet`: the Big Transfer ResNet (Kolesnikov et al., 2020) that the hybrid ViT uses as its
  stem (paper Sec. 3.1, "Hybrid Architecture"): weight-standardised convolutions and GroupNorm instead
  of BatchNorm, so it behaves the same at any batch size. The layout is timm's ``ResNetV2`` with
  ``preact=False`` (the one its ``vit_*_r50_*`` hybrids use), so keys such as
  ``stem.conv.weight`` and ``stages.0.blocks.0.downsample.conv.weight`` match timm.
- :class:`ResNet`: the classic BatchNorm ResNet (He et al., 2016) as a CNN baseline, with torchvision's
  key names (``conv1``, ``layer1.0.bn1``, ``fc``) so torchvision and timm weights load without renaming,
  and with configurable stages and widths so that the small CIFAR ResNets (ResNet-20/56) fit the same
  class. It is registered as the ``resnet`` architecture: training, checkpoints and the CLI treat it
  like any other model.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from vitkit.config import ModelConfig
from vitkit.config_engine import check_fields, from_mapping
from vitkit.fileio import write_model_dir
from vitkit.models.features import FeatureInfo
from vitkit.models.inputs import check_image_batch
from vitkit.models.layers import DropPath
from vitkit.models.registry import config_record, register_architecture, register_model
from vitkit.preprocessing import Preprocessing

# ============================================================================ BiT ResNet (GN + WS)


def pad_same(x: Tensor, kernel_size: int, stride: int, value: float = 0.0) -> Tensor:
    """TensorFlow's 'SAME' padding: output size ceil(in / stride), extra pixel on the bottom/right.

    The hybrid's JAX weights were trained with it; PyTorch's symmetric padding shifts strided
    convolutions by one pixel, which changes the features.
    """
    ih, iw = x.shape[-2:]
    pad_h = max((math.ceil(ih / stride) - 1) * stride + kernel_size - ih, 0)
    pad_w = max((math.ceil(iw / stride) - 1) * stride + kernel_size - iw, 0)
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)


torch.fx.wrap("pad_same")  # FX records the padding as one call (its sizes come from the input's shape)
torch.fx.wrap("check_image_batch")


class StdConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised to zero mean and unit variance per output channel
    (Qiao et al., 2019) before every use; with GroupNorm it replaces BatchNorm in BiT."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int, stride: int = 1, *,
                 same_padding: bool = True, eps: float = 1e-8) -> None:
        dynamic = same_padding and stride > 1  # with stride 1, SAME is the usual symmetric padding
        super().__init__(in_chans, out_chans, kernel_size, stride, padding=0 if dynamic else kernel_size // 2,
                         bias=False)
        self.dynamic_same = dynamic
        self.eps = eps

    def standardized_weight(self) -> Tensor:
        """(w - mean) / sqrt(var + eps) over each output channel's kernel, computed as a batch norm of
        the (1, out, in*k*k) view: one fused kernel, and bit-for-bit what timm computes."""
        w = self.weight
        flat = F.batch_norm(w.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps)
        return flat.reshape_as(w)

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamic_same:
            x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.standardized_weight(), None, self.stride, self.padding)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm followed by ReLU (or nothing); parameters ``weight``/``bias`` as in timm."""

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-5, act: bool = True) -> None:
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
        super().__init__(groups, channels, eps=eps)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class MaxPoolSame(nn.Module):
    """3x3 stride-2 max pooling with TF 'SAME' padding (pads with -inf)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: Tensor) -> Tensor:
        x = pad_same(x, self.kernel_size, self.stride, value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


@dataclass(frozen=True)
class BiTSpec:
    """The shape of a BiT ResNet stem; ``ViTConfig.stem`` holds these fields as a JSON-able dict.

    Stage ``i`` has ``layers[i]`` bottleneck units with ``widths[i]`` output channels; the first
    stage keeps the resolution and every later one halves it, so the number of stages decides the
    stride (R50 with 3 stages: 16; with 4: 32). ``stem_stride`` and ``stem_pool`` let small images
    keep their resolution (a 3x3 stride-1 root without pooling for 32x32 inputs).
    """

    layers: tuple[int, ...] = (3, 4, 9)
    widths: Optional[tuple[int, ...]] = None
    """Output channels of each stage; default 256, 512, 1024, 2048 (ResNet-50)."""
    stem_width: int = 64
    stem_kernel: int = 7
    stem_stride: int = 2
    stem_pool: bool = True
    same_padding: bool = True
    """TF 'SAME' padding, as in the JAX checkpoints and timm's hybrids; False: PyTorch's symmetric padding."""
    gn_groups: int = 32
    gn_eps: float = 1e-5
    ws_eps: float = 1e-8

    def __post_init__(self) -> None:
        check_fields(self)
        widths = self.widths if self.widths is not None else [256 * 2 ** i for i in range(len(self.layers))]
        object.__setattr__(self, "widths", tuple(int(w) for w in widths))
        if len(self.widths) != len(self.layers):
            raise ValueError(f"stem: {len(self.layers)} stages in 'layers' but {len(self.widths)} in 'widths'")
        if any(n < 1 for n in self.layers):
            raise ValueError(f"stem: every stage needs at least one unit, got layers={list(self.layers)}")
        if min(self.widths, default=1) < 1 or self.stem_width < 1 or self.stem_kernel < 1 or self.stem_stride < 1:
            raise ValueError("stem: widths, stem_width, stem_kernel and stem_stride must be positive")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BiTSpec:
        return from_mapping(cls, data, source="", prefix="stem.")

    @property
    def stride(self) -> int:
        """Input pixels per feature-map pixel."""
        root = self.stem_stride * (2 if self.stem_pool else 1)
        return root * 2 ** max(len(self.layers) - 1, 0)

    @property
    def out_channels(self) -> int:
        return self.widths[-1] if self.layers else self.stem_width


class BiTBottleneck(nn.Module):
    """Post-activation bottleneck unit (ResNet v1.5 order) with GroupNorm and standardised convs:
    1x1 reduce, 3x3 (strided), 1x1 expand, added to the (projected) input, then ReLU."""

    def __init__(self, in_chans: int, out_chans: int, stride: int, spec: BiTSpec) -> None:
        super().__init__()
        mid = out_chans // 4
        conv = dict(same_padding=spec.same_padding, eps=spec.ws_eps)
        norm = dict(groups=spec.gn_groups, eps=spec.gn_eps)
        self.downsample = None
        if stride != 1 or in_chans != out_chans:
            self.downsample = nn.Sequential(OrderedDict(
                conv=StdConv2d(in_chans, out_chans, 1, stride, **conv),
                norm=GroupNormAct(out_chans, **norm, act=False),
            ))
        self.conv1 = StdConv2d(in_chans, mid, 1, **conv)
        self.norm1 = GroupNormAct(mid, **norm)
        self.conv2 = StdConv2d(mid, mid, 3, stride, **conv)
        self.norm2 = GroupNormAct(mid, **norm)
        self.conv3 = StdConv2d(mid, out_chans, 1, **conv)
        self.norm3 = GroupNormAct(out_chans, **norm, act=False)
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return self.act3(x + shortcut)


class BiTStage(nn.Module):
    def __init__(self, in_chans: int, out_chans: int, depth: int, stride: int, spec: BiTSpec) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[
            BiTBottleneck(in_chans if i == 0 else out_chans, out_chans, stride if i == 0 else 1, spec)
            for i in range(depth)
        ])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


def bit_root(in_chans: int, spec: BiTSpec) -> nn.Sequential:
    """The root block: one standardised conv, GroupNorm + ReLU, and (optionally) 3x3/2 max pooling."""
    root = OrderedDict(
        conv=StdConv2d(in_chans, spec.stem_width, spec.stem_kernel, spec.stem_stride,
                       same_padding=spec.same_padding, eps=spec.ws_eps),
        norm=GroupNormAct(spec.stem_width, spec.gn_groups, spec.gn_eps),
    )
    if spec.stem_pool:
        root["pool"] = MaxPoolSame(3, 2) if spec.same_padding else nn.MaxPool2d(3, 2, padding=1)
    return nn.Sequential(root)


class BiTResNet(nn.Module):
    """A BiT ResNet without head: images -> feature map of ``out_channels`` at 1/``stride`` resolution."""

    def __init__(self, in_chans: int, spec: BiTSpec) -> None:
        super().__init__()
        self.stride = spec.stride
        self.out_channels = spec.out_channels
        self.stem = bit_root(in_chans, spec)
        stages, prev = [], spec.stem_width
        for i, (depth, width) in enumerate(zip(spec.layers, spec.widths)):
            stages.append(BiTStage(prev, width, depth, stride=1 if i == 0 else 2, spec=spec))
            prev = width
        self.stages = nn.Sequential(*stages)

    def forward(self, images: Tensor) -> Tensor:
        return self.stages(self.stem(images))


def build_bit_backbone(in_chans: int, spec: BiTSpec) -> nn.Module:
    """A BiT ResNet, or only its root block when ``spec.layers`` is empty (timm's ``R-Ti`` hybrids
    use the bare root, whose keys then sit directly under the backbone: ``conv.weight``)."""
    backbone = BiTResNet(in_chans, spec) if spec.layers else bit_root(in_chans, spec)
    init_bit_(backbone)
    return backbone


def init_bit_(module: nn.Module) -> None:
    """He-normal convolutions, unit GroupNorms, and the last GroupNorm of every unit zero-initialised
    (as in BiT / vit_jax), so each residual unit starts as the identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, BiTBottleneck):
            nn.init.zeros_(m.norm3.weight)


# ============================================================================ CNN baseline (BN)


@dataclass
class ResNetConfig(ModelConfig):
    """A BatchNorm ResNet classifier; field names shared with :class:`vitkit.ViTConfig` where they mean
    the same thing, so training, checkpoints and the CLI handle both."""

    img_size: int | tuple[int, int] = 224
    """The training resolution (a CNN accepts any size; data pipelines read it)."""
    in_chans: int = 3
    num_classes: int = 1000
    block: Literal["basic", "bottleneck"] = "basic"
    layers: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    """Bottleneck width of each stage; bottleneck blocks output 4x this."""
    stem: Literal["imagenet", "cifar"] = "imagenet"
    """'imagenet': 7x7/2 conv + 3x3/2 max pool (stride 4); 'cifar': one 3x3/1 conv, no pooling."""
    stem_width: int = 64
    drop_rate: float = 0.0
    """Dropout before the classifier."""
    drop_path_rate: float = 0.0
    """Stochastic depth on the residual branches, growing linearly with depth."""
    zero_init_residual: bool = True
    """Start every block's last BatchNorm at zero (Goyal et al., 2017), so blocks begin as identities."""
    head_init: Literal["default", "zeros"] = "default"
    class_names: Optional[list[str]] = None
    preprocess: Optional[Preprocessing] = None
    """How images are prepared for these weights (see :mod:`vitkit.preprocessing`); None = not recorded."""
    name: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate_common()
        if min(self.layers, default=1) < 1 or min(self.widths, default=1) < 1 or self.stem_width < 1:
            raise ValueError(f"layers {self.layers}, widths {self.widths} and stem_width must be positive")
        if not self.layers or len(self.layers) != len(self.widths):
            raise ValueError(f"layers {self.layers} and widths {self.widths} must be non-empty and of equal length")


def _conv_bn(in_chans: int, out_chans: int, kernel_size: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding=kernel_size // 2, bias=False)
    return conv, nn.BatchNorm2d(out_chans)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34, CIFAR ResNets)."""

    expansion = 1

    def __init__(self, in_chans: int, width: int, stride: int, drop_path: float) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_chans, width, 3, stride)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_bn(width, width, 3)
        self.downsample = _projection(in_chans, width, stride)
        self.drop_path = DropPath(drop_path)

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(self.drop_path(y) + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, the "v1.5" placement torchvision uses), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, in_chans: int, width: int, stride: int, drop_path: float) -> None:
        super().__init__()
        out_chans = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(in_chans, width, 1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = _conv_bn(width, out_chans, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(in_chans, out_chans, stride)
        self.drop_path = DropPath(drop_path)

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(self.drop_path(y) + shortcut)


def _projection(in_chans: int, out_chans: int, stride: int) -> Optional[nn.Sequential]:
    """The 1x1 projection shortcut where the shape changes (option B of He et al.), else None."""
    if stride == 1 and in_chans == out_chans:
        return None
    return nn.Sequential(*_conv_bn(in_chans, out_chans, 1, stride))


class ResNet(nn.Module):
    """A BatchNorm ResNet classifier built from a :class:`ResNetConfig`, with torchvision's key names.

    Stages are ``layer1``, ``layer2``, ...; the first keeps the stem's resolution, each later one
    halves it.
    """

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        block = BasicBlock if config.block == "basic" else Bottleneck
        if config.stem == "imagenet":
            self.conv1, self.bn1 = _conv_bn(config.in_chans, config.stem_width, 7, 2)
            self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        else:
            self.conv1, self.bn1 = _conv_bn(config.in_chans, config.stem_width, 3, 1)
            self.maxpool = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

        drop_path = torch.linspace(0, config.drop_path_rate, sum(config.layers), device="cpu").tolist()
        prev = config.stem_width
        for i, (depth, width) in enumerate(zip(config.layers, config.widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(prev, width, stride, drop_path.pop(0)))
                prev = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_features = prev
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(config.drop_rate)
        self.init_weights()
        self.fc = self._new_head(config.num_classes, config.head_init)
        # timm's names: the classifier's input width, the pooling, the stages a feature extractor may keep
        self.head_hidden_size = self.num_features
        self.global_pool = "avg"
        self.num_classes = config.num_classes
        self.num_stages = len(config.layers)
        self.grad_checkpointing = False

    @property
    def stages(self) -> list[nn.Module]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def init_weights(self) -> None:
        """torchvision's initialisation: He-normal (fan-out) convolutions, unit BatchNorms, and the
        last BatchNorm of each block at zero when ``zero_init_residual``."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.config.zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_norm().weight)

    def _new_head(self, num_classes: int, init: str) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.num_features, num_classes)
        if init == "zeros":
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        return head

    def reset_head(self, num_classes: int, *, class_names: Sequence[str] | None = None,
                   zero_init: bool = True) -> None:
        """Replace the classifier by a fresh layer for ``num_classes`` classes (zero-initialised by default)."""
        self.config = self.config.replace(num_classes=num_classes, class_names=None,
                                          head_init="zeros" if zero_init else "default")
        self.config = self.config.replace(class_names=list(class_names) if class_names is not None else None)
        device, dtype = self.conv1.weight.device, self.conv1.weight.dtype
        self.fc = self._new_head(num_classes, self.config.head_init).to(device=device, dtype=dtype)
        self.fc.train(self.training)
        self.num_classes = num_classes

    # ------------------------------------------------------------------------------- timm's model API
    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's name: a fresh ``num_classes`` classifier (0: none) after the global average pool."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r}: vitkit's ResNet pools by average only")
        self.reset_head(num_classes, zero_init=False)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's ResNet groups: the stem, then each block (each stage when ``coarse``)."""
        return dict(stem=r"^conv1|bn1|maxpool", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's record of the input preparation (from the model's preprocessing record)."""
        cfg = self.config
        p = cfg.preprocessing()
        return {"architecture": cfg.name or "resnet", "input_size": (cfg.in_chans, *p.size), "fixed_input_size": False,
                "interpolation": p.interpolation, "crop_pct": p.crop_pct, "crop_mode": p.crop_mode,
                "mean": tuple(p.mean), "std": tuple(p.std), "num_classes": cfg.num_classes,
                "label_names": list(cfg.class_names) if cfg.class_names else None, "first_conv": "conv1",
                "classifier": "fc"}

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    @property
    def feature_info(self) -> FeatureInfo:
        """The stem's output (after its ReLU), then each stage's, as timm's ResNet lists them."""
        stem_reduction = 4 if self.config.stem == "imagenet" else 1
        info = [dict(module="relu", num_chs=self.config.stem_width, reduction=stem_reduction // 2 or 1)]
        channels, reduction = self.config.stem_width, stem_reduction
        for i, stage in enumerate(self.stages):
            blocks = list(stage.children()) if isinstance(stage, nn.Sequential) else []
            if blocks:
                channels = blocks[-1].last_norm().num_features
            reduction = reduction * (2 if i > 0 else 1)
            info.append(dict(module=f"layer{i + 1}", num_chs=channels, reduction=reduction))
        return FeatureInfo(info)

    def _resolve_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        count = 1 + self.num_stages
        if indices is None:
            return list(range(count))
        if isinstance(indices, int):
            if not 0 < indices <= count:
                raise ValueError(f"indices={indices}: asks for the last {indices} of {count} features")
            return list(range(count - indices, count))
        resolved = sorted({i + count if i < 0 else i for i in indices})
        if resolved and not 0 <= resolved[0] <= resolved[-1] < count:
            raise ValueError(f"feature indices {list(indices)} out of range for {count} features")
        return resolved

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              ) -> Any:
        """timm's signature: the stem's and the stages' feature maps (``indices`` of those 1 + stages), and the
        final map unless ``intermediates_only``."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' for a CNN, got {output_fmt!r}")
        take = self._resolve_indices(indices)
        check_image_batch(x, self.config.in_chans)
        x = self.relu(self.bn1(self.conv1(x)))
        intermediates = [x] if 0 in take else []
        x = self.maxpool(x)
        stages = self.stages[: max(take)] if stop_early else self.stages
        for i, stage in enumerate(stages, start=1):
            x = stage(x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the classifier); returns the kept indices."""
        take = self._resolve_indices(indices)
        self.num_stages = max(max(take), 1)
        for i in range(self.num_stages, len(self.config.layers)):
            setattr(self, f"layer{i + 1}", nn.Identity())
        if prune_head:
            self.reset_classifier(0)
        return take

    def no_weight_decay(self) -> set[str]:
        """Parameters that AdamW should not decay besides norms and biases: none."""
        return set()

    def forward_features(self, images: Tensor) -> Tensor:
        """The last stage's feature map, shape (B, num_features, H/s, W/s)."""
        check_image_batch(images, self.config.in_chans)
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        for stage in self.stages:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pooling and the classifier; ``pre_logits=True`` returns the pooled features."""
        x = self.head_drop(self.avgpool(features).flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` to ``directory`` (atomically)."""
        return write_model_dir(directory, self.state_dict(), config_record(self.config))


register_architecture("resnet", ResNetConfig, ResNet)

# torchvision's ImageNet ResNets (same layouts, keys and parameter counts).
_IMAGENET = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
    "resnet152": ("bottleneck", [3, 8, 36, 3]),
}
for _name, (_block, _layers) in _IMAGENET.items():
    register_model(_name, ResNetConfig(block=_block, layers=_layers), architecture="resnet",
                   description=f"ResNet-{_name[6:]} (torchvision layout), 224px, 1000 classes")

# Small-image ResNets: the CIFAR-style ResNet-18 (3x3 stem, no pooling) and He et al.'s CIFAR ResNets
# (Sec. 4.2: three stages of 16/32/64 channels, 6n+2 layers; projection shortcuts here).
register_model("resnet18_cifar", ResNetConfig(img_size=32, num_classes=10, stem="cifar"), architecture="resnet",
               description="ResNet-18 for 32x32 images: 3x3 stem, no max pool (11.2M params)")
for _depth in (20, 56):
    _n = (_depth - 2) // 6
    register_model(f"resnet{_depth}_cifar",
                   ResNetConfig(img_size=32, num_classes=10, stem="cifar", stem_width=16, layers=[_n] * 3,
                                widths=[16, 32, 64]),
                   architecture="resnet", description=f"ResNet-{_depth} of He et al. (2016) for 32x32 images")
