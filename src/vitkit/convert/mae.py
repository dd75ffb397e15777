"""MAE checkpoints: the official release (facebookresearch/mae) and Hugging Face's ViTMAE.

- Official ``{'model': state_dict}`` files already use vitkit's MAE names (timm's encoder keys and
  ``decoder_*``): the visualisation checkpoints hold encoder and decoder, ``mae_pretrain_vit_*.pth`` the
  encoder alone (which loads as a plain ViT, or as an MAE with a fresh decoder).
- Hugging Face ``ViTMAEForPreTraining`` keys are ``vit.`` + a ViT's keys and ``decoder.`` + decoder keys
  whose blocks are ViT layers; ``ViTMAEModel`` has the ``vit`` part without its prefix. The encoder and
  each decoder layer go through the ViT key map of :mod:`vitkit.convert.huggingface` (4.x file names and
  5.x in-memory names alike).
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from vitkit.checkpoint import CheckpointError
from vitkit.config import ViTConfig
from vitkit.convert import huggingface as hf_vit
from vitkit.models.mae import ENCODER_PREFIXES, MAEConfig

_DECODER_DIRECT = {"decoder.decoder_embed": "decoder_embed", "decoder.mask_token": "mask_token",
                   "decoder.decoder_pos_embed": "decoder_pos_embed", "decoder.decoder_norm": "decoder_norm",
                   "decoder.decoder_pred": "decoder_pred"}
# Hub files name decoder layers decoder_layers.N; transformers 5 writes decoder_encoder.layer.N when it saves.
_DECODER_LAYER = re.compile(r"decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)")


def is_huggingface_mae(keys: set[str]) -> bool:
    """ViTMAEForPreTraining's keys (a ViTMAEModel is told apart by its config.json's model_type)."""
    return any(k.startswith("decoder.decoder_") for k in keys)


def is_official_mae(keys: set[str]) -> bool:
    """The official layout with its decoder: timm's encoder keys and ``decoder_embed`` / ``decoder_pred``."""
    return "patch_embed.proj.weight" in keys and "decoder_embed.weight" in keys and "decoder_pred.weight" in keys


