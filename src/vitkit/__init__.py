"""vitkit: Vision Transformers (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2020) in PyTorch."""

from vitkit.config import ViTConfig
from vitkit.models import (VisionTransformer, build_model, get_model_config, list_models, register_model,
                           resample_pos_embed)

__version__ = "0.1.0"


def load_model(directory, **kwargs):
    """Load a model saved with ``save_pretrained`` (``model.safetensors`` + ``config.json``)."""
    from vitkit.checkpoint import load_model as _load_model

    return _load_model(directory, **kwargs)


def from_pretrained(source, **kwargs):
    """Load weights from any supported format (vitkit, timm, Hugging Face, torchvision, Google .npz), from a
    local path, a pretrained name (``vit_base_patch16_224.augreg2_in21k_ft_in1k``), a Hugging Face repo id
    (``google/vit-base-patch16-224``, ``hf-hub:timm/...``) or a URL; see :func:`vitkit.convert.from_pretrained`."""
    from vitkit.convert import from_pretrained as _from_pretrained

    return _from_pretrained(source, **kwargs)


def create_model(name, pretrained=False, **overrides):
    """Build a registered model (``create_model('vit_base_patch16_224', num_classes=10)``); with
    ``pretrained=True`` fetch and load its weights, timm-style: ``name`` is ``arch.tag``
    (``vit_base_patch16_224.augreg2_in21k_ft_in1k``) or a bare architecture (its default weights)."""
    from vitkit.convert.pretrained import create_model as _create_model

    return _create_model(name, pretrained=pretrained, **overrides)


__all__ = [
    "ViTConfig", "VisionTransformer", "build_model", "create_model", "from_pretrained", "get_model_config",
    "list_models", "load_model", "register_model", "resample_pos_embed", "__version__",
]
