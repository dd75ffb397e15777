"""Class-folder data sets (``PATH/train/<class>/*.jpg``): scanning, robust decoding, worker-side crops.

The one image reader of vitkit (:func:`read_image`, and the training crops): any mode (grayscale,
palette, CMYK, RGBA, 16-bit, 32-bit float) to 8-bit RGB (or grayscale, kept one channel for the eval
transform), decoded at a reduced JPEG scale when that is enough for the output size, in the DataLoader's
worker processes. The random crop of an image is seeded by ``(seed, epoch, position)``. A file that
cannot be decoded is reported by name (:class:`CorruptImageError`), never by a worker traceback.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from vitkit.data.augment import sample_boxes
from vitkit.data.sampling import SAMPLE, rng

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
"""The one list of image file suffixes vitkit reads (any case)."""
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "test")}


class CorruptImageError(ValueError):
    """An image file cannot be decoded (or holds pixels vitkit refuses); ``path`` names it.

    Raised by the data layer in the main process, with a one-line message, so that a caller (the
    training loop) can catch it by type, save its state and stop cleanly."""

    def __init__(self, path: str | Path, reason: str = "not a readable image") -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self):  # picklable across DataLoader workers
        return type(self), (self.path, self.reason)


class ClassMismatchError(ValueError):
    """A split's classes differ from the one class list its labels must come from; the message names them."""


@dataclass
class FolderSplit:
    """The files of one split and their labels; ``skipped`` lists unreadable files that were left out."""

    root: Path
    files: list[Path]
    labels: np.ndarray
    classes: list[str]
    skipped: list[Path] = field(default_factory=list)


def find_split_dir(root: Path, split: str) -> Path:
    for name in SPLIT_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"{root}: no {split} split; expected a directory named "
                            f"{' or '.join(SPLIT_NAMES[split])} with one sub-directory per class")


def list_classes(split_dir: Path) -> list[str]:
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{split_dir}: no class directories (expected {split_dir}/<class>/<image files>)")
    return classes


PIXEL_LIMIT_ENV = "VITKIT_MAX_IMAGE_PIXELS"


def apply_pixel_limit() -> None:
    """Set Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) from ``VITKIT_MAX_IMAGE_PIXELS``
    (a number of pixels, or ``none`` for no limit), so that a user can raise it from the command line; the
    DataLoader workers import this module and apply it too."""
    text = os.environ.get(PIXEL_LIMIT_ENV, "").strip().lower()
    if not text:
        return
    if text in ("none", "off", "0"):
        Image.MAX_IMAGE_PIXELS = None
        return
    try:
        Image.MAX_IMAGE_PIXELS = int(float(text))
    except ValueError:
        raise ValueError(f"{PIXEL_LIMIT_ENV}={text!r}: expected a number of pixels, or 'none'") from None


apply_pixel_limit()


def bomb_problem(error: Exception) -> str:
    """What a :class:`PIL.Image.DecompressionBombError` means and how to get past it, on one line."""
    limit = Image.MAX_IMAGE_PIXELS
    return (f"too many pixels for Pillow's decompression-bomb guard ({error}); PIL.Image.MAX_IMAGE_PIXELS is "
            f"{limit}, and an image over twice that is refused. If the image is genuine, raise the limit: "
            f"{PIXEL_LIMIT_ENV}=<pixels> (or 'none') in the environment, or set PIL.Image.MAX_IMAGE_PIXELS in Python")


