"""The reference implementation vitkit is compared with: timm's ``VisionTransformer``.

timm is a test/benchmark-only dependency (the ``test`` extra); this module imports it lazily and is
the only place in the package that does. The reference is built from the same :class:`ViTConfig`
and loads vitkit's state dict strictly, so both run the identical network with identical weights. A
hybrid's reference is timm's own ``HybridEmbed`` around the same CNN layers (timm has no conv stem of
its own), so what vitkit's stem does beyond those layers, such as its channels-last layout, is
measured as vitkit's.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from vitkit.config import ViTConfig
from vitkit.models.hybrid import ConvStemEmbed, build_stem


class ReferenceUnavailable(RuntimeError):
    """timm is missing, or the config uses a feature timm's plain ViT does not have."""


def timm_vision_transformer(config: ViTConfig) -> nn.Module:
    """timm's ``VisionTransformer`` with the hyper-parameters of ``config``."""
    try:  # timm is optional (the test extra): imported only when a reference is asked for
        from timm.layers import HybridEmbed
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:
        raise ReferenceUnavailable("timm is not installed (pip install 'vitkit[test]')") from e
    if config.representation_size is not None:
        raise ReferenceUnavailable("timm's VisionTransformer has no representation layer")
    if config.stem is not None and config.dynamic_img_size:
        raise ReferenceUnavailable("the timm reference of a hybrid takes fixed-size images only")
    stem = {} if config.stem is None else {"embed_layer": partial(HybridEmbed, backbone=_cnn_of(config))}
    return VisionTransformer(
        img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans,
        num_classes=config.num_classes, embed_dim=config.embed_dim, depth=config.depth,
        num_heads=config.num_heads, mlp_ratio=config.mlp_dim / config.embed_dim, qkv_bias=config.qkv_bias,
        class_token=config.class_token, global_pool=config.global_pool, fc_norm=config.fc_norm,
        drop_rate=config.drop_rate, pos_drop_rate=config.drop_rate, proj_drop_rate=config.drop_rate,
        attn_drop_rate=config.attn_drop_rate, drop_path_rate=config.drop_path_rate,
        dynamic_img_size=config.dynamic_img_size, **stem,
    )


def _cnn_of(config: ViTConfig) -> nn.Module:
    """The CNN of a hybrid's stem (conv layers or BiT ResNet), without its projection to D: the
    ``backbone`` that timm's own ``HybridEmbed`` runs before its projection."""

    stem = build_stem(config)
    return stem.stem if isinstance(stem, ConvStemEmbed) else stem.backbone


def _timm_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """vitkit's state dict under timm's hybrid keys (a conv stem's ``patch_embed.stem.*`` is timm's
    ``patch_embed.backbone.*``; everything else already has timm's names)."""
    prefix = "patch_embed.stem."
    return {("patch_embed.backbone." + k[len(prefix):] if k.startswith(prefix) else k): v
            for k, v in state_dict.items()}


def reference_twin(model: nn.Module) -> nn.Module:
    """timm's ViT with ``model``'s config and weights (strict load: any key mismatch is an error)."""
    reference = timm_vision_transformer(model.config)
    reference.load_state_dict(_timm_keys(model.state_dict()), strict=True)
    return reference
