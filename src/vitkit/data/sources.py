"""Where data sets live and what they are: named ``.npz`` sets, their constants, and how to find them.

Layout of a named set (what ``vitkit data download`` writes)::

    ROOT/NAME/train.npz   images uint8 (N, H, W, C), labels int64 (N,)
    ROOT/NAME/test.npz
    ROOT/NAME/meta.json   {"classes": [...], ...}
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from vitkit.fileio import read_json_object
from vitkit.preprocessing import IMAGENET_MEAN as IMAGENET_MEAN  # re-exported
from vitkit.preprocessing import IMAGENET_STD as IMAGENET_STD

FOLDER_PREFIX = "folder:"


@dataclass(frozen=True)
class DatasetSpec:
    """Facts about a named data set: normalisation constants of its training split, native shape."""

    name: str
    num_classes: int
    img_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    torchvision_class: str
    """Name of the torchvision.datasets class that downloads it."""
    class_names: tuple[str, ...] | None = None
    """Names to store when torchvision's differ from the layout's (MNIST: "0", not "0 - zero")."""


NAMED_DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("cifar10", 10, 32, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "CIFAR10"),
        DatasetSpec("cifar100", 100, 32, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "CIFAR100"),
        DatasetSpec("mnist", 10, 28, 1, (0.1307,), (0.3081,), "MNIST", tuple(str(d) for d in range(10))),
        DatasetSpec("fashion_mnist", 10, 28, 1, (0.2860,), (0.3530,), "FashionMNIST"),
    )
}


class DatasetNotFoundError(FileNotFoundError):
    """A data set is not where vitkit looked; the message lists the places and how to get it."""


def user_cache_dir() -> Path:
    """Where ``vitkit data download`` writes by default: ``$XDG_CACHE_HOME/vitkit/data``, else
    ``~/.cache/vitkit/data``."""
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "vitkit" / "data"


def shared_data_dir() -> Path:
    """The project's shared data: ``shared/data`` beside the source checkout (``<repo>/../shared/data``)."""
    # src/vitkit/data/sources.py -> the repository root is three levels above the package.
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def data_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The directories searched for data sets, in order: an explicit ``data_dir`` (``--data-dir``) is
    the only one; else ``$VITKIT_DATA``, the user cache (where ``vitkit data download`` writes), and the
    project's shared data. Every command resolves data through this one list."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    roots = []
    if os.environ.get("VITKIT_DATA"):
        roots.append(Path(os.environ["VITKIT_DATA"]).expanduser())
    roots += [user_cache_dir(), shared_data_dir()]
    return roots


def default_download_root(data_dir: str | os.PathLike | None = None) -> Path:
    """Where ``vitkit data download`` writes: ``data_dir``, else ``VITKIT_DATA``, else the user cache."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("VITKIT_DATA"):
        return Path(os.environ["VITKIT_DATA"]).expanduser()
    return user_cache_dir()


def is_folder_dataset(dataset: str) -> bool:
    return dataset.startswith(FOLDER_PREFIX)


def named_spec(name: str) -> DatasetSpec:
    if name not in NAMED_DATASETS:
        raise ValueError(f"unknown data set {name!r}; named sets: {', '.join(NAMED_DATASETS)}; "
                         f"or use folder:PATH for a class-folder tree with train/ and val/")
    return NAMED_DATASETS[name]


def locate_named(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Return ``ROOT/name`` holding ``train.npz``; else raise an error naming every place searched."""
    named_spec(name)
    roots = data_roots(data_dir)
    for root in roots:
        if (root / name / "train.npz").is_file():
            return root / name
    looked = "\n".join(f"  {(root / name / 'train.npz').resolve()}" for root in roots)
    target = f" --data-dir {data_dir}" if data_dir is not None else ""
    raise DatasetNotFoundError(
        f"data set {name!r} not found; looked for:\n{looked}\n"
        f"get it with `vitkit data download {name}{target}` (needs internet), or point --data-dir / "
        f"VITKIT_DATA at a directory that holds {name}/train.npz")


