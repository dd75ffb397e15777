"""vitkit: Vision Transformers (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2020) in PyTorch."""

from vitkit.checkpoint import load_model
from vitkit.config import ViTConfig
from vitkit.convert import from_pretrained
from vitkit.convert.pretrained import create_model
from vitkit.models import (
    VisionTransformer,
    build_model,
    get_model_config,
    list_models,
    register_model,
    resample_pos_embed,
)
from vitkit.version import __version__

__all__ = [
    "ViTConfig", "VisionTransformer", "build_model", "create_model", "from_pretrained", "get_model_config",
    "list_models", "load_model", "register_model", "resample_pos_embed", "__version__",
]
