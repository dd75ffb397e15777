"""``vitkit data info NAME``: where a data set is and what it holds, without decoding its pixels (a
folder set's files get the cheap header check of training: unreadable ones are listed, not counted)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from vitkit.data import sources
from vitkit.data.folder import find_split_dir, list_classes, scan_split
from vitkit.data.shards import is_shards_dataset, locate_shards


def _npz_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of array ``key`` in an ``.npz``, read from the ``.npy`` header only."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        shape, _, _ = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                       else np.lib.format.read_array_header_2_0(f))
    return tuple(shape)


def dataset_summary(dataset: str, data_dir: str | Path | None = None) -> dict[str, Any]:
    """Location, classes, image shape and per-class counts of each split of ``dataset``."""
    if is_shards_dataset(dataset):
        shards = locate_shards(dataset, None if data_dir is None else str(data_dir))
        splits = {name: info.get("class_counts") or [0] * len(shards.classes)
                  for name, info in shards.manifest["splits"].items()}
        return {"dataset": dataset, "location": str(shards.root), "classes": shards.classes,
                "image_shape": f"any (resized); {len(shards.train)} train + {len(shards.val)} val shards",
                "splits": splits, "mean": list(sources.IMAGENET_MEAN), "std": list(sources.IMAGENET_STD)}
    location = sources.locate(dataset, data_dir)  # the resolution every command uses
    if location.layout == "folder":
        root = location.path
        classes = list_classes(find_split_dir(root, "train"))
        splits, unreadable = {}, {}
        for split in ("train", "val"):
            # the cheap header check of training, so unreadable files are counted as such, not as images
            found = scan_split(find_split_dir(root, split), classes, skip_corrupt=True)
            splits[split] = np.bincount(found.labels, minlength=len(classes)).tolist()
            unreadable[split] = [str(p) for p in found.skipped]
        return {"dataset": dataset, "location": str(root), "classes": classes, "image_shape": "any (resized)",
                "splits": splits, "unreadable": unreadable,
                "mean": list(sources.IMAGENET_MEAN), "std": list(sources.IMAGENET_STD)}
    directory = location.path
    labels, shape = {}, None
    for split in ("train", "val", "test"):
        path = directory / f"{split}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as npz:
                labels[split] = npz["labels"].astype(np.int64)
            shape = shape or _npz_shape(path, "images")[1:]
    classes = sources.npz_classes(location, np.concatenate(list(labels.values())))
    splits = {split: np.bincount(y, minlength=len(classes)).tolist() for split, y in labels.items()}
    mean, std = sources.npz_normalisation(location)
    return {"dataset": dataset, "location": str(directory), "classes": classes,
            "image_shape": "x".join(map(str, shape)) if shape else "?", "splits": splits,
            "mean": list(mean), "std": list(std)}


def format_summary(summary: dict[str, Any]) -> str:
    """A short human-readable table of :func:`dataset_summary`."""
    classes, splits = summary["classes"], summary["splits"]
    lines = [f"{summary['dataset']}: {summary['location']}",
             f"  images: {summary['image_shape']}, {len(classes)} classes, "
             f"mean {summary['mean']}, std {summary['std']}",
             "  " + "  ".join(f"{split} {sum(counts)}" for split, counts in splits.items())]
    width = max(5, *(len(c) for c in classes))
    lines.append(f"  {'class':{width}s}" + "".join(f"{split:>8s}" for split in splits))
    for i, name in enumerate(classes):
        lines.append(f"  {name:{width}s}" + "".join(f"{counts[i]:8d}" for counts in splits.values()))
    for split, files in (summary.get("unreadable") or {}).items():
        if files:
            shown = ", ".join(files[:5]) + (", ..." if len(files) > 5 else "")
            lines.append(f"  {split}: {len(files)} unreadable file(s), not counted above: {shown}")
    return "\n".join(lines)
