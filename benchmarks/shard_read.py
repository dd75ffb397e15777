"""Reading a 10,000-image ImageNet-style set as class folders vs webdataset shards (docs/data.md).

The set is built in ``--work`` (default /tmp/vitkit-shard-bench) from the real Imagenette subset: each of its
1,000 training JPEGs re-encoded 10 times (quality 80-98, half of them mirrored), so 10,000 distinct files in 10
class folders, plus a small val/ split; then written as shards with ``vitkit data shard``. Two measurements, each
with a cold page cache (``echo 3 > /proc/sys/vm/drop_caches``, as root; said when it cannot be done) and warm:

- ``read``: the bytes alone, in a random order for the folders (what a shuffled map-style dataset does) and in
  shard order for the shards (what the streaming reader does, through webdataset);
- ``train``: one epoch of vitkit's training stream (``build_data``: decode, random resized crop to 224, batched
  augmentation), 2 DataLoader workers, batch 64.

    PYTHONPATH=src python benchmarks/shard_read.py [--work DIR] [--shard-size 32MB]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps

from vitkit.data import DataConfig, build_data, load_split
from vitkit.data.shard_writer import write_shards
from vitkit.data.shards import locate_shards, parse_shard_size, read_samples
from vitkit.data.sources import shared_data_dir

COPIES = 10


def build_set(work: Path) -> Path:
    root = work / "imagenet10k"
    if (root / "done").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    source = Path(os.environ.get("VITKIT_DATA", shared_data_dir())) / "imagenette_subset"
    for split, copies in (("train", COPIES), ("val", 1)):
        data = load_split(f"folder:{source}", "train" if split == "train" else "val")
        for path, label in zip(data.files, data.labels):
            image = Image.open(path).convert("RGB")
            target = root / split / data.class_names[label]
            target.mkdir(parents=True, exist_ok=True)
            for k in range(copies):
                variant = ImageOps.mirror(image) if k % 2 else image
                variant.save(target / f"{path.stem}_{k}.jpg", quality=80 + 2 * k)
    (root / "done").write_text("ok\n")
    return root


def drop_caches() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_folder(root: Path) -> tuple[int, int]:
    files = sorted((root / "train").glob("*/*.jpg"))
    random.Random(0).shuffle(files)
    total = 0
    for path in files:
        total += len(path.read_bytes())
    return len(files), total


def read_shards(shards: Path) -> tuple[int, int]:
    count = total = 0
    for sample in read_samples(locate_shards(f"shards:{shards}").train):
        count += 1
        total += len(sample["jpg"])
    return count, total


def train_epoch(dataset: str) -> int:
    cfg = DataConfig(dataset, img_size=224, batch_size=64, num_workers=2, crop="random_resized_crop",
                     shuffle_buffer=1000)
    data = build_data(cfg, device="cpu", seed=0)
    return sum(len(images) for images, _ in data.train.batches(0))


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/vitkit-shard-bench")
    parser.add_argument("--shard-size", default="32MB")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    root = build_set(work)
    shards = work / "shards"
    if not (shards / "manifest.json").is_file():
        shutil.rmtree(shards, ignore_errors=True)
        write_shards(f"folder:{root}", shards, shard_size=parse_shard_size(args.shard_size), progress=False)
    n_tar = len(list(shards.glob("train-*.tar")))
    print(f"set: {root} ({sum(1 for _ in (root / 'train').glob('*/*.jpg'))} train JPEGs), shards: {n_tar} train "
          f"shards of <= {args.shard_size}; load {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    print("| what | reader | cache | seconds | images/s | MB/s |")
    print("|---|---|---|---|---|---|")
    cold = drop_caches()
    for cache in ("cold", "warm"):
        for label, fn, arg in (("read bytes", read_folder, root), ("read bytes", read_shards, shards)):
            if cache == "cold" and cold:
                drop_caches()
            seconds, (count, total) = timed(fn, arg)
            reader = "folders (random order)" if fn is read_folder else "shards (webdataset, sequential)"
            name = cache if cold or cache == "warm" else "warm (could not drop)"
            print(f"| {label} | {reader} | {name} | {seconds:.2f} | {count / seconds:.0f} | "
                  f"{total / seconds / 1e6:.1f} |")
    for cache in ("cold", "warm"):
        for reader, dataset in (("folders", f"folder:{root}"), ("shards", f"shards:{shards}")):
            if cache == "cold" and cold:
                drop_caches()
            seconds, count = timed(train_epoch, dataset)
            print(f"| train epoch (decode + crop 224, 2 workers) | {reader} | {cache} | {seconds:.1f} | "
                  f"{count / seconds:.0f} | |")
    print(f"load after: {os.getloadavg()[0]:.2f}; page cache dropped: {cold}")


if __name__ == "__main__":
    main()
