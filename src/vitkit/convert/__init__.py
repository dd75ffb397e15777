"""Checkpoint interchange: read timm, Hugging Face, torchvision and Google (.npz) ViT weights (timm and
Google hybrids too) into vitkit, and write vitkit models back out in each of those formats, losslessly.

All formats meet in vitkit's state dict, which uses timm's key names: each source module maps its
keys and tensor layouts to it (``to_vitkit``) and back (``from_vitkit``); :mod:`infer` reads the
hyper-parameters back from the tensor shapes.
"""

from vitkit.convert.detect import FORMATS, Checkpoint, read_checkpoint
from vitkit.convert.export import save_as, to_huggingface, to_npz, to_timm, to_torchvision
from vitkit.convert.infer import STANDARD_NUM_HEADS, STEM_ASSUMED, infer_config, infer_stem
from vitkit.convert.pretrained import from_checkpoint, read_model

__all__ = [
    "FORMATS", "STANDARD_NUM_HEADS", "STEM_ASSUMED", "Checkpoint", "from_checkpoint", "read_model", "infer_config",
    "infer_stem", "read_checkpoint", "save_as", "to_huggingface", "to_npz", "to_timm", "to_torchvision",
]
