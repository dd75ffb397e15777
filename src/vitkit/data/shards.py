"""Streaming shards: any data set vitkit reads, written as webdataset tar shards, and read back as a stream.

``vitkit data shard SOURCE --out DIR`` (:mod:`vitkit.data.shard_writer`) writes ``DIR/train-000000.tar ...``
and ``DIR/val-000000.tar ...`` (each at most ``--shard-size`` bytes), ``DIR/manifest.json`` (classes, and per
shard its samples, bytes and SHA-256) and ``DIR/SHA256SUMS`` (``sha256sum -c`` reads it). A sample is
``KEY.<ext>`` (the encoded image: a folder's file as it was, a named set's image as PNG), ``KEY.cls`` (the class
index) and ``KEY.json`` (``label``, ``class``, ``source``). Training samples are written in a seeded random order,
so every shard mixes the classes.

``shards:DIR`` (or ``shards:DIR/train-{000000..000099}.tar``, a brace pattern of training shards) is then a data
set like ``folder:PATH``. Training reads it sequentially through the ``webdataset`` library, which opens the tar
files and groups their members into samples:

- at each epoch the shards are put in an order seeded by ``(seed, epoch)`` and dealt to ranks (``order[rank::world]``)
  and then to DataLoader workers (``[worker::workers]``); each worker reads its shards round and round, through a
  shuffle buffer seeded by ``(seed, epoch, rank, worker)``, and batches them;
- the DataLoader takes batches from its workers in turn, so micro-batch ``b`` of a rank is batch ``b // workers``
  of worker ``b % workers``: the run knows which samples it has read, and a run resumed at micro-batch ``b``
  has each worker skip (read, not decode) what it had already delivered, then continue with the same samples;
- an epoch is ``samples // global batch`` steps, as for every source; a rank whose shards run out first wraps
  around to its first shard (the sample mix of an epoch is only as even as the shards' sizes);
- each image is decoded and cropped by the same code as a folder image (random resized crop seeded by
  ``(seed, epoch, position)``), then finished by the same batched augmentation on the device.

Exact resumption needs the same number of processes and ``data.num_workers``; on another number the run resumes at
the same step with that world's deal of shards. Nothing in a shard is unpickled: images are decoded by PIL, the
class index and the JSON sidecar are parsed as text.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import random
import re
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitkit.data import sources
from vitkit.data.augment import BatchAugmenter
from vitkit.data.folder import CorruptImageError, _to_tensor, train_crop
from vitkit.data.sampling import LOADER, batch_positions, eval_shard, rng, seed_int, steps_per_epoch
from vitkit.data.transforms import EvalTransform
from vitkit.fileio import read_json_object

SHARDS_PREFIX = "shards:"
MANIFEST = "manifest.json"
CHECKSUMS = "SHA256SUMS"
FORMAT = "vitkit-shards"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
SHARD_ORDER, SHARD_BUFFER = 10, 11  # stream tags (see vitkit.data.sampling)


class ShardError(ValueError):
    """A shard directory that is not one, or a shard that does not match its manifest."""


def is_shards_dataset(dataset: str) -> bool:
    return dataset.startswith(SHARDS_PREFIX)


# ------------------------------------------------------------------------------------------ writing
def parse_shard_size(text: str) -> int:
    """``500MB``, ``1GiB``, ``64M`` or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not match:
        raise ValueError(f"--shard-size {text!r}: expected a size such as 500MB, 1GiB or 100000000")
    base = 1024 if match.group(3) else 1000
    power = " KMGT".index(match.group(2).upper() or " ")
    size = int(float(match.group(1)) * base ** power)
    if size < 1:
        raise ValueError(f"--shard-size {text!r}: must be at least one byte")
    return size


# ------------------------------------------------------------------------------------------ locating
@dataclass(frozen=True)
class ShardSet:
    """A shard directory: its manifest, and the shard files of each split."""

    root: Path
    manifest: dict[str, Any]
    train: list[Path]
    val: list[Path]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    def samples(self, split: str) -> int:
        counts = {s["name"]: s["samples"] for s in self.manifest["splits"][split]["shards"]}
        return sum(counts[p.name] for p in (self.train if split == "train" else self.val))


