"""``build_data``: from a :class:`DataConfig` to deterministic, resumable train and validation streams.

- ``train.batches(epoch, start_step)`` yields ``(images, targets)`` on the device: images float32
  normalised (B, C, H, W); targets int64 labels, or float (B, K) distributions when mixup, cutmix or
  label smoothing are on (``Data.soft_targets``). Both kinds work with ``F.cross_entropy``.
- ``val.batches()`` yields ``(images, labels)`` of this rank's shard, nothing dropped.

Named ``.npz`` sets live on the device as uint8 and are augmented in batches there; folder sets are
decoded and cropped by DataLoader workers, then finished by the same batched augmentation.
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from vitkit.data import sources
from vitkit.data.augment import BatchAugmenter
from vitkit.data.config import DataConfig
from vitkit.data.folder import (
    CorruptImageError,
    FolderImages,
    FolderSplit,
    collate,
    find_split_dir,
    list_classes,
    scan_split,
)
from vitkit.data.sampling import (
    LOADER,
    batch_positions,
    epoch_order,
    eval_shard,
    seed_int,
    steps_per_epoch,
    stratified_subset,
    to_device,
)
from vitkit.data.shards import ShardTrainStream, ShardValStream, is_shards_dataset, locate_shards
from vitkit.data.transforms import EvalTransform
from vitkit.preprocessing import Preprocessing

Batch = tuple[Tensor, Tensor]


# ------------------------------------------------------------------------------ in-memory streams
class _TrainOrder:
    """What every training stream shares: steps per epoch and which samples a rank reads at a step."""

    num_samples: int
    batch_size: int
    seed: int
    rank: int
    world_size: int

    def __len__(self) -> int:
        return steps_per_epoch(self.num_samples, self.batch_size, self.world_size)

    def indices(self, epoch: int, step: int) -> np.ndarray:
        """Data set indices of this rank's batch ``step`` of ``epoch`` (no data is touched)."""
        order = epoch_order(self.num_samples, self.seed, epoch)
        return order[batch_positions(step, self.batch_size, self.rank, self.world_size)]