def header_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable image, found cheaply (no pixel decoding), or None.

    PIL parses the header; a JPEG must end with its end-of-image marker and a PNG with its IEND
    chunk, which catches files cut short by an interrupted copy or download. An image over Pillow's
    decompression-bomb limit (a 20000x20000 PNG can be 390 KB) is refused here, before anything decodes it."""
    try:
        with Image.open(path) as img:
            fmt = img.format
            img.size  # noqa: B018 - parsing the header is the check
    except Image.DecompressionBombError as e:
        return bomb_problem(e)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return f"not a readable image ({type(e).__name__}: {e})"
    if fmt in ("JPEG", "PNG"):
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 1024))
            tail = f.read()
        if fmt == "JPEG" and b"\xff\xd9" not in tail:
            return "truncated JPEG (no end-of-image marker)"
        if fmt == "PNG" and b"IEND" not in tail:
            return "truncated PNG (no IEND chunk)"
    return None


def scan_split(split_dir: Path, classes: list[str], *, skip_corrupt: bool = False,
               check_headers: bool = True) -> FolderSplit:
    """List image files per class folder, labelled by their position in ``classes`` (the one class
    list, e.g. the training split's). A class folder not in ``classes`` is an error naming it; an
    empty class folder or an unreadable file is an error (or, for unreadable files with ``skip_corrupt``,
    skipped and recorded in ``skipped``)."""
    files: list[Path] = []
    labels: list[int] = []
    skipped: list[Path] = []
    present = {e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")}
    unknown = sorted(present - set(classes))
    if unknown:
        raise ClassMismatchError(f"{split_dir}: class folder(s) {', '.join(unknown)} are not among the {len(classes)} "
                         f"training classes ({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''})")
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue  # a validation split may lack a class
        found = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        if not found:
            raise ValueError(f"{class_dir}: empty class folder (no {'/'.join(IMG_EXTENSIONS)} files)")
        for path in found:
            problem = header_problem(path) if check_headers else None
            if problem is not None:
                if not skip_corrupt:
                    raise CorruptImageError(path, f"{problem} (set skip_corrupt to skip such files)")
                skipped.append(path)
                continue
            files.append(path)
            labels.append(label)
    return FolderSplit(split_dir, files, np.asarray(labels, dtype=np.int64), classes, skipped)


def _float_to_uint8(arr: np.ndarray) -> np.ndarray:
    """A floating-point image to uint8: [0, 1] data scaled by 255, [0, 255] data kept; anything else
    (NaN, negative or larger values) is refused, since no scale is safe to guess."""
    if not np.isfinite(arr).all():
        raise ValueError("floating-point image with NaN or infinite values; convert it to 8-bit first")
    low, high = float(arr.min()), float(arr.max())
    if low >= 0.0 and high <= 1.0:
        arr = arr * 255.0
    elif not (low >= 0.0 and high <= 255.0):
        raise ValueError(f"floating-point image with values in [{low:g}, {high:g}]; vitkit reads float images "
                         "in [0, 1] or [0, 255] only: convert it to 8-bit first")
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: palette via RGBA (keeps its transparency info), 16-bit scaled to 8-bit,
    32-bit float converted from [0, 1] or [0, 255] (else refused with ``ValueError``)."""
    return to_8bit(img).convert("RGB")


def to_8bit(img: Image.Image) -> Image.Image:
    """8-bit RGB or grayscale ("L") for any PIL mode: 16-bit and 32-bit float grayscale become "L"
    (scaled as :func:`to_rgb` says), palette and other modes RGB."""
    if img.mode in ("RGB", "L"):
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        bits = (getattr(img, "tag_v2", None) or {}).get(258, (None,))[0] if img.format == "TIFF" else None
        peak = 65535.0 if img.mode.startswith("I;16") or bits == 16 or arr.max() > 255 else 255.0
        if bits == 32 and arr.max() > 65535:
            peak = float(2 ** 32 - 1)
        img = Image.fromarray(np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(_float_to_uint8(np.asarray(img, dtype=np.float64)))
    if img.mode == "L":
        return img
    if img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("RGB")


_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@contextmanager
def decoding(path: Path | str) -> Iterator[None]:
    """Turn any decoder failure inside the block into a :class:`CorruptImageError` naming ``path``."""
    try:
        yield
    except CorruptImageError:
        raise
    except Image.DecompressionBombError as e:
        raise CorruptImageError(path, bomb_problem(e)) from e
    except _DECODE_ERRORS as e:
        raise CorruptImageError(path, f"cannot decode image ({type(e).__name__}: {e})") from e


def read_image(path: str | Path | BinaryIO, min_side: int | None = None, *, orient: bool = True,
               name: str | None = None) -> Tensor:
    """An image file as a uint8 tensor (C, H, W): C = 1 for grayscale files (8- or 16-bit, float), else
    3 (RGB); the eval transform turns it into the model's channels. With ``min_side``, a large JPEG is decoded at a
    reduced scale (1/2, 1/4, 1/8) whose shorter side is still at least ``min_side``: several times faster,
    but not the pixels of the full image resized (the eval transform decodes at full scale). ``orient``
    (default) turns the image as its EXIF orientation tag says (as ``PIL.ImageOps.exif_transpose``), as
    training crops and predict do. ``path`` may be an open binary file (an image read from a shard), ``name`` what
    errors call it."""
    path = Path(path) if isinstance(path, (str, os.PathLike)) else path
    with decoding(name or path), Image.open(path) as img:
        if min_side is not None and img.format == "JPEG":
            width, height = img.size
            shrink = min(width, height) / min_side
            if shrink >= 2:
                img.draft("RGB", (int(width / shrink) + 1, int(height / shrink) + 1))
        img.load()
        img = to_8bit(oriented(img) if orient else img)
    return _to_tensor(img)


_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_ORIENTATION, 1))
    except (OSError, ValueError, TypeError, SyntaxError):  # a damaged EXIF block: show the pixels as stored
        return 1


