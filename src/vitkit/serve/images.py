"""Turning an uploaded body into the model's input, or a one-line reason why not (an HTTP 4xx)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from vitkit.data.folder import to_8bit

MAX_PIXELS = 40_000_000
"""The largest image decoded (40 megapixels, e.g. 8000 x 5000): a 20000 x 20000 image, a few KB as a PNG, would
take 1.2 GB as RGB; its header is read and it is refused before any decoding."""


class BadImage(ValueError):
    """A request whose body is not a usable image; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Tensor:
    """Image bytes -> uint8 (C, H, W), C = 1 (grayscale) or 3, read as every vitkit command reads a file."""
    if not data:
        raise BadImage("empty body: send the image file's bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise BadImage(f"image too large: {width}x{height} pixels (at most {max_pixels:,} pixels)", 413)
            img.load()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image: the body is no image format Pillow reads (JPEG, PNG, WebP, ...)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"image too large: more than {max_pixels:,} pixels", 413) from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadImage(f"truncated or corrupt image: {why}") from None
    array = np.asarray(to_8bit(img), dtype=np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)
