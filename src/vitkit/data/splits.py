"""``load_split``: one split of any data set vitkit reads, as labelled images, for the evaluation
commands (``fewshot``, ``analyze``) and notebooks. Training streams (:func:`vitkit.data.build_data`)
locate and scan data through the same functions.

A named ``.npz`` set is held in memory as uint8 arrays; a class-folder set as its file list, decoded
on demand. Either way, :meth:`Split.resized` hands out images through the one eval transform.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vitkit.data import sources
from vitkit.data.folder import SPLIT_NAMES, ClassMismatchError, find_split_dir, list_classes, scan_split
from vitkit.data.shards import is_shards_dataset, locate_shards, split_blobs
from vitkit.data.transforms import EvalTransform


@dataclass
class Split:
    """Labelled images of one split: in-memory ``images`` (uint8 N, H, W, C) or image ``files``."""

    name: str
    """``<data set>/<split>``; identifies the data in caches and reports."""
    labels: np.ndarray
    class_names: list[str]
    images: np.ndarray | None = None
    files: list[Path] | None = None
    blobs: list[bytes] | None = None
    """Encoded images held in memory (a ``shards:`` set), named by ``blob_names``."""
    blob_names: list[str] | None = None
    location: str = ""
    skipped: list[Path] = field(default_factory=list)
    """Unreadable files left out (``skip_corrupt``)."""

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: Sequence[int] | np.ndarray, tag: str) -> Split:
        """The images at ``indices``, in that order; ``tag`` goes into the name (caches tell subsets apart)."""
        idx = np.asarray(indices, dtype=np.int64)
        return replace(self, name=f"{self.name}[{tag}]", labels=self.labels[idx],
                       images=None if self.images is None else self.images[idx],
                       files=None if self.files is None else [self.files[i] for i in idx],
                       blobs=None if self.blobs is None else [self.blobs[i] for i in idx],
                       blob_names=None if self.blob_names is None else [self.blob_names[i] for i in idx])

    def resized(self, transform: EvalTransform, start: int = 0, stop: int | None = None) -> Tensor:
        """uint8 (B, C, h, w): images ``start:stop`` through the transform's geometry (channels, resize, crop)."""
        stop = len(self) if stop is None else min(stop, len(self))
        if self.images is not None:
            batch = torch.from_numpy(np.array(self.images[start:stop])).permute(0, 3, 1, 2)  # a writable copy
            return transform.resize(batch)
        if self.blobs is not None:
            return torch.stack([transform.load(io.BytesIO(blob), name=name)
                                for blob, name in zip(self.blobs[start:stop], self.blob_names[start:stop])])
        return torch.stack([transform.load(path) for path in self.files[start:stop]])

    def batches(self, transform: EvalTransform, batch_size: int) -> Iterator[Tensor]:
        """Normalised float model inputs (B, C, h, w), in order."""
        for start in range(0, len(self), batch_size):
            yield transform.normalize(self.resized(transform, start, start + batch_size))

    def fingerprint(self) -> str:
        """A hash of the labels and the pixels (in-memory) or the files' names, sizes and times."""
        h = hashlib.sha256(self.name.encode())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        if self.images is not None:
            h.update(str(self.images.shape).encode())
            h.update(np.ascontiguousarray(self.images).tobytes())
        elif self.blobs is not None:
            for name, blob in zip(self.blob_names, self.blobs):
                h.update(name.encode())
                h.update(hashlib.sha256(blob).digest())
        else:
            for path in self.files:
                stat = os.stat(path)
                h.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return h.hexdigest()


def _split_name(split: str) -> str:
    if split not in ("train", "val", "test"):
        raise ValueError(f"split {split!r}: choose train, val or test")
    return "train" if split == "train" else "val"


def load_split(dataset: str, split: str, *, data_dir: str | os.PathLike | None = None,
               classes: Sequence[str] | None = None, require_all_classes: bool = False,
               skip_corrupt: bool = False) -> Split:
    """One split (``train``, or ``test``/``val``, the evaluation split) of a named set, ``folder:PATH``,
    or a data set directory (see :func:`vitkit.data.sources.locate`); data roots: ``data_dir``, else
    ``$VITKIT_DATA``, the user cache, the project's shared data.

    Labels are positions in ONE class list: ``classes`` when given (the training split's, or the
    model's), else the training split's. A class folder outside that list is an error that names it;
    with ``require_all_classes`` so is a class the split lacks.
    """
    which = _split_name(split)
    if is_shards_dataset(dataset):
        return _shards_split(dataset, which, data_dir, classes)
    location = sources.locate(dataset, data_dir)
    if location.layout == "npz":
        return _npz_split(location, which, classes)
    root = location.path
    if classes is None:
        classes = list_classes(find_split_dir(root, "train"))
    split_dir = find_split_dir(root, which)
    found = scan_split(split_dir, list(classes), skip_corrupt=skip_corrupt)
    if require_all_classes:
        missing = [c for c in classes if not (split_dir / c).is_dir()]
        if missing:
            raise ClassMismatchError(f"{split_dir}: lacks class folder(s) {', '.join(missing)} of the "
                                     f"{len(classes)} training classes; the splits must have the same classes")
    tag = f"{dataset}/{split_dir.name}"
    return Split(tag, found.labels, list(classes), files=found.files, location=str(split_dir),
                 skipped=found.skipped)


def _shards_split(dataset: str, which: str, data_dir: str | os.PathLike | None,
                  classes: Sequence[str] | None) -> Split:
    shards = locate_shards(dataset, None if data_dir is None else str(data_dir))
    if classes is not None and list(classes) != shards.classes:
        raise ClassMismatchError(f"{shards.root}: classes {shards.classes} differ from the expected {list(classes)}")
    blobs, labels, names = split_blobs(shards, which)
    return Split(f"{dataset}/{which}", labels, shards.classes, blobs=blobs, blob_names=names,
                 location=str(shards.root))


def _npz_split(location: sources.DatasetLocation, which: str, classes: Sequence[str] | None) -> Split:
    directory = location.path
    file_split = "train" if which == "train" else "test"
    if which != "train" and not (directory / "test.npz").is_file() and (directory / "val.npz").is_file():
        file_split = "val"
    images, labels = sources.load_npz_split(directory, file_split)
    names = sources.npz_classes(location, labels)
    if classes is not None and list(classes) != names:
        raise ClassMismatchError(f"{directory}: classes {names} differ from the expected {list(classes)}")
    return Split(f"{location.dataset}/{file_split}", labels, names, images=images,
                 location=str(directory / f"{file_split}.npz"))


__all__ = ["ClassMismatchError", "SPLIT_NAMES", "Split", "load_split"]