def locate_folder(dataset: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Resolve ``folder:PATH``: PATH as given, else relative to each data root (``folder:imagenette``)."""
    raw = dataset[len(FOLDER_PREFIX):]
    if not raw:
        raise ValueError("dataset 'folder:' needs a path, e.g. folder:/data/imagenette")
    path = Path(raw).expanduser()
    candidates = [path] + ([root / raw for root in data_roots(data_dir)] if not path.is_absolute() else [])
    for candidate in candidates:
        if (candidate / "train").is_dir():
            return candidate
    looked = "\n".join(f"  {(c / 'train').resolve()}" for c in candidates)
    raise DatasetNotFoundError(f"folder data set {raw!r} not found: no train/ directory at\n{looked}\n"
                               f"a folder data set is PATH/train/<class>/*.jpg|png and PATH/val/<class>/...")


@dataclass(frozen=True)
class DatasetLocation:
    """Where a data set named on the command line lives and in which layout."""

    dataset: str
    layout: Literal["npz", "folder"]
    path: Path


def locate(dataset: str, data_dir: str | os.PathLike | None = None) -> DatasetLocation:
    """Resolve what the user named: a named set (``cifar10``), ``folder:PATH``, or (as the evaluation
    commands always accepted) a directory, given as a path or a name under a data root, that holds
    ``train.npz`` or a ``train/`` class-folder tree."""
    if is_folder_dataset(dataset):
        return DatasetLocation(dataset, "folder", locate_folder(dataset, data_dir))
    if dataset in NAMED_DATASETS:
        return DatasetLocation(dataset, "npz", locate_named(dataset, data_dir))
    path = Path(dataset).expanduser()
    candidates = [path] + ([root / dataset for root in data_roots(data_dir)] if not path.is_absolute() else [])
    for candidate in candidates:
        if (candidate / "train.npz").is_file():
            return DatasetLocation(dataset, "npz", candidate)
        if (candidate / "train").is_dir():
            return DatasetLocation(dataset, "folder", candidate)
    looked = "\n".join(f"  {c.resolve()}" for c in candidates)
    raise DatasetNotFoundError(
        f"data set {dataset!r} not found: not a named set ({', '.join(NAMED_DATASETS)}), and no train.npz or "
        f"train/ class folders at\n{looked}\nuse a named set, folder:PATH, or --data-dir / VITKIT_DATA")


def read_meta(directory: Path) -> dict:
    path = directory / "meta.json"
    if not path.is_file():
        return {}
    return read_json_object(path, what="a JSON object (the data set's classes and facts)")


def load_npz_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``split.npz`` (no pickles) and check it: images uint8 (N, H, W, C), labels int64 (N,).

    The arrays are cached (read-only) per file and modification time: a process that builds the
    pipeline several times (evaluation, tests) decompresses each file once.
    """
    path = directory / f"{split}.npz"
    if not path.is_file():
        raise DatasetNotFoundError(f"{path} is missing (the data set directory has no {split} split)")
    stat = path.stat()
    return _load_npz(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _load_npz(file: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    path = Path(file)
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            if {"images", "labels"} <= names:
                images, labels = npz["images"], npz["labels"]
    except Exception as e:  # a truncated or foreign file: zip, pickle and format errors alike
        raise ValueError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    if not {"images", "labels"} <= names:
        raise ValueError(f"{path}: needs arrays 'images' and 'labels', has {sorted(names)}")
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: 'images' must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{path}: 'labels' shape {labels.shape} does not match {images.shape[0]} images")
    labels = labels.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def class_names_of(directory: Path, num_classes: int) -> list[str]:
    classes = read_meta(directory).get("classes")
    if classes is None:
        return [str(i) for i in range(num_classes)]
    if len(classes) != num_classes:
        raise ValueError(f"{directory / 'meta.json'}: lists {len(classes)} classes, the data set has {num_classes}")
    return [str(c) for c in classes]


def npz_classes(location: DatasetLocation, labels: np.ndarray) -> list[str]:
    """The class names of an ``.npz`` data set: a named set's count, else ``meta.json``'s classes, else one per
    label value; ``labels`` (any split's) must lie among them."""
    directory = location.path
    spec = NAMED_DATASETS.get(location.dataset)
    meta_classes = read_meta(directory).get("classes")
    if spec is not None:
        num_classes = spec.num_classes
    elif meta_classes:
        num_classes = len(meta_classes)
    else:
        num_classes = int(labels.max()) + 1 if len(labels) else 0
    if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise ValueError(f"{directory}: labels outside [0, {num_classes}) for {location.dataset}")
    return class_names_of(directory, num_classes)


def npz_normalisation(location: DatasetLocation,
                      train_images: np.ndarray | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of an ``.npz`` set's training images: a named set's constants, else those
    ``meta.json`` records (``vitkit data download`` writes them), else computed from ``train_images`` (read
    from ``train.npz`` when not given)."""
    spec = NAMED_DATASETS.get(location.dataset)
    if spec is not None:
        return list(spec.mean), list(spec.std)
    meta = read_meta(location.path)
    if "train_pixel_mean_0_1" in meta and "train_pixel_std_0_1" in meta:
        return list(meta["train_pixel_mean_0_1"]), list(meta["train_pixel_std_0_1"])
    if train_images is None:
        train_images = load_npz_split(location.path, "train")[0]
    return channel_stats(train_images)


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, H, W, C), on the [0, 1] scale."""
    channels = images.shape[-1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk].reshape(-1, channels).astype(np.float64) / 255.0
        total += block.sum(0)
        squares += (block * block).sum(0)
    count = images.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    return [round(float(m), 4) for m in mean], [round(float(s), 4) for s in std]
