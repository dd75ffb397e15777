"""Labelled image arrays for evaluation, read from the local data folder.

This is the one place the evaluation code reads images; it will be swapped for ``vitkit.data`` once
the data module lands. Two layouts are understood:

- ``<root>/<name>/{train,test}.npz`` with ``images`` (uint8 N x H x W x C) and ``labels`` (int64 N);
- ``<root>/<name>/{train,val}/<class folder>/*.jpg`` (ImageFolder), decoded to uint8 arrays.

Class names come from ``<root>/<name>/meta.json`` (``classes``) when present, else folder names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass(frozen=True)
class LabeledImages:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]
    name: str  # "<dataset>/<split>", identifies the data in caches and reports


def default_data_root() -> Path:
    """``$VITKIT_DATA``, else ``../shared/data`` next to the working directory."""
    return Path(os.environ.get("VITKIT_DATA", Path.cwd().parent / "shared" / "data"))


def load_split(dataset: str | Path, split: str, *, root: str | Path | None = None,
               image_size: int | None = None) -> LabeledImages:
    """Read one split (``train``, ``test`` or ``val``) of a data set given by name or path.

    ``test`` falls back to ``val`` for ImageFolder data sets that have no test split.
    ``image_size`` resizes ImageFolder images while decoding (they can be large).
    """
    directory = Path(dataset)
    if not directory.is_dir():
        directory = Path(root) / str(dataset) if root is not None else default_data_root() / str(dataset)
    if not directory.is_dir():
        raise FileNotFoundError(f"data set {str(dataset)!r} not found: no folder {directory} "
                                "(pass a path, or set VITKIT_DATA to the folder holding the data sets)")
    npz = directory / f"{split}.npz"
    if npz.is_file():
        images, labels = _read_npz(npz)
        classes = _class_names(directory) or [str(i) for i in range(int(labels.max()) + 1)]
        return LabeledImages(images, labels, classes, f"{directory.name}/{split}")
    folder = directory / split
    if not folder.is_dir() and split == "test":
        folder = directory / "val"
    if not folder.is_dir():
        raise FileNotFoundError(f"{directory}: no {split}.npz and no {split}/ image folder")
    return _read_image_folder(folder, directory, image_size)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        missing = {"images", "labels"} - set(f.files)
        if missing:
            raise ValueError(f"{path}: missing array(s) {', '.join(sorted(missing))} (found {', '.join(f.files)})")
        images, labels = f["images"], f["labels"].astype(np.int64)
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"{path}: expected uint8 images (N, H, W, C) and N labels, got images "
                         f"{images.dtype} {images.shape} and labels {labels.shape}")
    return images, labels


def _class_names(directory: Path) -> list[str] | None:
    meta = directory / "meta.json"
    if meta.is_file():
        classes = json.loads(meta.read_text()).get("classes")
        if classes:
            return [str(c) for c in classes]
    return None


def _read_image_folder(folder: Path, directory: Path, image_size: int | None) -> LabeledImages:
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not class_dirs:
        raise FileNotFoundError(f"{folder}: no class folders")
    names = _class_names(directory)
    if names is None or len(names) != len(class_dirs):
        names = [p.name for p in class_dirs]
    images, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            with Image.open(file) as img:
                img = img.convert("RGB")
                if image_size is not None:
                    img = img.resize((image_size, image_size), Image.BICUBIC)
                images.append(np.asarray(img, dtype=np.uint8))
            labels.append(label)
    shapes = {a.shape for a in images}
    if len(shapes) != 1:
        raise ValueError(f"{folder}: images have different sizes {sorted(shapes)[:3]}...; pass image_size")
    return LabeledImages(np.stack(images), np.asarray(labels, dtype=np.int64), names,
                         f"{directory.name}/{folder.name}")
