"""The reference implementation vitkit is compared with: timm's ``VisionTransformer``.

timm is a test/benchmark-only dependency (the ``test`` extra); this module imports it lazily and is
the only place in the package that does. The reference is built from the same :class:`ViTConfig`
and loads vitkit's state dict strictly, so both run the identical network with identical weights.
"""

from __future__ import annotations

from torch import nn

from vitkit.config import ViTConfig


class ReferenceUnavailable(RuntimeError):
    """timm is missing, or the config uses a feature timm's plain ViT does not have."""


def timm_vision_transformer(config: ViTConfig) -> nn.Module:
    """timm's ``VisionTransformer`` with the hyper-parameters of ``config``."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:
        raise ReferenceUnavailable("timm is not installed (pip install 'vitkit[test]')") from e
    if config.stem is not None or config.representation_size is not None:
        raise ReferenceUnavailable("timm's VisionTransformer has no hybrid stem / representation layer")
    return VisionTransformer(
        img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans,
        num_classes=config.num_classes, embed_dim=config.embed_dim, depth=config.depth,
        num_heads=config.num_heads, mlp_ratio=config.mlp_dim / config.embed_dim, qkv_bias=config.qkv_bias,
        class_token=config.class_token, global_pool=config.global_pool, fc_norm=config.fc_norm,
        drop_rate=config.drop_rate, pos_drop_rate=config.drop_rate, proj_drop_rate=config.drop_rate,
        attn_drop_rate=config.attn_drop_rate, drop_path_rate=config.drop_path_rate,
        dynamic_img_size=config.dynamic_img_size,
    )


def reference_twin(model: nn.Module) -> nn.Module:
    """timm's ViT with ``model``'s config and weights (strict load: any key mismatch is an error)."""
    reference = timm_vision_transformer(model.config)
    reference.load_state_dict(model.state_dict(), strict=True)
    return reference
