"""Model definitions and the registry of named models."""

from vitkit.models.layers import Attention, Block, DropPath, Mlp, PatchEmbed
from vitkit.models.pos_embed import resample_pos_embed
from vitkit.models.registry import (build_model, create_model, get_model_config, list_models,
                                    register_architecture, register_model)
from vitkit.models.vit import VisionTransformer

__all__ = [
    "Attention", "Block", "DropPath", "Mlp", "PatchEmbed", "VisionTransformer", "build_model", "create_model",
    "get_model_config", "list_models", "register_architecture", "register_model", "resample_pos_embed",
]