def locate_shards(dataset: str, data_dir: Optional[str] = None) -> ShardSet:
    """Resolve ``shards:DIR`` or ``shards:DIR/train-{000000..000009}.tar`` (DIR as given, else under each data
    root) to its manifest and shard files; a shard the manifest does not list is an error naming it."""
    spec = dataset[len(SHARDS_PREFIX):] if is_shards_dataset(dataset) else dataset
    if not spec:
        raise ValueError("dataset 'shards:' needs a directory, e.g. shards:/data/imagenet-shards")
    pattern = "{" in spec or spec.endswith(".tar")
    directory = Path(spec).parent if pattern else Path(spec)
    candidates = [directory] + ([root / directory for root in sources.data_roots(data_dir)]
                                if not directory.is_absolute() else [])
    root = next((c for c in candidates if (c / MANIFEST).is_file()), None)
    if root is None:
        looked = "\n".join(f"  {(c / MANIFEST).resolve()}" for c in candidates)
        raise sources.DatasetNotFoundError(f"shard set {spec!r} not found: no {MANIFEST} at\n{looked}\n"
                                           "write one with `vitkit data shard SOURCE --out DIR`")
    manifest = read_json_object(root / MANIFEST, what="a shard manifest (a JSON object)", error=ShardError)
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{root / MANIFEST}: not a vitkit shard manifest (no format '{FORMAT}')")
    listed = {name: [root / s["name"] for s in manifest["splits"][name]["shards"]] for name in ("train", "val")}
    train = listed["train"]
    if pattern:
        train = [root / Path(p).name for p in braceexpand.braceexpand(Path(spec).name)]
        unknown = [p.name for p in train if p not in listed["train"]]
        if unknown:
            raise ShardError(f"{dataset}: {unknown[0]} is not a training shard of {root / MANIFEST}")
    for path in train + listed["val"]:
        if not path.is_file():
            raise sources.DatasetNotFoundError(f"{path}: listed in {root / MANIFEST} but missing")
    return ShardSet(root, manifest, train, listed["val"])


def verify_shards(shards: ShardSet) -> list[str]:
    """Names of the shards whose SHA-256 differs from the manifest's (empty: all intact)."""
    expected = {s["name"]: s["sha256"] for split in shards.manifest["splits"].values() for s in split["shards"]}
    bad = []
    for path in shards.train + shards.val:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != expected[path.name]:
            bad.append(path.name)
    return bad


# ------------------------------------------------------------------------------------------ samples
def _image_of(sample: dict[str, Any]) -> tuple[bytes, str]:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext], ext
    raise CorruptImageError(f"{sample.get('__url__')}:{sample.get('__key__')}", "sample without an image")


def _name(sample: dict[str, Any]) -> str:
    return f"{sample.get('__url__')}:{sample.get('__key__')}"


def _label(sample: dict[str, Any]) -> int:
    return int(sample["cls"].decode() if isinstance(sample["cls"], bytes) else sample["cls"])


