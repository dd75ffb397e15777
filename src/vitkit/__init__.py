"""vitkit: Vision Transformers (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2020) in PyTorch."""

from vitkit.config import StemConfig, ViTConfig
from vitkit.models import (VisionTransformer, build_model, create_model, get_model_config, list_models,
                           register_model, resample_pos_embed)

__version__ = "0.1.0"


def load_model(directory, **kwargs):
    """Load a model saved with ``save_pretrained`` (``model.safetensors`` + ``config.json``)."""
    from vitkit.checkpoint import load_model as _load_model

    return _load_model(directory, **kwargs)


def from_pretrained(source, **kwargs):
    """Load weights from any supported format (vitkit, timm, Hugging Face, torchvision, Google .npz)."""
    from vitkit.convert import from_pretrained as _from_pretrained

    return _from_pretrained(source, **kwargs)


__all__ = [
    "StemConfig", "ViTConfig", "VisionTransformer", "build_model", "create_model", "from_pretrained", "get_model_config",
    "list_models", "load_model", "register_model", "resample_pos_embed", "__version__",
]
