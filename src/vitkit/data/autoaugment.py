"""RandAugment (Cubuk et al. 2020) and TrivialAugment-Wide (Mueller & Hutter 2021) on uint8 batches.

Each image picks its own operation, magnitude bin and sign from the caller's generator, so the
choice is reproducible and independent of any global RNG. Every operation is vectorised with a
magnitude per image, and images that picked the same operation are transformed together (the five
geometric ones by a single ``grid_sample``), so a layer costs at most ten batched calls whatever the
batch size; this keeps the pipeline fast on a GPU as well as on a CPU. Magnitude ranges are the
31-bin spaces of the papers as torchvision defines them; the photometric operations follow PIL's
ImageEnhance/ImageOps definitions, histogram equalisation is torchvision's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from vitkit.data.sampling import to_device

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


GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")


def _affine(x: Tensor, op: Tensor, m: Tensor, fill: Tensor) -> Tensor:
    """Shear, translate or rotate each image about its centre (nearest neighbour, ``fill`` outside).

    ``op`` holds indices into :data:`GEOMETRIC`, ``m`` the per-image magnitude (shear factor, pixels,
    degrees). One ``grid_sample`` call serves the whole group.
    """
    _, _, h, w = x.shape
    rad = torch.deg2rad(m)
    cos, sin = torch.cos(rad), torch.sin(rad)
    rotate, zero, one = op == 4, torch.zeros_like(m), torch.ones_like(m)
    # output -> input map in normalised coordinates (aspect-corrected), built without host syncs
    theta = torch.stack([
        torch.where(rotate, cos, one),
        torch.where(rotate, -sin * h / w, torch.where(op == 0, m * h / w, zero)),
        torch.where(op == 2, -2.0 * m / w, zero),
        torch.where(rotate, sin * w / h, torch.where(op == 1, m * w / h, zero)),
        torch.where(rotate, cos, one),
        torch.where(op == 3, -2.0 * m / h, zero),
    ], dim=1).view(-1, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # sample x - fill with zero padding, so that outside the image the result is exactly ``fill``
    return F.grid_sample(x - fill, grid, mode="nearest", padding_mode="zeros", align_corners=False) + fill


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).floor()  # ITU-R 601-2 luma, as PIL


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """``degenerate + factor * (x - degenerate)`` per image, clipped to [0, 255] (PIL's ImageEnhance)."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0, 255).round_()


def _smooth(x: Tensor) -> Tensor:
    """PIL's SMOOTH filter (3x3, centre weight 5, sum 13) inside the image, the border left as is."""
    c = x.shape[1]
    kernel = torch.ones(c, 1, 3, 3, device=x.device, dtype=x.dtype)
    kernel[:, :, 1, 1] = 5.0
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = F.conv2d(x, kernel / 13.0, groups=c).round_()
    return out


def _autocontrast(x: Tensor) -> Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 255.0 / (hi - lo).clamp(min=1e-6), 1.0)
    lo = torch.where(hi > lo, lo, 0.0)
    return ((x - lo) * scale).clamp_(0, 255).round_()


def _apply(op: str, x: Tensor, m: Tensor, geometric: Tensor, fill: Tensor) -> Tensor:
    """Apply ``op`` with per-image magnitudes ``m`` to float images ``x`` (values 0..255)."""
    if op == "geometric":
        return _affine(x, geometric, m, fill)
    if op == "brightness":
        return _blend(torch.zeros_like(x), x, 1.0 + m)
    if op == "color":
        return _blend(_gray(x), x, 1.0 + m) if x.shape[1] == 3 else x
    if op == "contrast":
        return _blend(_gray(x).mean(dim=(1, 2, 3), keepdim=True).round_(), x, 1.0 + m)
    if op == "sharpness":
        return _blend(_smooth(x), x, 1.0 + m)
    if op == "posterize":
        step = torch.exp2(8.0 - m).view(-1, 1, 1, 1)
        return torch.floor(x / step) * step
    if op == "solarize":
        return torch.where(x >= m.view(-1, 1, 1, 1), 255.0 - x, x)
    if op == "autocontrast":
        return _autocontrast(x)
    if op == "equalize":
        return TF.equalize(x.to(torch.uint8)).to(x.dtype)
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
        self.geometric_ops = np.array([OPS.index(op) for op in GEOMETRIC])  # consecutive indices

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
        """Transform ``x`` (uint8, B images) with ``choices`` from :meth:`draw` (sliced to B).

        Per layer, images are grouped by operation (all geometric operations form one group) and
        each group is transformed by one vectorised call with per-image magnitudes.
        """
        if x.dtype != torch.uint8:
            raise TypeError(f"auto-augmentation expects uint8 images, got {x.dtype}")
        out = x.to(torch.float32)
        fill = to_device(np.array(self.fill[: x.shape[1]]), x.device, torch.float32).view(1, -1, 1, 1)
        for layer in choices:
            ops, bins, negate = layer[:, 0], layer[:, 1], layer[:, 2]
            m = self.table[ops, bins] * np.where(negate, -1.0, 1.0)
            groups = np.where(np.isin(ops, self.geometric_ops), -1, ops)
            for group in np.unique(groups):
                name = "geometric" if group < 0 else OPS[group]
                if name == "identity":
                    continue
                rows_np = np.flatnonzero(groups == group)
                rows = to_device(rows_np, x.device)
                geometric = to_device(ops[rows_np] - self.geometric_ops[0], x.device)
                magnitude = to_device(m[rows_np], x.device, torch.float32)
                out[rows] = _apply(name, out[rows], magnitude, geometric, fill)
        return out.to(torch.uint8)