def read_samples(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """The samples of ``paths`` (read lazily, so an endless cycle of shards works) in order, as webdataset groups
    tar members: ``__key__``, ``__url__`` and raw bytes per extension."""
    return wds.tarfile_samples({"url": str(p)} for p in paths)


def _ignore_stop_signals(worker_id: int) -> None:
    """As the folder workers (see :mod:`vitkit.data.pipeline`): a signal to the process group is for the main
    process to handle (save, then exit)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _EpochSamples(IterableDataset):
    """One rank's training batches of one epoch, from the shards dealt to each DataLoader worker (see the
    module docstring); yields ``(uint8 images, labels, errors, names)``, decoded and cropped in the worker."""

    def __init__(self, stream: ShardTrainStream, epoch: int, start_step: int, workers: int) -> None:
        self.stream, self.epoch, self.start_step, self.workers = stream, epoch, start_step, workers

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, list[str], list[str]]]:
        s = self.stream
        info = get_worker_info()
        # The loader asks its workers in turn from worker 0 on; resumed at micro-batch b, worker 0 plays the role of
        # the worker that delivered micro-batch b in the first place, and so on round.
        worker = ((info.id if info is not None else 0) + self.start_step) % self.workers
        order = rng(SHARD_ORDER, s.seed, self.epoch).permutation(len(s.shards))
        mine = [s.shards[i] for i in order[s.rank::s.world_size]][worker::self.workers]
        done = len(range(worker, self.start_step, self.workers))  # batches this worker delivered before
        samples = wds.filters.shuffle(bufsize=s.buffer, initial=s.buffer, rng=random.Random(
            seed_int(SHARD_BUFFER, s.seed, self.epoch, s.rank, worker)))(read_samples(_forever(mine)))
        samples = itertools.islice(samples, done * s.batch_size, None)  # read, not decoded
        for k in itertools.count(done):
            batch = list(itertools.islice(samples, s.batch_size))
            step = k * self.workers + worker  # this rank's micro-batch
            yield s.decode(batch, self.epoch, batch_positions(step, s.batch_size, s.rank, s.world_size))


def _forever(paths: list[Path]) -> Iterator[Path]:
    return itertools.chain.from_iterable(itertools.repeat(paths))


class ShardTrainStream:
    """Training batches of a shard set: the same ``batches(epoch, start_step)`` as every training stream."""

    def __init__(self, shards: ShardSet, augmenter: BatchAugmenter, *, img_size: int, mode: str, scale: tuple,
                 ratio: tuple, batch_size: int, seed: int, rank: int, world_size: int, num_workers: int,
                 buffer: int, device: torch.device, skip_corrupt: bool = False) -> None:
        if len(shards.train) < world_size:
            raise ShardError(f"{shards.root}: {len(shards.train)} training shard(s) for {world_size} processes; "
                             "write smaller shards (--shard-size) so that every process has one")
        self.shards, self.augmenter = shards.train, augmenter
        self.num_samples = shards.samples("train")
        self.img_size, self.mode, self.scale, self.ratio = img_size, mode, tuple(scale), tuple(ratio)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.workers = min(num_workers, len(shards.train) // world_size)
        self.buffer, self.device, self.skip_corrupt = buffer, device, skip_corrupt
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return steps_per_epoch(self.num_samples, self.batch_size, self.world_size)

    def decode(self, batch: list[dict[str, Any]], epoch: int, positions: np.ndarray,
               ) -> tuple[Tensor, Tensor, list[str], list[str]]:
        """Decode and crop one batch (in a worker) exactly as folder images are."""
        images, labels, errors, names = [], [], [], []
        for sample, position in zip(batch, positions):
            names.append(_name(sample))
            labels.append(_label(sample))
            try:
                data, _ = _image_of(sample)
                crop = train_crop(io.BytesIO(data), self.img_size, self.mode, seed=self.seed, epoch=epoch,
                                  position=int(position), scale=self.scale, ratio=self.ratio, name=names[-1])
                images.append(_to_tensor(crop))
                errors.append("")
            except CorruptImageError as e:
                images.append(torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8))
                errors.append(e.reason)
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64), errors, names

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        generator = torch.Generator()  # not the global RNG: a resumed run draws the masks an unbroken one does
        generator.manual_seed(seed_int(LOADER, self.seed, epoch))
        loader = DataLoader(_EpochSamples(self, epoch, start_step, max(self.workers, 1)), batch_size=None,
                            num_workers=self.workers, worker_init_fn=_ignore_stop_signals,
                            prefetch_factor=4 if self.workers else None, pin_memory=self.device.type == "cuda",
                            generator=generator)
        global_size = self.batch_size * self.world_size
        all_rows = np.arange(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for step, (images, labels, errors, names) in zip(range(start_step, len(self)), loader):
            rows = all_rows
            keep = _check(errors, names, self.skip_corrupt, self.skipped)
            if keep is not None:
                images, labels, rows = images[keep], labels[keep], all_rows[keep.numpy()]
                if len(rows) == 0:
                    continue
            yield self.augmenter.train(images.to(self.device, non_blocking=True),
                                       labels.to(self.device, non_blocking=True), epoch=epoch, step=step, rows=rows,
                                       global_size=global_size, rank=self.rank)


def _check(errors: list[str], names: list[str], skip_corrupt: bool, skipped: list[str]) -> Optional[Tensor]:
    bad = [(name, why) for name, why in zip(names, errors) if why]
    if not bad:
        return None
    if not skip_corrupt:
        raise CorruptImageError(*bad[0])
    skipped.extend(name for name, _ in bad)
    return torch.tensor([not why for why in errors], dtype=torch.bool)


class ShardValStream:
    """Evaluation batches of this rank's contiguous part of the validation shards (read in order), nothing
    dropped."""

    def __init__(self, shards: ShardSet, transform: EvalTransform, *, batch_size: int, rank: int, world_size: int,
                 device: torch.device, skip_corrupt: bool = False) -> None:
        self.paths, self.transform, self.batch_size, self.device = shards.val, transform, batch_size, device
        self.shard = eval_shard(shards.samples("val"), rank, world_size)
        self.skip_corrupt = skip_corrupt
        self.skipped: list[str] = []

    @property
    def num_samples(self) -> int:
        return len(self.shard)

    def __len__(self) -> int:
        return -(-len(self.shard) // self.batch_size)

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        lo, hi = (int(self.shard[0]), int(self.shard[-1]) + 1) if len(self.shard) else (0, 0)
        mine = itertools.islice(read_samples(self.paths), lo, hi)
        while batch := list(itertools.islice(mine, self.batch_size)):
            images, labels = [], []
            for sample in batch:
                try:
                    data, _ = _image_of(sample)
                    images.append(self.transform.load(io.BytesIO(data), name=_name(sample)))
                    labels.append(_label(sample))
                except CorruptImageError:
                    if not self.skip_corrupt:
                        raise
                    self.skipped.append(_name(sample))
            if images:
                yield (self.transform.normalize(torch.stack(images).to(self.device)),
                       torch.tensor(labels, dtype=torch.int64, device=self.device))

    __iter__ = batches


def split_blobs(shards: ShardSet, split: str) -> tuple[list[bytes], np.ndarray, list[str]]:
    """Every encoded image of a split (``train``: the training shards named, ``val``), its labels and names, in
    shard order: what :func:`vitkit.data.load_split` hands the evaluation commands."""
    blobs, labels, names = [], [], []
    for sample in read_samples(shards.train if split == "train" else shards.val):
        blobs.append(_image_of(sample)[0])
        labels.append(_label(sample))
        names.append(_name(sample))
    return blobs, np.asarray(labels, dtype=np.int64), names


__all__ = ["SHARDS_PREFIX", "ShardError", "ShardSet", "ShardTrainStream", "ShardValStream", "is_shards_dataset",
           "locate_shards", "parse_shard_size", "read_samples", "split_blobs", "verify_shards"]
