"""RandAugment (Cubuk et al. 2020) and TrivialAugment-Wide (Mueller & Hutter 2021) on uint8 batches.

Each image picks its own operation, magnitude bin and sign from the caller's generator, so the
choice is reproducible and independent of any global RNG. Images that picked the same
(operation, magnitude, sign) are transformed together by one batched call of
``torchvision.transforms.v2.functional``, which keeps the number of calls bounded by the number of
distinct choices rather than the batch size. Magnitude ranges follow the papers' 31-bin spaces as
torchvision defines them.
"""

from __future__ import annotations

import math
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

NUM_BINS = 31
OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
       "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
SIGNED = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
          "sharpness"}


def magnitudes(policy: str, op: str, size: tuple[int, int]) -> np.ndarray:
    """The 31 magnitudes of ``op`` under ``policy`` (``randaugment`` or ``trivialaugment``)."""
    wide = policy == "trivialaugment"
    bins = np.arange(NUM_BINS)
    height, width = size
    if op in ("shear_x", "shear_y"):
        return np.linspace(0.0, 0.99 if wide else 0.3, NUM_BINS)
    if op == "translate_x":
        return np.linspace(0.0, 32.0 if wide else 150.0 / 331.0 * width, NUM_BINS)
    if op == "translate_y":
        return np.linspace(0.0, 32.0 if wide else 150.0 / 331.0 * height, NUM_BINS)
    if op == "rotate":
        return np.linspace(0.0, 135.0 if wide else 30.0, NUM_BINS)
    if op in ("brightness", "color", "contrast", "sharpness"):
        return np.linspace(0.0, 0.99 if wide else 0.9, NUM_BINS)
    if op == "posterize":
        return 8 - np.round(bins / ((NUM_BINS - 1) / (6 if wide else 4)))
    if op == "solarize":
        return np.linspace(255.0, 0.0, NUM_BINS)
    return np.zeros(NUM_BINS)


def _apply(op: str, x: Tensor, m: float, fill: list[float]) -> Tensor:
    nearest = InterpolationMode.NEAREST
    if op == "identity":
        return x
    if op in ("shear_x", "shear_y"):
        shear = [math.degrees(math.atan(m)), 0.0] if op == "shear_x" else [0.0, math.degrees(math.atan(m))]
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=nearest,
                         fill=fill, center=[0, 0])
    if op in ("translate_x", "translate_y"):
        shift = [int(m), 0] if op == "translate_x" else [0, int(m)]
        return TF.affine(x, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=nearest,
                         fill=fill)
    if op == "rotate":
        return TF.rotate(x, m, interpolation=nearest, fill=fill)
    if op == "brightness":
        return TF.adjust_brightness(x, 1.0 + m)
    if op == "color":
        return TF.adjust_saturation(x, 1.0 + m) if x.shape[-3] == 3 else x
    if op == "contrast":
        return TF.adjust_contrast(x, 1.0 + m)
    if op == "sharpness":
        return TF.adjust_sharpness(x, 1.0 + m)
    if op == "posterize":
        return TF.posterize(x, int(m))
    if op == "solarize":
        return TF.solarize(x, m)
    if op == "autocontrast":
        return TF.autocontrast(x)
    if op == "equalize":
        return TF.equalize(x)
    raise ValueError(f"unknown augmentation op {op!r}")


class AutoAugmenter:
    """Apply ``randaugment`` (``num_ops`` ops at fixed ``magnitude``) or ``trivialaugment`` (one op,
    random magnitude) to a uint8 batch (B, C, H, W)."""

    def __init__(self, policy: str, size: tuple[int, int], *, num_ops: int = 2, magnitude: int = 9,
                 fill: tuple[float, ...] = (0.0,)) -> None:
        if policy not in ("randaugment", "trivialaugment"):
            raise ValueError(f"auto_augment={policy!r}: choose randaugment or trivialaugment")
        self.policy = policy
        self.num_ops = num_ops if policy == "randaugment" else 1
        self.magnitude = magnitude
        self.fill = [float(f) for f in fill]
        self.table = np.stack([magnitudes(policy, op, size) for op in OPS])  # (ops, bins)
        self.signed = np.array([op in SIGNED for op in OPS])

    def draw(self, gen: np.random.Generator, n: int) -> np.ndarray:
        """Per-image choices, shape (num_ops, n, 3): operation index, magnitude bin, sign (0 or 1)."""
        ops = gen.integers(0, len(OPS), size=(self.num_ops, n))
        if self.policy == "randaugment":
            bins = np.full((self.num_ops, n), self.magnitude)
        else:
            bins = gen.integers(0, NUM_BINS, size=(self.num_ops, n))
        negate = gen.random((self.num_ops, n)) < 0.5
        return np.stack([ops, bins, negate & self.signed[ops]], axis=-1)

    def apply(self, x: Tensor, choices: np.ndarray) -> Tensor:
        """Transform ``x`` (uint8, B images) with ``choices`` from :meth:`draw` (sliced to B)."""
        if x.dtype != torch.uint8:
            raise TypeError(f"auto-augmentation expects uint8 images, got {x.dtype}")
        for layer in choices:
            keys = layer[:, 0] * 2 * NUM_BINS + layer[:, 1] * 2 + layer[:, 2]
            out = x.clone()
            for key in np.unique(keys):
                op, magnitude_bin, negate = int(key // (2 * NUM_BINS)), int(key // 2 % NUM_BINS), int(key % 2)
                if OPS[op] == "identity":
                    continue
                rows = torch.from_numpy(np.flatnonzero(keys == key)).to(x.device)
                m = float(self.table[op, magnitude_bin]) * (-1.0 if negate else 1.0)
                out[rows] = _apply(OPS[op], x[rows], m, self.fill)
            x = out
        return x

