"""The data configuration: one plain dataclass (YAML/JSON friendly) that describes the input pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from vitkit.config_engine import check_fields, from_mapping, to_plain
from vitkit.preprocessing import Interpolation, Preprocessing

CropMode = Literal["random_crop", "random_resized_crop", "none"]
AutoAugment = Literal["randaugment", "trivialaugment"]
EraseMode = Literal["pixel", "const"]


@dataclass
class DataConfig:
    """What to read and how to augment it. Every field is a plain type so the config round-trips YAML.

    ``dataset`` is a named data set (``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist``) in the
    ``.npz`` layout, ``folder:PATH`` for a class-folder tree with ``train/`` and ``val/``, or ``shards:DIR``
    for webdataset tar shards that ``vitkit data shard`` wrote (:mod:`vitkit.data.shards`).
    """

    dataset: str = "cifar10"
    data_dir: Optional[str] = None
    """Root holding ``NAME/train.npz``; else env ``VITKIT_DATA``, the user cache (``~/.cache/vitkit/data``,
    where ``vitkit data download`` writes), ``<repo>/../shared/data`` (:func:`vitkit.data.data_roots`)."""
    img_size: Optional[int] = None
    """Side of the square training/eval images; None = the data set's native size (224 for folders)."""
    in_chans: Optional[int] = None
    """Channels the model sees; None = the data set's own. 3 repeats a grayscale set's channel (for models
    pre-trained on RGB), 1 turns an RGB named set into luma."""
    batch_size: int = 128
    """Training batch per process (the global batch is ``batch_size * world_size``)."""
    eval_batch_size: int = 512
    train_fraction: Optional[float] = None
    """Keep this fraction of every class of the training split (stratified, seeded by ``subset_seed``)."""
    samples_per_class: Optional[int] = None
    """Keep this many training images per class (stratified, seeded by ``subset_seed``)."""
    subset_seed: int = 0
    num_workers: int = 2
    """DataLoader worker processes (folder and shard data sets; in-memory sets need none)."""
    shuffle_buffer: int = 2000
    """``shards:`` data sets: samples each DataLoader worker holds to shuffle its sequential shard reads."""
    skip_corrupt: bool = False
    """Skip (and count) unreadable images instead of raising an error that names the file."""
    eval_crop_pct: float = 0.875
    """Folder data sets: resize the shorter side to ``img_size / eval_crop_pct``, then center-crop."""
    eval_interpolation: Interpolation = "bilinear"
    """Resize interpolation of the evaluation transform (``bilinear``, ``bicubic`` or ``nearest``)."""

    crop: CropMode = "random_crop"
    """``random_crop`` (pad by ``crop_padding`` then crop), ``random_resized_crop``, or ``none``."""
    crop_padding: int = 4
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    auto_augment: Optional[AutoAugment] = None
    """``randaugment`` (Cubuk et al. 2020, ``randaugment_n`` ops of magnitude ``randaugment_m``) or
    ``trivialaugment`` (Mueller & Hutter 2021)."""
    randaugment_n: int = 2
    randaugment_m: int = 9
    """On torchvision's 0-30 magnitude scale; timm's and the paper's ``m9`` (of 10) is about 27 here."""
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    """Probability that a batch is mixed at all (when mixup or cutmix is on)."""
    mix_switch_prob: float = 0.5
    """When both mixup and cutmix are on: probability that a mixed batch uses cutmix."""
    random_erasing: float = 0.0
    """Probability that an image gets one erased rectangle (Zhong et al. 2020)."""
    erase_mode: EraseMode = "pixel"
    """``pixel``: fill with per-pixel normal noise (in normalised space); ``const``: fill with 0 (the mean)."""
    label_smoothing: float = 0.0
    """Applied when targets are made: with it (or mixup/cutmix) targets are soft, float (B, K)."""
    mean: Optional[tuple[float, ...]] = None
    """Normalisation override; None = the data set's own constants."""
    std: Optional[tuple[float, ...]] = None

    def __post_init__(self) -> None:
        self.validate()

    def eval_preprocessing(self, size: int | tuple[int, int], mean: tuple[float, ...] | list[float],
                           std: tuple[float, ...] | list[float], *, crop_pct: float | None = None) -> Preprocessing:
        """The preprocessing record the evaluation fields describe (``eval_crop_pct``, ``eval_interpolation``),
        at ``size`` with the data set's normalisation: the one conversion from this config to the record the
        eval transform and the exported model carry. ``crop_pct`` overrides ``eval_crop_pct``."""
        return Preprocessing(size=size, mean=tuple(mean), std=tuple(std),
                             crop_pct=self.eval_crop_pct if crop_pct is None else crop_pct,
                             interpolation=self.eval_interpolation, dataset=self.dataset)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field at fault (types and allowed values by the config engine)."""
        check_fields(self, prefix="data.")

        def bad(field: str, why: str) -> None:
            raise ValueError(f"data config: {field}={getattr(self, field)!r}: {why}")

        if not isinstance(self.dataset, str) or not self.dataset:
            bad("dataset", "give a data set name (cifar10, cifar100, mnist, fashion_mnist) or folder:PATH")
        if self.img_size is not None and self.img_size < 1:
            bad("img_size", "must be a positive integer or None")
        if self.in_chans not in (None, 1, 3):
            bad("in_chans", "must be 1, 3 or None (the data set's own)")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                bad(name, "must be at least 1")
        if self.train_fraction is not None and not 0.0 < self.train_fraction <= 1.0:
            bad("train_fraction", "must be in (0, 1]")
        if self.samples_per_class is not None and self.samples_per_class < 1:
            bad("samples_per_class", "must be at least 1")
        if self.train_fraction is not None and self.samples_per_class is not None:
            bad("samples_per_class", "set either train_fraction or samples_per_class, not both")
        if self.num_workers < 0:
            bad("num_workers", "must be >= 0")
        if self.shuffle_buffer < 1:
            bad("shuffle_buffer", "must be >= 1")
        if not 0.0 < self.eval_crop_pct <= 1.0:
            bad("eval_crop_pct", "must be in (0, 1]")
        if self.crop_padding < 0:
            bad("crop_padding", "must be >= 0")
        lo, hi = self.rrc_scale
        if not 0.0 < lo <= hi <= 1.0:
            bad("rrc_scale", "needs 0 < min <= max <= 1")
        lo, hi = self.rrc_ratio
        if not 0.0 < lo <= hi:
            bad("rrc_ratio", "needs 0 < min <= max")
        if self.randaugment_n < 0:
            bad("randaugment_n", "must be >= 0")
        if not 0 <= self.randaugment_m <= 30:
            bad("randaugment_m", "must be in [0, 30]")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0 (0 turns it off)")
        for name in ("mix_prob", "mix_switch_prob", "random_erasing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(name, "must be a probability in [0, 1]")
        if not 0.0 <= self.label_smoothing < 1.0:
            bad("label_smoothing", "must be in [0, 1)")
        if (self.mean is None) != (self.std is None):
            bad("mean", "set mean and std together")
        if self.std is not None and (len(self.std) != len(self.mean) or min(self.std) <= 0):
            bad("std", "needs one positive value per channel, as many as mean")

    @property
    def mixes(self) -> bool:
        """True when batches are mixed (mixup or cutmix)."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

    @property
    def soft_targets(self) -> bool:
        """True when training targets are float (B, K) distributions instead of int64 labels."""
        return self.mixes or self.label_smoothing > 0

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (tuples become lists), ready for YAML or JSON."""
        return to_plain(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "data config") -> DataConfig:
        """Build from a mapping; an unknown key is an error that names it (and suggests the closest)."""
        return from_mapping(cls, values, source=source)
