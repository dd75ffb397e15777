"""Class-folder data sets (``PATH/train/<class>/*.jpg``): scanning, robust decoding, worker-side crops.

Every image is converted to RGB (grayscale, palette, CMYK, RGBA, 16-bit), decoded at a reduced JPEG
scale when that is enough for the output size, and cropped/resized to a square uint8 tensor in the
DataLoader's worker processes. The random crop of an image is seeded by ``(seed, epoch, position)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from vitkit.data.augment import sample_boxes
from vitkit.data.sampling import SAMPLE, rng

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "test")}


class CorruptImageError(ValueError):
    """An image file cannot be decoded; the message names it."""


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


def _header_ok(path: Path) -> bool:
    """Cheap check that ``path`` starts like an image PIL can read (the full decode happens later)."""
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - parsing the header is the check
        return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


def scan_split(split_dir: Path, classes: list[str], *, skip_corrupt: bool = False,
               check_headers: bool = True) -> FolderSplit:
    """List image files per class folder. An empty class folder or an unreadable header is an error
    (or, for unreadable files with ``skip_corrupt``, skipped and recorded)."""
    files: list[Path] = []
    labels: list[int] = []
    skipped: list[Path] = []
    present = {e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")}
    unknown = sorted(present - set(classes))
    if unknown:
        raise ValueError(f"{split_dir}: class folder(s) {', '.join(unknown)} are not in the training classes")
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue  # a validation split may lack a class
        found = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        if not found:
            raise ValueError(f"{class_dir}: empty class folder (no {'/'.join(IMG_EXTENSIONS)} files)")
        for path in found:
            if check_headers and not _header_ok(path):
                if not skip_corrupt:
                    raise CorruptImageError(f"{path}: not a readable image (pass skip_corrupt to skip such files)")
                skipped.append(path)
                continue
            files.append(path)
            labels.append(label)
    return FolderSplit(split_dir, files, np.asarray(labels, dtype=np.int64), classes, skipped)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: palette via RGBA (keeps its transparency info), 16-bit scaled to 8-bit."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("RGB")


_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@contextmanager
def decoding(path: Path) -> Iterator[None]:
    """Turn any decoder failure inside the block into a :class:`CorruptImageError` naming ``path``."""
    try:
        yield
    except _DECODE_ERRORS as e:
        raise CorruptImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def load_rgb(path: Path, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``path`` to an RGB image, optionally at a reduced JPEG scale no smaller than ``draft_size``."""
    with decoding(path), Image.open(path) as img:
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size)
        img.load()
        return to_rgb(img)


def _to_tensor(img: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def resize_center_crop(img: Image.Image, size: int, crop_pct: float = 1.0) -> Image.Image:
    """Resize the shorter side to ``size / crop_pct`` and take the central ``size`` x ``size`` square."""
    scale = (size / crop_pct) / min(img.width, img.height)
    crop = size / scale
    left, top = (img.width - crop) / 2, (img.height - crop) / 2
    return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + crop, top + crop))


def load_eval_image(path: str | Path, *, img_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                    crop_pct: float = 1.0) -> Tensor:
    """One image file as the model sees it at evaluation: float (C, H, W), normalised, ``len(mean)``
    channels (1 = grayscale, 3 = RGB). For ``vitkit predict`` and notebooks."""
    img = resize_center_crop(load_rgb(Path(path)), img_size, crop_pct)
    if len(mean) == 1:
        img = img.convert("L")
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).view(img_size, img_size, -1).permute(2, 0, 1)
    return (x / 255.0 - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


class FolderImages(Dataset):
    """Map-style dataset over ``(index, position)`` keys, yielding ``(uint8 CHW, label, ok)``.

    ``mode`` is ``random_resized_crop`` (box seeded by ``(seed, epoch, position)``), ``resize_crop``
    (shorter side to ``size / crop_pct``, then center crop) or ``resize_center`` (crop_pct = 1).
    ``ok`` is False (and the image zeros) for an undecodable file when ``skip_corrupt`` is set.
    """

    def __init__(self, split: FolderSplit, size: int, mode: str, *, seed: int = 0, crop_pct: float = 1.0,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 skip_corrupt: bool = False) -> None:
        self.split, self.size, self.mode, self.seed = split, size, mode, seed
        self.crop_pct, self.scale, self.ratio, self.skip_corrupt = crop_pct, scale, ratio, skip_corrupt

    def __len__(self) -> int:
        return len(self.split.files)

    def __getitem__(self, key: tuple[int, int, int] | int) -> tuple[Tensor, int, bool]:
        index, epoch, position = key if isinstance(key, tuple) else (key, 0, key)
        path, label = self.split.files[index], int(self.split.labels[index])
        try:
            img = self._crop(path, epoch, position)
        except CorruptImageError:
            if not self.skip_corrupt:
                raise
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), label, False
        return _to_tensor(img), label, True

    def _crop(self, path: Path, epoch: int, position: int) -> Image.Image:
        size = self.size
        with decoding(path), Image.open(path) as img:
            width, height = img.size  # from the header: the box decides how far JPEG decoding may shrink
            if self.mode == "random_resized_crop":
                top, left, h, w = sample_boxes(rng(SAMPLE, self.seed, epoch, position), 1, height, width,
                                               self.scale, self.ratio)[0]
                shrink = min(w, h) / size
            else:
                shrink = min(width, height) * self.crop_pct / size
            if shrink >= 2 and img.format == "JPEG":
                img.draft("RGB", (int(width / shrink) + 1, int(height / shrink) + 1))
            img.load()
            img = to_rgb(img)
        if self.mode != "random_resized_crop":
            return resize_center_crop(img, size, self.crop_pct)
        sx, sy = img.width / width, img.height / height  # draft decoding may have reduced the scale
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        return img.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=None)


def collate(batch: list[tuple[Tensor, int, bool]]) -> tuple[Tensor, Tensor, Tensor]:
    """Stack images and labels; the ``ok`` flags travel along so skipped images can be dropped."""
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.int64)
    ok = torch.tensor([b[2] for b in batch], dtype=torch.bool)
    return images, labels, ok
