"""Batched augmentation on the training device: crop, flip, auto-augment, normalise, erase, mix.

All random parameters of a step are drawn for the whole *global* batch from one generator seeded by
``(seed, epoch, step)``; a rank keeps its rows. So a sample is augmented the same way whether the
global batch runs on one process or is split over several, and a resumed run redraws the exact
parameters of any step. Only the erasing noise (``erase_mode="pixel"``) is drawn per rank, on the
device, from a generator seeded by ``(seed, epoch, step, rank)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vitkit.data.autoaugment import AutoAugmenter
from vitkit.data.config import DataConfig
from vitkit.data.sampling import AUGMENT, rng, seed_int, to_device


# ------------------------------------------------------------------------------ parameter draws
def sample_boxes(gen: np.random.Generator, n: int, height: int, width: int, scale: tuple[float, float],
                 ratio: tuple[float, float], attempts: int = 10) -> np.ndarray:
    """Random-resized-crop boxes (top, left, h, w), shape (n, 4), as in Szegedy et al. 2015.

    Each image tries ``attempts`` (area, log-aspect) draws and keeps the first box that fits; if none
    fits it falls back to the largest central box whose aspect lies within ``ratio``.
    """
    area = height * width
    target = area * gen.uniform(scale[0], scale[1], size=(n, attempts))
    aspect = np.exp(gen.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, attempts)))
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    h, w, ok = h[rows, first], w[rows, first], fits[rows, first]
    # fallback: central crop with the aspect clamped into the ratio range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    h, w = np.where(ok, h, fh), np.where(ok, w, fw)
    top = np.floor(gen.random(n) * (height - h + 1))
    left = np.floor(gen.random(n) * (width - w + 1))
    top, left = np.where(ok, top, (height - h) // 2), np.where(ok, left, (width - w) // 2)
    return np.stack([top, left, h, w], axis=1).astype(np.int64)


def sample_erase_boxes(gen: np.random.Generator, n: int, height: int, width: int, prob: float,
                       area: tuple[float, float] = (0.02, 1 / 3), log_ratio: tuple[float, float] = (-1.204, 1.204),
                       attempts: int = 10) -> np.ndarray:
    """Random-erasing rectangles (top, left, h, w) per image; h = 0 where the image is not erased."""
    apply = gen.random(n) < prob
    target = height * width * gen.uniform(area[0], area[1], size=(n, attempts))
    aspect = np.exp(gen.uniform(log_ratio[0], log_ratio[1], size=(n, attempts)))
    h = np.round(np.sqrt(target * aspect)).astype(np.int64)
    w = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (h < height) & (w < width) & (h > 0) & (w > 0)
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    h, w = h[rows, first], w[rows, first]
    keep = apply & fits[rows, first]
    top = np.floor(gen.random(n) * (height - h + 1)).astype(np.int64)
    left = np.floor(gen.random(n) * (width - w + 1)).astype(np.int64)
    return np.stack([top, left, np.where(keep, h, 0), np.where(keep, w, 0)], axis=1)


@dataclass(frozen=True)
class MixParams:
    """How a batch is mixed with its reverse: ``x = lam * x + (1 - lam) * x.flip(0)`` (mixup) or a box
    of ``x.flip(0)`` pasted into ``x`` (cutmix). ``lam`` is the weight of the original targets."""

    kind: str  # "none" | "mixup" | "cutmix"
    lam: float = 1.0
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, h, w (cutmix)


def sample_mix(gen: np.random.Generator, cfg: DataConfig, height: int, width: int) -> MixParams:
    """Batch-level mixup/cutmix draw (the timm convention: one lambda per batch, pairs = reversed batch)."""
    if not cfg.mixes or gen.random() >= cfg.mix_prob:
        return MixParams("none")
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or gen.random() < cfg.mix_switch_prob)
    if not use_cutmix:
        return MixParams("mixup", float(gen.beta(cfg.mixup_alpha, cfg.mixup_alpha)))
    lam = float(gen.beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = int(gen.integers(0, height)), int(gen.integers(0, width))
    top, bottom = np.clip([cy - ch // 2, cy + ch // 2], 0, height)
    left, right = np.clip([cx - cw // 2, cx + cw // 2], 0, width)
    box = (int(top), int(left), int(bottom - top), int(right - left))
    return MixParams("cutmix", 1.0 - box[2] * box[3] / (height * width), box)


# ------------------------------------------------------------------------------ batched ops
def pad_crop(x: Tensor, offsets: Tensor, padding: int, flip: Tensor | None = None) -> Tensor:
    """Zero-pad by ``padding``, take the (H, W) window at per-image ``offsets`` (B, 2) = (dy, dx), and
    mirror the images where ``flip`` (B,) is True: one gather for all three (much faster than indexing)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    padded_w = w + 2 * padding
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (B, H)
    steps = torch.arange(w, device=x.device)
    if flip is not None:
        steps = torch.where(flip[:, None], w - 1 - steps, steps)  # (B, W)
    cols = offsets[:, 1, None] + steps
    flat = (rows[:, :, None] * padded_w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.flatten(2).gather(2, flat).view(b, c, h, w)


def crop_resize(x: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Bilinear crop-and-resize of per-image boxes (B, 4) = (top, left, h, w) to ``size``; uint8 in/out."""
    b, _, h, w = x.shape
    top, left, bh, bw = boxes.to(torch.float32).unbind(1)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = bw / w
    theta[:, 0, 2] = (2 * left + bw) / w - 1
    theta[:, 1, 1] = bh / h
    theta[:, 1, 2] = (2 * top + bh) / h - 1
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def resize(x: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize of a uint8 batch to (size, size)."""
    if x.shape[-2:] == (size, size):
        return x
    out = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def erase(x: Tensor, boxes: Tensor, noise: torch.Generator | None) -> Tensor:
    """Fill the per-image rectangles (B, 4) of float ``x`` with normal noise (or 0 when ``noise`` is None)."""
    b, c, h, w = x.shape
    top, left, bh, bw = boxes.unbind(1)
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    in_rows = (ys >= top[:, None]) & (ys < (top + bh)[:, None])  # (B, H)
    in_cols = (xs >= left[:, None]) & (xs < (left + bw)[:, None])  # (B, W)
    mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (B, 1, H, W)
    if noise is None:
        return x.masked_fill(mask, 0.0)
    fill = torch.randn(x.shape, generator=noise, device=x.device, dtype=x.dtype)
    return torch.where(mask, fill, x)


def mix(x: Tensor, targets: Tensor, params: MixParams) -> tuple[Tensor, Tensor]:
    """Mix images and soft targets with the reversed batch according to ``params``."""
    if params.kind == "none":
        return x, targets
    targets = params.lam * targets + (1.0 - params.lam) * targets.flip(0)
    if params.kind == "mixup":
        return x.mul(params.lam).add_(x.flip(0), alpha=1.0 - params.lam), targets
    top, left, h, w = params.box
    x = x.clone()
    x[:, :, top:top + h, left:left + w] = x.flip(0)[:, :, top:top + h, left:left + w]
    return x, targets


def soft_targets(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """One-hot targets with label smoothing: ``1 - eps + eps/K`` on the label, ``eps/K`` elsewhere."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels[:, None], 1.0 - smoothing + off)


# ------------------------------------------------------------------------------ the pipeline stage
class BatchAugmenter:
    """Turns uint8 batches into normalised float batches and training targets, on ``device``.

    ``crop_on_device`` is False for folder data sets, whose random-resized crop happens while decoding.
    """

    def __init__(self, cfg: DataConfig, *, img_size: int, num_classes: int, mean: tuple[float, ...],
                 std: tuple[float, ...], device: torch.device, seed: int, crop_on_device: bool = True,
                 out_chans: int | None = None) -> None:
        self.cfg = cfg
        self.img_size = img_size
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.seed = seed
        self.crop_on_device = crop_on_device
        self.out_chans = out_chans
        self.shift = torch.tensor([255.0 * m for m in mean], device=self.device).view(1, -1, 1, 1)
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=self.device).view(1, -1, 1, 1)
        self.auto = None
        if cfg.auto_augment:
            self.auto = AutoAugmenter(cfg.auto_augment, (img_size, img_size), num_ops=cfg.randaugment_n,
                                      magnitude=cfg.randaugment_m, fill=tuple(round(255 * m) for m in mean))

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 (B, C, H, W) -> float32, ``(x / 255 - mean) / std``; a single channel is repeated to
        ``out_chans`` when that is set."""
        if self.out_chans is not None and x.shape[1] != self.out_chans:
            x = x.repeat(1, self.out_chans, 1, 1)
        return (x.to(torch.float32) - self.shift).mul_(self.scale)

    def train(self, x: Tensor, labels: Tensor, *, epoch: int, step: int, rows: np.ndarray, global_size: int,
              rank: int = 0) -> tuple[Tensor, Tensor]:
        """Augment this rank's ``x`` (uint8), whose images are rows ``rows`` of the step's global batch."""
        cfg = self.cfg
        gen = rng(AUGMENT, self.seed, epoch, step)
        native_h, native_w = x.shape[-2:]

        # geometry: crop (+ resize) and flip, in uint8
        if self.crop_on_device and cfg.crop == "random_resized_crop":
            boxes = sample_boxes(gen, global_size, native_h, native_w, cfg.rrc_scale, cfg.rrc_ratio)
            x = crop_resize(x, to_device(boxes[rows], self.device), self.img_size)
        else:
            x = resize(x, self.img_size)
        offsets = gen.integers(0, 2 * cfg.crop_padding + 1, size=(global_size, 2))
        flips = gen.random(global_size) < 0.5
        pad = cfg.crop_padding if cfg.crop == "random_crop" else 0
        if pad or cfg.hflip:
            offsets = to_device(offsets[rows] if pad else np.zeros((len(rows), 2), np.int64), self.device)
            flip = to_device(flips[rows], self.device) if cfg.hflip else None
            x = pad_crop(x, offsets, pad, flip)
        if self.auto is not None:
            x = self.auto.apply(x.contiguous(), self.auto.draw(gen, global_size)[:, rows])

        # photometric, in normalised float
        x = self.normalize(x)
        if cfg.random_erasing > 0:
            boxes = sample_erase_boxes(gen, global_size, self.img_size, self.img_size, cfg.random_erasing)
            noise = None
            if cfg.erase_mode == "pixel":
                noise = torch.Generator(device=self.device)
                noise.manual_seed(seed_int(AUGMENT, self.seed, epoch, step, rank))
            x = erase(x, to_device(boxes[rows], self.device), noise)

        # targets and mixing
        if not cfg.soft_targets:
            return x, labels
        targets = soft_targets(labels, self.num_classes, cfg.label_smoothing)
        return mix(x, targets, sample_mix(gen, cfg, self.img_size, self.img_size))
