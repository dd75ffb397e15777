"""``vitkit data download NAME``: fetch a named data set with torchvision and store vitkit's layout.

The downloader is torchvision's; the conversion (:func:`convert_torchvision_dataset`) and the writing
(:func:`write_named_dataset`) are ours, so the result is the same ``train.npz`` / ``test.npz`` /
``meta.json`` layout as the shared data, whichever torchvision version fetched it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torchvision
import torchvision.datasets as tv_datasets

from vitkit.data.sources import DatasetSpec, channel_stats, default_download_root, named_spec
from vitkit.errors import DownloadError
from vitkit.fileio import atomic_path, atomic_write_text


def convert_torchvision_dataset(dataset: Any, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Arrays of a torchvision classification dataset with ``.data`` and ``.targets``.

    ``.data`` may be a numpy array (CIFAR: N x H x W x C) or a tensor (MNIST: N x H x W); ``.targets``
    a list or a tensor. Returns images uint8 (N, H, W, C) and labels int64 (N,), checked against ``spec``.
    """
    name = type(dataset).__name__
    if not hasattr(dataset, "data") or not hasattr(dataset, "targets"):
        raise ValueError(f"{name}: expected a dataset with .data and .targets")
    data = dataset.data
    images = data.numpy() if hasattr(data, "numpy") else np.asarray(data)
    targets = dataset.targets
    labels = np.asarray(targets.numpy() if hasattr(targets, "numpy") else targets, dtype=np.int64)
    if images.ndim == 3:
        images = images[..., None]
    expected = (spec.img_size, spec.img_size, spec.in_chans)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(f"{name}: images are {images.dtype} {images.shape}, "
                         f"expected uint8 (N, {', '.join(map(str, expected))})")
    if labels.shape != (len(images),):
        raise ValueError(f"{name}: {len(labels)} targets for {len(images)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ValueError(f"{name}: labels outside [0, {spec.num_classes})")
    return np.ascontiguousarray(images), labels


def write_split(directory: Path, split: str, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write ``split.npz`` atomically (a crash leaves either the old file or none, never half of one)."""
    path = directory / f"{split}.npz"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, images=images, labels=labels)
    return path


def write_named_dataset(directory: Path, spec: DatasetSpec, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                        classes: Sequence[str], source: dict[str, Any]) -> Path:
    """Store ``splits`` ({"train": (images, labels), "test": ...}) and a ``meta.json`` in ``directory``."""
    if len(classes) != spec.num_classes:
        raise ValueError(f"{spec.name}: {len(classes)} class names for {spec.num_classes} classes")
    directory.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        write_split(directory, split, images, labels)
    mean, std = channel_stats(splits["train"][0])
    meta = {
        "name": spec.name,
        "classes": list(classes),
        "source": source,
        "channels": "RGB, C=3" if spec.in_chans == 3 else "grayscale, C=1",
        "counts": {split: {"total": int(len(labels)),
                           "per_class": np.bincount(labels, minlength=spec.num_classes).tolist()}
                   for split, (_, labels) in splits.items()},
        "image_shape": [spec.img_size, spec.img_size, spec.in_chans],
        "train_pixel_mean_0_1": mean,
        "train_pixel_std_0_1": std,
    }
    atomic_write_text(json.dumps(meta, indent=1) + "\n", directory / "meta.json")
    return directory


def is_complete(directory: Path) -> bool:
    return all((directory / f).is_file() for f in ("train.npz", "test.npz", "meta.json"))


def _remove_created(created: list[Path]) -> None:
    """Undo the directories a failed download made (torchvision's partial files in them included), so that
    the data root does not show an empty ``NAME/raw`` as if the set were there."""
    for directory in reversed(created):
        shutil.rmtree(directory, ignore_errors=True)


def download(name: str, data_dir: str | Path | None = None, *, keep_raw: bool = False, force: bool = False) -> Path:
    """Download ``name`` with torchvision into ``DATA_DIR/name`` (``train.npz``, ``test.npz``, ``meta.json``).

    A complete copy already there is kept unless ``force``. The raw files go to ``DATA_DIR/name/raw``
    and are removed after a successful conversion unless ``keep_raw``; a failed run can be repeated.
    """

    spec = named_spec(name)
    directory = default_download_root(data_dir) / name
    if is_complete(directory) and not force:
        return directory
    raw = directory / "raw"
    created = [d for d in (directory, raw) if not d.exists()]
    dataset_class = getattr(tv_datasets, spec.torchvision_class)
    splits, classes = {}, None
    for split, train in (("train", True), ("test", False)):
        try:
            dataset = dataset_class(root=str(raw), train=train, download=True)
        except Exception as e:  # network, checksum or disk errors: say what failed and where
            _remove_created(created)
            raise DownloadError(f"downloading {name} ({spec.torchvision_class}, {split}) into {raw} failed: "
                                f"{type(e).__name__}: {e}") from e
        splits[split] = convert_torchvision_dataset(dataset, spec)
        classes = list(spec.class_names or dataset.classes)
    source = {"kind": "torchvision", "class": f"torchvision.datasets.{spec.torchvision_class}",
              "torchvision_version": torchvision.__version__}
    write_named_dataset(directory, spec, splits, classes, source)
    if not keep_raw:
        shutil.rmtree(raw, ignore_errors=True)
    return directory
