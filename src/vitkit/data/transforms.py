"""The one evaluation transform: a model's :class:`~vitkit.preprocessing.Preprocessing` record as
torchvision ``transforms.v2`` (Resize, a centre crop, ToDtype, Normalize).

``predict``, ``eval``, ``fewshot``, ``analyze`` and the validation pass of training and fine-tuning all
prepare images with it, so a model sees the same pixels whichever command feeds it. It computes what
transformers' image processors compute (the same antialiased ``Resize`` kernel on uint8, the same output
size, the centre crop's offset rounded down), so a model exported to Hugging Face with the processor
:mod:`vitkit.hf_processor` writes gets the same input from ``AutoImageProcessor``.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor
from torchvision.transforms import v2

from vitkit.data.folder import read_image
from vitkit.preprocessing import Preprocessing

# NEAREST_EXACT is PIL's nearest neighbour (and transformers'); torchvision's NEAREST is shifted by half a pixel
_INTERPOLATION = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC,
                  "nearest": v2.InterpolationMode.NEAREST_EXACT}


class CentreCrop(torch.nn.Module):
    """The central ``size`` of (.., H, W) images, starting at ``((H - h) // 2, (W - w) // 2)``: transformers'
    offset. (torchvision's ``CenterCrop`` rounds half to even, one pixel further when ``H - h`` is 3 mod 4.)"""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size

    def forward(self, images: Tensor) -> Tensor:
        (h, w), (height, width) = self.size, images.shape[-2:]
        if height < h or width < w:
            raise ValueError(f"cannot crop {h}x{w} from a {height}x{width} image")
        top, left = (height - h) // 2, (width - w) // 2
        return images[..., top:top + h, left:left + w]



class EvalTransform:
    """uint8 images (C, H, W) or batches (B, C, H, W) -> the model's normalised float input.

    Two stages, each a ``v2.Compose``: ``geometry`` (channels to the model's, Resize of the shorter
    side, or in ``squash`` mode of both sides, to ``size / crop_pct``, the centre ``size``; uint8 in and out,
    what reports display) and
    ``normalize`` (ToDtype float32 scaled to [0, 1], Normalize by mean/std).
    """

    def __init__(self, preprocessing: Preprocessing, in_chans: int = 3) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"the eval transform makes 1- or 3-channel inputs, not {in_chans}")
        self.preprocessing = preprocessing.for_model(preprocessing.size, in_chans)
        self.in_chans = in_chans
        p = self.preprocessing
        self.geometry = v2.Compose([
            v2.Resize(p.resize_size, interpolation=_INTERPOLATION[p.interpolation], antialias=True),
            CentreCrop(p.size),
        ])
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(p.mean), list(p.std))])

    @property
    def size(self) -> tuple[int, int]:
        return self.preprocessing.size

    def channels(self, images: Tensor) -> Tensor:
        """Grayscale images repeated to RGB, or RGB turned to luma, as the model's input channels ask."""
        have = images.shape[-3]
        if have == self.in_chans:
            return images
        if have == 1:
            return images.expand(*images.shape[:-3], self.in_chans, *images.shape[-2:])
        if have == 3 and self.in_chans == 1:
            return v2.functional.rgb_to_grayscale(images, num_output_channels=1)
        raise ValueError(f"cannot feed {have}-channel images to a {self.in_chans}-channel model")

    def resize(self, images: Tensor) -> Tensor:
        """uint8 (.., C, H, W) -> uint8 (.., in_chans, *size): channels, resize, centre crop."""
        if images.dtype != torch.uint8:
            raise TypeError(f"the eval transform takes uint8 images, got {images.dtype}")
        return self.geometry(self.channels(images))

    def __call__(self, images: Tensor) -> Tensor:
        return self.normalize(self.resize(images))

    def load(self, path: str | Path | BinaryIO, *, orient: bool = True, name: str | None = None) -> Tensor:
        """One image file (or open binary file, ``name`` naming it) -> uint8 (in_chans, *size), decoded as every
        command decodes it: at full scale (a JPEG decoded at a reduced scale has other pixels than the resize of
        the full image); ``orient`` (the default, as for training crops) applies the file's EXIF orientation
        first, as image viewers and transformers' pipeline do."""
        return self.resize(read_image(path, orient=orient, name=name))

    def __repr__(self) -> str:
        return f"EvalTransform({self.preprocessing!r}, in_chans={self.in_chans})"


def eval_transform(config) -> EvalTransform:
    """The eval transform of a model config (its :meth:`~vitkit.config.ModelConfig.preprocessing`)."""
    return EvalTransform(config.preprocessing(), config.in_chans)