def oriented(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation tag says (what an image viewer shows), for training, eval and
    predict alike; an image without the tag is returned as is."""
    return ImageOps.exif_transpose(img) if _orientation(img) != 1 else img


def _to_tensor(img: Image.Image) -> Tensor:
    array = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(array[..., None] if array.ndim == 2 else array).permute(2, 0, 1)


class FolderImages(Dataset):
    """Map-style dataset over ``(index, epoch, position)`` keys, yielding ``(uint8 CHW, label, error, index)``.

    Training modes: ``random_resized_crop`` (box seeded by ``(seed, epoch, position)``) and
    ``resize_center`` (the central square, resized). Evaluation: pass ``eval_resize``, the
    geometry of the one eval transform (:class:`vitkit.data.transforms.EvalTransform`).
    ``error`` is "" for a decoded image; for an undecodable file it says why (and the image is zeros),
    so the main process raises or skips it, naming the file, instead of a worker dying.
    """

    def __init__(self, split: FolderSplit, size: int, mode: str = "eval", *, seed: int = 0,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 eval_resize: Callable[[str | Path], Tensor] | None = None) -> None:
        if mode == "eval" and eval_resize is None:
            raise ValueError("FolderImages in eval mode needs eval_resize (an EvalTransform's load)")
        self.split, self.size, self.mode, self.seed = split, size, mode, seed
        self.scale, self.ratio, self.eval_resize = scale, ratio, eval_resize

    def __len__(self) -> int:
        return len(self.split.files)

    def __getitem__(self, key: tuple[int, int, int] | int) -> tuple[Tensor, int, str, int]:
        index, epoch, position = key if isinstance(key, tuple) else (key, 0, key)
        path, label = self.split.files[index], int(self.split.labels[index])
        try:
            image = self.eval_resize(path) if self.mode == "eval" else _to_tensor(self._crop(path, epoch, position))
        except CorruptImageError as e:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), label, e.reason, index
        return image, label, "", index

    def _crop(self, path: Path, epoch: int, position: int) -> Image.Image:
        return train_crop(path, self.size, self.mode, seed=self.seed, epoch=epoch, position=position,
                          scale=self.scale, ratio=self.ratio)


def train_crop(source: Path | BinaryIO, size: int, mode: str, *, seed: int, epoch: int, position: int,
               scale: tuple[float, float], ratio: tuple[float, float], name: str | None = None) -> Image.Image:
    """A training image, decoded and cropped in a DataLoader worker: ``random_resized_crop`` (the box seeded by
    ``(seed, epoch, position)``, drawn on the image as it is shown: EXIF orientation applied) or ``resize_center``
    (the central square), ``size`` x ``size`` RGB. ``source`` is a file or an open binary file (an image of a
    shard), ``name`` what errors call it."""
    with decoding(name or source), Image.open(source) as img:
        width, height = img.size  # from the header: the box decides how far JPEG decoding may shrink
        turned = _orientation(img) in _TRANSPOSED
        if turned:  # the box is drawn on the image as it is shown (EXIF orientation applied)
            width, height = height, width
        if mode == "random_resized_crop":
            top, left, h, w = sample_boxes(rng(SAMPLE, seed, epoch, position), 1, height, width, scale, ratio)[0]
            shrink = min(w, h) / size
        else:
            shrink = min(width, height) / size
        if shrink >= 2 and img.format == "JPEG":
            img.draft("RGB", (int(img.width / shrink) + 1, int(img.height / shrink) + 1))
        img.load()
        img = to_rgb(oriented(img))
    if mode != "random_resized_crop":  # the central square, resized
        side = min(img.width, img.height)
        left, top = (img.width - side) / 2, (img.height - side) / 2
        return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    sx, sy = img.width / width, img.height / height  # draft decoding may have reduced the scale
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    return img.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=None)


def collate(batch: list[tuple[Tensor, int, str, int]]) -> tuple[Tensor, Tensor, list[str], Tensor]:
    """Stack images and labels; the error strings and data set indices travel along so that failed
    images can be named (or dropped, with ``skip_corrupt``)."""
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.int64)
    return images, labels, [b[2] for b in batch], torch.tensor([b[3] for b in batch], dtype=torch.int64)
