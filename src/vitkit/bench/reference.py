"""The reference implementation vitkit is compared with: timm's ``VisionTransformer``.

timm is a test/benchmark-only dependency (the ``test`` extra); this module imports it lazily and is
the only place in the package that does. The reference is built from the same :class:`ViTConfig`
and loads vitkit's state dict strictly, so both run the identical network with identical weights.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from vitkit.config import ViTConfig


class ReferenceUnavailable(RuntimeError):
    """timm is missing, or the config uses a feature timm's plain ViT does not have."""


def timm_vision_transformer(config: ViTConfig) -> nn.Module:
    """timm's ``VisionTransformer`` with the hyper-parameters of ``config``."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:
        raise ReferenceUnavailable("timm is not installed (pip install 'vitkit[test]')") from e
    if config.representation_size is not None:
        raise ReferenceUnavailable("timm's VisionTransformer has no representation layer")
    if config.stem is not None and config.dynamic_img_size:
        raise ReferenceUnavailable("the timm reference of a hybrid takes fixed-size images only")
    stem = {} if config.stem is None else {"embed_layer": lambda **_: _StemForTimm(config)}
    return VisionTransformer(
        img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans,
        num_classes=config.num_classes, embed_dim=config.embed_dim, depth=config.depth,
        num_heads=config.num_heads, mlp_ratio=config.mlp_dim / config.embed_dim, qkv_bias=config.qkv_bias,
        class_token=config.class_token, global_pool=config.global_pool, fc_norm=config.fc_norm,
        drop_rate=config.drop_rate, pos_drop_rate=config.drop_rate, proj_drop_rate=config.drop_rate,
        attn_drop_rate=config.attn_drop_rate, drop_path_rate=config.drop_path_rate,
        dynamic_img_size=config.dynamic_img_size, **stem,
    )


class _StemForTimm(nn.Module):
    """vitkit's CNN stem (conv stem or BiT ResNet) behind timm's ``embed_layer`` interface, so that the
    reference of a hybrid is timm's encoder on the same stem. The stem's submodules are registered
    directly, so the keys (``patch_embed.stem.*``, ``patch_embed.proj.*``) match vitkit's."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        from vitkit.models.hybrid import build_stem

        stem = build_stem(config)
        for name, child in stem.named_children():
            self.add_module(name, child)
        self._forward = stem.forward  # shares the children registered above
        self.stride = stem.stride
        self.img_size = config.image_hw
        self.grid_size = (self.img_size[0] // self.stride, self.img_size[1] // self.stride)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self, as_scalar: bool = True) -> Any:
        return self.stride if as_scalar else (self.stride, self.stride)

    def forward(self, images: Tensor) -> Tensor:
        tokens, _ = self._forward(images)
        return tokens


def reference_twin(model: nn.Module) -> nn.Module:
    """timm's ViT with ``model``'s config and weights (strict load: any key mismatch is an error)."""
    reference = timm_vision_transformer(model.config)
    reference.load_state_dict(model.state_dict(), strict=True)
    return reference
