"""The one check of an image batch that every model runs before its first layer, so that a wrong shape,
channel count or dtype is a sentence naming what was expected rather than a convolution's traceback."""

from __future__ import annotations

from torch import Tensor


def check_image_batch(images: object, in_chans: int) -> None:
    """Raise ``ValueError`` unless ``images`` is a floating-point (B, in_chans, H, W) tensor."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"expected images of shape (batch, {in_chans}, H, W), got {shape}")
    if images.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels (images of shape (batch, {in_chans}, H, W)), "
                         f"got {images.shape[1]} in shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected floating-point images (normalised float32/bf16/fp16), got {images.dtype}; "
                         "convert uint8 images with images.float() / 255 and normalise")
