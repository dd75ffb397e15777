"""Model definitions and the registry of named models.

Importing this package imports every model family, and with it every registration (the registry
mechanism in :mod:`vitkit.models.registry` holds none of its own).
"""

from vitkit.models import mae, resnet, t2t, zoo  # noqa: F401  (the families register their names on import)
from vitkit.models.layers import Attention, Block, DropPath, Mlp, PatchEmbed
from vitkit.models.pos_embed import resample_pos_embed
from vitkit.models.registry import (
    build_model,
    build_registered,
    get_model_config,
    list_models,
    register_architecture,
    register_model,
)
from vitkit.models.transfer import freeze_backbone, prepare_for_finetuning
from vitkit.models.vit import VisionTransformer

__all__ = [
    "Attention", "Block", "DropPath", "Mlp", "PatchEmbed", "VisionTransformer", "build_model", "build_registered",
    "freeze_backbone", "get_model_config", "list_models", "prepare_for_finetuning", "register_architecture",
    "register_model", "resample_pos_embed",
]
