"""The named ViTs: the ``vit`` architecture and its registered models (plain, hybrid and conv-stem).

Names and sizes follow the paper (Table 1) and timm, so that ``create_model("vit_base_patch16_224")``
builds what timm's model of that name is.
"""

from __future__ import annotations

from vitkit.config import ViTConfig
from vitkit.models.registry import register_architecture, register_model
from vitkit.models.resnet import BiTSpec
from vitkit.models.vit import VisionTransformer

register_architecture("vit", ViTConfig, VisionTransformer)

# Table 1 of the paper (Ti and S from DeiT / "How to train your ViT").
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, mlp_dim=768),
    "small": dict(embed_dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "base": dict(embed_dim=768, depth=12, num_heads=12, mlp_dim=3072),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, mlp_dim=5120),
}
_PAPER_NAME = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H"}

for _size, _dims in SIZES.items():
    for _patch in (32, 16, 14):
        for _res in (224, 384):
            if _res % _patch:
                continue  # 384 is not a multiple of 14; timm has no such model either
            register_model(
                f"vit_{_size}_patch{_patch}_{_res}",
                ViTConfig(img_size=_res, patch_size=_patch, **_dims),
                description=f"ViT-{_PAPER_NAME[_size]}/{_patch} at {_res}px, 1000 classes",
            )
    # The paper's ImageNet-21k pre-training models: 21,843 classes and a representation layer.
    for _patch in (32, 16, 14):
        register_model(
            f"vit_{_size}_patch{_patch}_224_in21k",
            ViTConfig(img_size=224, patch_size=_patch, num_classes=21843,
                      representation_size=_dims["embed_dim"], **_dims),
            description=f"ViT-{_PAPER_NAME[_size]}/{_patch} ImageNet-21k pre-training layout (with pre-logits)",
        )

# Small-image models, trained from scratch by vitkit's recipes.
register_model("vit_tiny_patch4_32", ViTConfig(img_size=32, patch_size=4, num_classes=10, **SIZES["tiny"]),
               description="ViT-Ti/4 for 32x32 images (CIFAR)")
register_model("vit_small_patch4_32", ViTConfig(img_size=32, patch_size=4, num_classes=10, **SIZES["small"]),
               description="ViT-S/4 for 32x32 images (CIFAR)")
register_model("vit_tiny_patch2_32", ViTConfig(img_size=32, patch_size=2, num_classes=10, **SIZES["tiny"]),
               description="ViT-Ti/2 for 32x32 images: 256 patches, slower, more accurate")
register_model("vit_cifar_patch4_32",
               ViTConfig(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=9, num_heads=12,
                         mlp_dim=384),
               description="compact ViT for CIFAR-10 from scratch (D 192, depth 9, 12 heads, MLP 384)")
register_model("vit_mini_patch4_32",
               ViTConfig(img_size=32, patch_size=4, num_classes=10, embed_dim=128, depth=6, num_heads=2,
                         mlp_dim=256),
               description="ViT for CIFAR-sized images on a CPU budget (D 128, depth 6, 2 heads, MLP 256; 0.81M)")
register_model("vit_mnist_patch4_28",
               ViTConfig(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=6,
                         num_heads=4, mlp_dim=256),
               description="compact ViT for 28x28 grayscale images (MNIST, Fashion-MNIST)")


# ------------------------------------------------------------------------------------- hybrids
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
            description=f"{_resnet}+ViT-{_PAPER_NAME[_size]} hybrid, stride {_stride}, {_res}px, 1000 classes",
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


# A stronger stem at fixed compute (issue 22): airbench's conv blocks (Jordan 2024) in front of the
# encoder. Each block is conv -> max-pool -> BN -> GELU then conv -> BN -> GELU, so the 3x3 filters work
# at 32x32 and 16x16 before the map is halved; 64 tokens of width 192 then go through 3 pre-norm blocks.
_AIRBENCH_STEM = {"type": "conv", "channels": [24, 64, 64, 128, 128], "strides": [1, 2, 1, 2, 1],
                  "downsample": "maxpool", "act": "gelu"}
register_model(
    "vit_airstem_cifar_32",
    ViTConfig(img_size=32, patch_size=1, num_classes=10, embed_dim=192, depth=3, num_heads=3, mlp_dim=384,
              stem=dict(_AIRBENCH_STEM)),
    description="ViT with airbench's conv blocks as stem for 32x32 images: 8x8 tokens, D 192, depth 3 (the "
                "CIFAR-10 recipe's model)",
)
register_model(
    "vit_airstem_cifar_d128_32",
    ViTConfig(img_size=32, patch_size=1, num_classes=10, embed_dim=128, depth=4, num_heads=2, mlp_dim=256,
              stem=dict(_AIRBENCH_STEM)),
    description="vit_airstem_cifar_32's stem with vit_convstem_cifar_d4_32's encoder (D 128, depth 4)",
)
register_model(
    "vit_airhybrid_cifar_32",
    ViTConfig(img_size=32, patch_size=1, num_classes=10, embed_dim=256, depth=2, num_heads=4, mlp_dim=512,
              stem={"type": "conv", "channels": [64, 64, 128, 128, 256, 256], "strides": [2, 1, 2, 1, 2, 1],
                    "downsample": "maxpool", "act": "gelu"}),
    description="hybrid ViT for 32x32 images: three airbench conv blocks (64/128/256 channels, stride 8, as the "
                "paper's R50 hybrid's stride 16 on 224 px) -> 4x4 tokens, D 256, depth 2",
)