def infer_mae_config(state_dict: dict[str, Tensor], encoder: ViTConfig, *,
                     decoder_num_heads: int | None = None) -> MAEConfig:
    """An MAEConfig from a state dict with a decoder (official or converted): the decoder's width, depth and
    MLP size from the tensor shapes; its head count is not recorded, so the official 16 unless given."""
    width = state_dict["decoder_embed.weight"].shape[0]
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("decoder_blocks.")})
    mlp = state_dict["decoder_blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * width
    heads = decoder_num_heads or (16 if width % 16 == 0 else max(1, width // 32))
    return MAEConfig(encoder=encoder.replace(num_classes=0), decoder_embed_dim=width, decoder_depth=depth,
                     decoder_num_heads=heads, decoder_mlp_dim=mlp)


def hf_to_vitkit(state_dict: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Hugging Face ViTMAEForPreTraining / ViTMAEModel keys -> vitkit's MAE keys (no decoder for ViTMAEModel)."""
    encoder = {k: v for k, v in state_dict.items() if not k.startswith("decoder.")}
    out = hf_vit.to_vitkit(encoder, source)
    layers: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if not key.startswith("decoder."):
            continue
        module, _, param = key.rpartition(".")
        if module in _DECODER_DIRECT or key in _DECODER_DIRECT:
            out[_DECODER_DIRECT.get(key) or f"{_DECODER_DIRECT[module]}.{param}"] = tensor
        elif match := _DECODER_LAYER.fullmatch(key):
            layers[f"layers.{match.group(1)}.{match.group(2)}"] = tensor  # a ViT layer's key (5.x or 4.x)
        else:
            raise CheckpointError(f"{source}: key {key!r} has no counterpart in vitkit's MAE decoder")
    if layers:
        for key, tensor in hf_vit.to_vitkit(layers, source).items():
            out["decoder_" + key] = tensor  # blocks.N... -> decoder_blocks.N...
    return out


def vitkit_to_hf(state_dict: dict[str, Tensor], config: MAEConfig) -> dict[str, Tensor]:
    """vitkit's MAE keys -> Hugging Face ViTMAEForPreTraining file keys (4.x names, which transformers 5 reads)."""
    encoder = {k: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIXES)}
    out = {f"vit.{k}": v for k, v in hf_vit.from_vitkit(encoder, config.encoder.replace(num_classes=0)).items()}
    blocks = {k.removeprefix("decoder_"): v for k, v in state_dict.items() if k.startswith("decoder_blocks.")}
    for key, tensor in hf_vit.from_vitkit(blocks, config.encoder.replace(num_classes=0)).items():
        out["decoder.decoder_layers." + key.removeprefix("encoder.layer.")] = tensor
    inverse = {v: k for k, v in _DECODER_DIRECT.items()}
    for key, tensor in state_dict.items():
        if key in inverse:
            out[inverse[key]] = tensor
        elif key.split(".")[0] in inverse and not key.startswith("decoder_blocks."):
            module, _, param = key.partition(".")
            out[f"{inverse[module]}.{param}"] = tensor
    return out


def hf_config_to_vitkit(data: dict[str, Any], source: str) -> MAEConfig:
    """An :class:`MAEConfig` from a Hugging Face ``config.json`` of ``model_type: vit_mae``."""
    if data.get("model_type") != "vit_mae":
        raise CheckpointError(f"{source}: model_type is {data.get('model_type')!r}, not 'vit_mae'")
    size = data.get("image_size", 224)
    encoder = ViTConfig(img_size=size if isinstance(size, int) else tuple(size), patch_size=data.get("patch_size", 16),
                        in_chans=data.get("num_channels", 3), num_classes=0, embed_dim=data.get("hidden_size", 768),
                        depth=data.get("num_hidden_layers", 12), num_heads=data.get("num_attention_heads", 12),
                        mlp_dim=data.get("intermediate_size", 3072), qkv_bias=data.get("qkv_bias", True),
                        norm_eps=data.get("layer_norm_eps", 1e-12))
    if data.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{source}: hidden_act {data['hidden_act']!r}: vitkit's blocks use exact GELU")
    return MAEConfig(encoder=encoder, decoder_embed_dim=data.get("decoder_hidden_size", 512),
                     decoder_depth=data.get("decoder_num_hidden_layers", 8),
                     decoder_num_heads=data.get("decoder_num_attention_heads", 16),
                     decoder_mlp_dim=data.get("decoder_intermediate_size", 2048),
                     mask_ratio=data.get("mask_ratio", 0.75), norm_pix_loss=bool(data.get("norm_pix_loss", False)))


def vitkit_config_to_hf(config: MAEConfig) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of a ViTMAEForPreTraining equal to ``config``."""
    enc = config.encoder
    if enc.image_hw[0] != enc.image_hw[1]:
        raise ValueError("Hugging Face's ViTMAE handles square images only")
    return {"architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae", "image_size": enc.image_hw[0],
            "patch_size": enc.patch_size, "num_channels": enc.in_chans, "hidden_size": enc.embed_dim,
            "num_hidden_layers": enc.depth, "num_attention_heads": enc.num_heads, "intermediate_size": enc.mlp_dim,
            "qkv_bias": enc.qkv_bias, "hidden_act": "gelu", "layer_norm_eps": enc.norm_eps,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "decoder_hidden_size": config.decoder_embed_dim, "decoder_num_hidden_layers": config.decoder_depth,
            "decoder_num_attention_heads": config.decoder_num_heads,
            "decoder_intermediate_size": config.decoder_mlp_dim, "mask_ratio": config.mask_ratio,
            "norm_pix_loss": config.norm_pix_loss}
