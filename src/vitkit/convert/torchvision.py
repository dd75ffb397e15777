"""torchvision's ``VisionTransformer`` (``vit_b_16`` and friends).

torchvision keeps the fused in-projection of ``nn.MultiheadAttention`` (rows ordered q, k, v, as
in vitkit's ``qkv``), names the MLP layers by their index in an ``nn.Sequential`` (``mlp.0``,
``mlp.3``; ``linear_1``/``linear_2`` before 0.13) and stores the representation layer as
``heads.pre_logits``. Its LayerNorms use eps 1e-6 like vitkit's.
"""

from __future__ import annotations

from torch import Tensor

from vitkit.checkpoint import CheckpointError
from vitkit.config import ViTConfig
from vitkit.convert.keymap import KeyMap

FORMAT = "torchvision"

KEYS = KeyMap([
    ("cls_token", "class_token"),
    ("pos_embed", "encoder.pos_embedding"),
    ("patch_embed.proj", "conv_proj"),
    ("blocks.{i}.norm1", "encoder.layers.encoder_layer_{i}.ln_1"),
    ("blocks.{i}.attn.qkv.weight", "encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight"),
    ("blocks.{i}.attn.qkv.bias", "encoder.layers.encoder_layer_{i}.self_attention.in_proj_bias"),
    ("blocks.{i}.attn.proj", "encoder.layers.encoder_layer_{i}.self_attention.out_proj"),
    ("blocks.{i}.norm2", "encoder.layers.encoder_layer_{i}.ln_2"),
    ("blocks.{i}.mlp.fc1", "encoder.layers.encoder_layer_{i}.mlp.0"),
    ("blocks.{i}.mlp.fc2", "encoder.layers.encoder_layer_{i}.mlp.3"),
    ("norm", "encoder.ln"),
    ("pre_logits.fc", "heads.pre_logits"),
    ("head", "heads.head"),
])
LEGACY_KEYS = KeyMap([  # torchvision < 0.13
    ("blocks.{i}.mlp.fc1", "encoder.layers.encoder_layer_{i}.mlp.linear_1"),
    ("blocks.{i}.mlp.fc2", "encoder.layers.encoder_layer_{i}.mlp.linear_2"),
])


def matches(keys: set[str]) -> bool:
    return "conv_proj.weight" in keys or "encoder.pos_embedding" in keys


def to_vitkit(state_dict: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    out = {}
    for key, tensor in state_dict.items():
        ours = KEYS.to_ours(key) or LEGACY_KEYS.to_ours(key)
        if ours is None:
            hint = " (a convolutional stem, vit_*_conv configs)" if key.startswith("conv_proj.") else ""
            raise CheckpointError(f"{source}: key {key!r} has no counterpart in vitkit's ViT{hint}")
        out[ours] = tensor
    return out


def from_vitkit(state_dict: dict[str, Tensor], config: ViTConfig) -> dict[str, Tensor]:
    if config.stem is not None:
        raise ValueError("torchvision has no hybrid ViT (its VisionTransformer embeds raw patches; conv_stem_configs "
                         "is a plain Conv-BN stack, not a BiT ResNet)")
    problems = []
    if not config.class_token or config.global_pool != "token" or config.fc_norm:
        problems.append("pooling other than the class token")
    if not config.qkv_bias:
        problems.append("qkv without bias")
    if config.num_classes <= 0:
        problems.append("no classification head")
    if config.in_chans != 3:
        problems.append(f"{config.in_chans} input channels (torchvision's stem takes 3)")
    if config.image_hw[0] != config.image_hw[1]:
        problems.append("a non-square image size")
    if problems:
        raise ValueError(f"torchvision's VisionTransformer cannot represent {', '.join(problems)}")
    return {KEYS.to_theirs(key): tensor for key, tensor in state_dict.items()}