class TensorTrainStream(_TrainOrder):
    """Training batches of an in-memory uint8 data set (N, C, H, W) that lives on the device."""

    def __init__(self, images: Tensor, labels: Tensor, augmenter: BatchAugmenter, *, batch_size: int, seed: int,
                 rank: int, world_size: int) -> None:
        self.images, self.labels, self.augmenter = images, labels, augmenter
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.skipped: list[str] = []

    @property
    def num_samples(self) -> int:
        return self.images.shape[0]

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        order = epoch_order(self.num_samples, self.seed, epoch)
        global_size = self.batch_size * self.world_size
        rows = np.arange(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for step in range(start_step, len(self)):
            positions = batch_positions(step, self.batch_size, self.rank, self.world_size)
            index = to_device(order[positions], self.images.device)
            yield self.augmenter.train(self.images[index], self.labels[index], epoch=epoch, step=step, rows=rows,
                                       global_size=global_size, rank=self.rank)


class _ValShard:
    """What both evaluation streams share: a rank's shard of the set, cut into batches (the last one short)."""

    shard: np.ndarray
    batch_size: int

    @property
    def num_samples(self) -> int:
        return len(self.shard)

    def __len__(self) -> int:
        return -(-len(self.shard) // self.batch_size)


class TensorValStream(_ValShard):
    """Evaluation batches of this rank's contiguous shard of an in-memory data set."""

    def __init__(self, images: Tensor, labels: Tensor, transform: EvalTransform, *, batch_size: int, rank: int,
                 world_size: int) -> None:
        self.images, self.labels, self.transform, self.batch_size = images, labels, transform, batch_size
        self.shard = eval_shard(images.shape[0], rank, world_size)
        self.skipped: list[str] = []

    def batches(self) -> Iterator[Batch]:
        for start in range(0, len(self.shard), self.batch_size):
            index = to_device(self.shard[start:start + self.batch_size], self.images.device)
            yield self.transform(self.images[index]), self.labels[index]

    __iter__ = batches


# ------------------------------------------------------------------------------ folder streams
class _WorkerPool:
    """DataLoader workers that live across passes (no process start-up per epoch).

    Each pass hands over its own list of batches of keys, so the order stays a pure function of
    ``(seed, epoch)``. One pass at a time: starting a new pass drains the previous one.

    The loader has its own generator, seeded by ``(seed, epoch)`` at each pass: without one, a DataLoader
    draws its workers' base seed from the *global* torch RNG when its iterator is created, a draw that
    moves the dropout, drop-path and MAE masks of every later step, and that a resumed run (whose new
    process creates its iterator at another moment) does not repeat.
    """

    class _Keys:
        def __init__(self) -> None:
            self.batches: list[list] = []

        def __iter__(self) -> Iterator[list]:
            return iter(self.batches)

        def __len__(self) -> int:
            return len(self.batches)

    def __init__(self, dataset: FolderImages, num_workers: int, device: torch.device, seed: int = 0) -> None:
        self.keys = self._Keys()
        self.seed = seed
        self.generator = torch.Generator()
        self.loader = DataLoader(dataset, batch_sampler=self.keys, num_workers=num_workers, collate_fn=collate,
                                 pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers else None,
                                 persistent_workers=num_workers > 0, worker_init_fn=_ignore_stop_signals,
                                 generator=self.generator)

    def run(self, batches: list[list], epoch: int = 0) -> Iterator[tuple[Tensor, Tensor, list[str], Tensor]]:
        self.keys.batches = batches
        self.generator.manual_seed(seed_int(LOADER, self.seed, epoch))
        return iter(self.loader)


def _stop_daemon_children() -> None:
    """At exit, multiprocessing stops daemon children (DataLoader workers) with SIGTERM and joins them;
    the workers ignore SIGTERM (see ``_ignore_stop_signals``), so they are stopped with SIGKILL first."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(_stop_daemon_children)  # registered after multiprocessing's exit handler, so it runs first


def _ignore_stop_signals(worker_id: int) -> None:
    """A SIGTERM or SIGINT sent to the whole process group (``docker stop``, Slurm, ``timeout``, Ctrl-C) is
    for the main process to handle: it saves and exits, and the workers end with it. A worker that died
    first would take the run down before it could save."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class FolderTrainStream(_TrainOrder):
    """Training batches of a class-folder data set, decoded and cropped by DataLoader workers.

    ``skipped`` lists the undecodable files dropped so far (``skip_corrupt``); a batch that lost
    images is simply smaller. Without ``skip_corrupt`` an undecodable file raises
    :class:`~vitkit.data.CorruptImageError` here, in the main process, naming the file.
    """

    def __init__(self, dataset: FolderImages, augmenter: BatchAugmenter, *, batch_size: int, seed: int, rank: int,
                 world_size: int, num_workers: int, device: torch.device, skip_corrupt: bool = False) -> None:
        self.dataset, self.augmenter = dataset, augmenter
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.device = device
        self.pool = _WorkerPool(dataset, num_workers, device, seed)
        self.skip_corrupt = skip_corrupt
        self.skipped: list[str] = []

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        order = epoch_order(self.num_samples, self.seed, epoch)
        steps = range(start_step, len(self))
        keys = [[(int(order[p]), epoch, int(p))
                 for p in batch_positions(s, self.batch_size, self.rank, self.world_size)]
                for s in steps]
        global_size = self.batch_size * self.world_size
        all_rows = np.arange(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for step, (images, labels, errors, indices) in zip(steps, self.pool.run(keys, epoch)):
            rows = all_rows
            ok = _check_decoded(self.dataset, errors, indices, self.skip_corrupt, self.skipped)
            if ok is not None:
                images, labels, rows = images[ok], labels[ok], all_rows[ok.numpy()]
                if len(rows) == 0:
                    continue
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            yield self.augmenter.train(images, labels, epoch=epoch, step=step, rows=rows, global_size=global_size,
                                       rank=self.rank)


class FolderValStream(_ValShard):
    """Evaluation batches (resize, center crop) of this rank's shard of a folder data set."""

    def __init__(self, dataset: FolderImages, transform: EvalTransform, *, batch_size: int, rank: int,
                 world_size: int, num_workers: int, device: torch.device, skip_corrupt: bool = False) -> None:
        self.dataset, self.transform, self.batch_size = dataset, transform, batch_size
        self.shard = eval_shard(len(dataset), rank, world_size)
        self.device = device
        self.pool = _WorkerPool(dataset, num_workers, device)
        self.skip_corrupt = skip_corrupt
        self.skipped: list[str] = []

    def batches(self) -> Iterator[Batch]:
        keys = [[(int(i), 0, int(i)) for i in self.shard[s:s + self.batch_size]]
                for s in range(0, len(self.shard), self.batch_size)]
        for images, labels, errors, indices in self.pool.run(keys):
            ok = _check_decoded(self.dataset, errors, indices, self.skip_corrupt, self.skipped)
            if ok is not None:
                images, labels = images[ok], labels[ok]
            images = images.to(self.device, non_blocking=True)
            yield self.transform.normalize(images), labels.to(self.device, non_blocking=True)

    __iter__ = batches


def _check_decoded(dataset: FolderImages, errors: list[str], indices: Tensor, skip_corrupt: bool,
                   skipped: list[str]) -> Tensor | None:
    """None when every image of the batch decoded; else raise :class:`CorruptImageError` for the first
    bad file or, with ``skip_corrupt``, record the bad files in ``skipped`` and return the keep mask."""
    bad = [(int(i), why) for i, why in zip(indices.tolist(), errors) if why]
    if not bad:
        return None
    if not skip_corrupt:
        index, why = bad[0]
        raise CorruptImageError(dataset.split.files[index], why)
    skipped.extend(str(dataset.split.files[i]) for i, _ in bad)
    return torch.tensor([not why for why in errors], dtype=torch.bool)


# ------------------------------------------------------------------------------ assembly
@dataclass
class Data:
    """Everything the training loop needs from the data side."""

    train: TensorTrainStream | FolderTrainStream | ShardTrainStream
    val: TensorValStream | FolderValStream | ShardValStream
    num_classes: int
    class_names: list[str]
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    soft_targets: bool
    """Training targets are float (B, K) distributions (mixup, cutmix or label smoothing on)."""
    dataset: str
    location: str
    scan_skipped: list[str]
    """Files left out while scanning a folder data set (unreadable headers, ``skip_corrupt``)."""
    preprocessing: Preprocessing
    """How evaluation images are prepared (size, mean, std, crop, interpolation): what a model trained
    on this data records in its config, and what ``vitkit predict`` and ``vitkit eval`` reapply."""

    def skipped_files(self) -> list[str]:
        """Every unreadable file left out so far (``skip_corrupt``): at the scan, and when decoding."""
        return list(dict.fromkeys(self.scan_skipped + self.train.skipped + self.val.skipped))

    def describe(self) -> str:
        return (f"{self.dataset} ({self.location}): {self.train.num_samples} train / {self.val.num_samples} val "
                f"images on this rank, {self.num_classes} classes, {self.in_chans}x{self.img_size}x{self.img_size}, "
                f"{len(self.train)} steps/epoch")


def _subset(labels: np.ndarray, cfg: DataConfig) -> np.ndarray | None:
    if cfg.train_fraction is None and cfg.samples_per_class is None:
        return None
    return stratified_subset(labels, fraction=cfg.train_fraction, per_class=cfg.samples_per_class,
                             seed=cfg.subset_seed)


def _check_steps(num_samples: int, cfg: DataConfig, world_size: int) -> None:
    if steps_per_epoch(num_samples, cfg.batch_size, world_size) == 0:
        raise ValueError(f"batch_size={cfg.batch_size}: the training split has {num_samples} images, fewer than "
                         f"one global batch ({cfg.batch_size} x {world_size} processes); lower batch_size")


def build_data(cfg: DataConfig, *, device: torch.device | str = "cpu", seed: int = 0, rank: int = 0,
               world_size: int = 1) -> Data:
    """Load the data set of ``cfg`` and build this rank's train and validation streams on ``device``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    cfg.validate()
    device = torch.device(device)
    if is_shards_dataset(cfg.dataset):
        return _build_shards(cfg, device, seed, rank, world_size)
    location = sources.locate(cfg.dataset, cfg.data_dir)  # the one name resolution of every command
    if location.layout == "folder":
        return _build_folder(cfg, location, device, seed, rank, world_size)
    return _build_npz(cfg, location, device, seed, rank, world_size)


def _build_npz(cfg: DataConfig, location: sources.DatasetLocation, device: torch.device, seed: int, rank: int,
               world_size: int) -> Data:
    directory = location.path
    train_x, train_y = sources.load_npz_split(directory, "train")
    val_x, val_y = sources.load_npz_split(directory, "test" if (directory / "test.npz").is_file() or
                                          not (directory / "val.npz").is_file() else "val")
    class_names = sources.npz_classes(location, np.concatenate([train_y, val_y]))
    num_classes = len(class_names)
    native_chans, native = train_x.shape[3], train_x.shape[1]
    in_chans = cfg.in_chans or native_chans
    mean, std = sources.npz_normalisation(location, train_x)
    if in_chans == 1 and native_chans == 3:  # luma, once, before anything is copied to the device
        train_x, val_x = _luma(train_x), _luma(val_x)
        mean, std = sources.channel_stats(train_x)  # of the whole training split, like the named constants
    elif in_chans == 3 and native_chans == 1:  # kept as one channel in memory, repeated per batch
        mean, std = mean * 3, std * 3
    keep = _subset(train_y, cfg)
    if keep is not None:
        train_x, train_y = train_x[keep], train_y[keep]
    _check_steps(len(train_y), cfg, world_size)
    if cfg.mean is not None:
        mean, std = cfg.mean, cfg.std
    _check_channels(mean, in_chans)
    img_size = cfg.img_size or native
    augmenter = BatchAugmenter(cfg, img_size=img_size, num_classes=num_classes, mean=mean, std=std, device=device,
                               seed=seed, out_chans=in_chans)

    def to_device(images: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor]:
        # the cached arrays are read-only: copy into NCHW, then hand the copy to torch
        return (torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device),
                torch.from_numpy(labels.copy()).to(device))

    train = TensorTrainStream(*to_device(train_x, train_y), augmenter, batch_size=cfg.batch_size, seed=seed,
                              rank=rank, world_size=world_size)
    preprocessing = cfg.eval_preprocessing(img_size, mean, std, crop_pct=1.0)  # in-memory sets are not cropped
    val = TensorValStream(*to_device(val_x, val_y), EvalTransform(preprocessing, in_chans),
                          batch_size=cfg.eval_batch_size, rank=rank, world_size=world_size)
    return Data(train, val, num_classes, class_names, in_chans, img_size,
                tuple(mean), tuple(std), cfg.soft_targets, cfg.dataset, str(directory), [], preprocessing)


def _luma(images: np.ndarray) -> np.ndarray:
    """RGB uint8 (N, H, W, 3) -> grayscale (N, H, W, 1) with ITU-R 601-2 weights, as PIL's "L"."""
    out = np.empty(images.shape[:3] + (1,), dtype=np.uint8)
    for start in range(0, len(images), 4096):
        block = images[start:start + 4096].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        out[start:start + 4096, ..., 0] = np.round(block)
    return out


def _build_folder(cfg: DataConfig, location: sources.DatasetLocation, device: torch.device, seed: int, rank: int,
                  world_size: int) -> Data:
    if cfg.in_chans not in (None, 3):
        raise ValueError(f"in_chans={cfg.in_chans}: folder data sets are read as RGB (in_chans 3)")
    root = location.path
    train_dir, val_dir = find_split_dir(root, "train"), find_split_dir(root, "val")
    classes = list_classes(train_dir)
    train_split = scan_split(train_dir, classes, skip_corrupt=cfg.skip_corrupt)
    val_split = scan_split(val_dir, classes, skip_corrupt=cfg.skip_corrupt)
    keep = _subset(train_split.labels, cfg)
    if keep is not None:
        train_split = FolderSplit(train_split.root, [train_split.files[i] for i in keep], train_split.labels[keep],
                                  classes, train_split.skipped)
    _check_steps(len(train_split.files), cfg, world_size)
    img_size = cfg.img_size or 224
    mean, std = (cfg.mean, cfg.std) if cfg.mean is not None else (sources.IMAGENET_MEAN, sources.IMAGENET_STD)
    _check_channels(mean, 3)
    augmenter = BatchAugmenter(cfg, img_size=img_size, num_classes=len(classes), mean=mean, std=std, device=device,
                               seed=seed, crop_on_device=False)
    train_mode = "random_resized_crop" if cfg.crop == "random_resized_crop" else "resize_center"
    train_images = FolderImages(train_split, img_size, train_mode, seed=seed, scale=cfg.rrc_scale,
                                ratio=cfg.rrc_ratio)
    preprocessing = cfg.eval_preprocessing(img_size, mean, std)
    transform = EvalTransform(preprocessing, 3)
    val_images = FolderImages(val_split, img_size, "eval", eval_resize=transform.load)
    train = FolderTrainStream(train_images, augmenter, batch_size=cfg.batch_size, seed=seed, rank=rank,
                              world_size=world_size, num_workers=cfg.num_workers, device=device,
                              skip_corrupt=cfg.skip_corrupt)
    val = FolderValStream(val_images, transform, batch_size=cfg.eval_batch_size, rank=rank, world_size=world_size,
                          num_workers=cfg.num_workers, device=device, skip_corrupt=cfg.skip_corrupt)
    skipped = [str(p) for p in train_split.skipped + val_split.skipped]
    return Data(train, val, len(classes), classes, 3, img_size, tuple(mean), tuple(std), cfg.soft_targets,
                cfg.dataset, str(root), skipped, preprocessing)


def _build_shards(cfg: DataConfig, device: torch.device, seed: int, rank: int, world_size: int) -> Data:
    """A ``shards:`` data set: streamed from tar shards, decoded and cropped as folder images are."""
    if cfg.in_chans not in (None, 3):
        raise ValueError(f"in_chans={cfg.in_chans}: shard data sets are read as RGB (in_chans 3)")
    if cfg.train_fraction is not None or cfg.samples_per_class is not None:
        raise ValueError("data.train_fraction / data.samples_per_class: a shard set is streamed whole; write a "
                         "subset with `vitkit data shard`, or name fewer shards with a brace pattern")
    shards = locate_shards(cfg.dataset, cfg.data_dir)
    _check_steps(shards.samples("train"), cfg, world_size)
    classes = shards.classes
    img_size = cfg.img_size or 224
    mean, std = (cfg.mean, cfg.std) if cfg.mean is not None else (sources.IMAGENET_MEAN, sources.IMAGENET_STD)
    _check_channels(mean, 3)
    augmenter = BatchAugmenter(cfg, img_size=img_size, num_classes=len(classes), mean=mean, std=std, device=device,
                               seed=seed, crop_on_device=False)
    mode = "random_resized_crop" if cfg.crop == "random_resized_crop" else "resize_center"
    train = ShardTrainStream(shards, augmenter, img_size=img_size, mode=mode, scale=cfg.rrc_scale,
                             ratio=cfg.rrc_ratio, batch_size=cfg.batch_size, seed=seed, rank=rank,
                             world_size=world_size, num_workers=cfg.num_workers, buffer=cfg.shuffle_buffer,
                             device=device, skip_corrupt=cfg.skip_corrupt)
    preprocessing = cfg.eval_preprocessing(img_size, mean, std)
    val = ShardValStream(shards, EvalTransform(preprocessing, 3), batch_size=cfg.eval_batch_size, rank=rank,
                         world_size=world_size, device=device, skip_corrupt=cfg.skip_corrupt)
    return Data(train, val, len(classes), classes, 3, img_size, tuple(mean), tuple(std), cfg.soft_targets,
                cfg.dataset, str(shards.root), [], preprocessing)


def _check_channels(mean: tuple[float, ...], in_chans: int) -> None:
    if len(mean) != in_chans:
        raise ValueError(f"mean/std give {len(mean)} channel(s) but the images have {in_chans}")
