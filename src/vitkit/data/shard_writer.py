"""``vitkit data shard SOURCE --out DIR``: any data set vitkit reads, written as webdataset tar shards with a
manifest and checksums (the layout is in :mod:`vitkit.data.shards`, which reads them)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, BinaryIO, Optional

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from vitkit.data.sampling import rng
from vitkit.data.shards import CHECKSUMS, FORMAT, MANIFEST, ShardError
from vitkit.data.splits import Split, load_split

SHARD_WRITE = 12  # stream tag of the write order (see vitkit.data.sampling)


def write_shards(dataset: str, out: str | Path, *, shard_size: int = 500_000_000, data_dir: Optional[str] = None,
                 seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Write both splits of ``dataset`` (a named set, ``folder:PATH`` or a data set directory) as tar shards in
    ``out``, with the manifest and checksums; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        raise ShardError(f"{out} already holds shards ({MANIFEST}); choose an empty --out directory")
    train = load_split(dataset, "train", data_dir=data_dir)
    val = load_split(dataset, "val", data_dir=data_dir, classes=train.class_names)
    manifest: dict[str, Any] = {"format": FORMAT, "version": 1, "source": dataset, "classes": list(train.class_names),
                                "shard_size": shard_size, "seed": seed, "splits": {}}
    for name, split in (("train", train), ("val", val)):
        order = rng(SHARD_WRITE, seed).permutation(len(split)) if name == "train" else np.arange(len(split))
        manifest["splits"][name] = _write_split(split, name, order, out, shard_size, progress)
    lines = [f"{s['sha256']}  {s['name']}\n" for split in manifest["splits"].values() for s in split["shards"]]
    (out / CHECKSUMS).write_text("".join(lines))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _encoded(split: Split, index: int) -> tuple[bytes, str, str]:
    """The encoded image ``index`` of a split: a file's bytes as they are, an in-memory image as PNG."""
    if split.files is not None:
        path = Path(split.files[index])
        ext = path.suffix.lower().lstrip(".")
        return path.read_bytes(), ("jpg" if ext == "jpeg" else ext), path.name
    image = np.asarray(split.images[index])
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue(), "png", f"{split.name}[{index}]"


def _write_split(split: Split, name: str, order: np.ndarray, out: Path, shard_size: int,
                 progress: bool) -> dict[str, Any]:
    shards: list[dict[str, Any]] = []
    writer: Optional[wds.TarWriter] = None
    stream: Optional[BinaryIO] = None
    current: dict[str, Any] = {}

    def close() -> None:
        if writer is not None:
            writer.close()
            stream.close()
            data = current["path"].read_bytes()
            shards.append({"name": current["path"].name, "samples": current["samples"], "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})

    bar = tqdm(order, desc=f"{name} shards", unit="img", disable=not progress)
    for position, index in enumerate(bar):
        image, ext, source = _encoded(split, int(index))
        label = int(split.labels[index])
        # headers (PAX: up to ~1.5 kB a member), padding, and tar's 10 kB write buffer and closing record
        if writer is None or (current["samples"] and stream.tell() + len(image) + 8192 + 2 * 10240 > shard_size):
            close()
            path = out / f"{name}-{len(shards):06d}.tar"
            stream = open(path, "wb")  # noqa: SIM115 - closed in close()
            writer = wds.TarWriter(stream, encoder=False)
            current = {"path": path, "samples": 0}
        sidecar = json.dumps({"label": label, "class": split.class_names[label], "source": source}).encode()
        writer.write({"__key__": f"{position:09d}", ext: image, "cls": str(label).encode(), "json": sidecar})
        current["samples"] += 1
    close()
    bar.close()
    counts = np.bincount(split.labels, minlength=split.num_classes).tolist()
    return {"samples": len(order), "class_counts": counts, "shards": shards}
