"""Every export is checked against the eager model on real images before it is written as done:
the largest |logit difference| and the top-1 agreement, against a stated tolerance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.data.splits import load_split
from vitkit.data.transforms import eval_transform
from vitkit.errors import ExportMismatch

DEFAULT_ATOL = 1e-3
"""float32 exports: the largest |logit difference| allowed (float32 rounding of a reordered graph is ~1e-5)."""
DEFAULT_MIN_AGREEMENT_INT8 = 0.97
"""int8 exports: the smallest top-1 agreement with the eager model allowed (logits move by design)."""


@dataclass(frozen=True)
class ValidationImages:
    images: Tensor
    """Normalised model input (N, C, H, W), through the model's own eval transform."""
    labels: np.ndarray
    source: str


@dataclass(frozen=True)
class Agreement:
    """How an exported artefact's logits compare with the eager model's on the same images."""

    label: str
    images: int
    size: tuple[int, int]
    max_abs_diff: float
    top1_agreement: float
    reference_top1: Optional[float] = None
    """Accuracy of the eager model on these images (when their labels are the model's classes)."""
    candidate_top1: Optional[float] = None

    def format(self) -> str:
        acc = ""
        if self.reference_top1 is not None and self.candidate_top1 is not None:
            acc = f", top-1 eager {100 * self.reference_top1:.1f}% / exported {100 * self.candidate_top1:.1f}%"
        return (f"{self.label}: {self.images} images at {self.size[0]}x{self.size[1]}: max |logit diff| "
                f"{self.max_abs_diff:.2e}, top-1 agreement {100 * self.top1_agreement:.2f}%{acc}")


@dataclass(frozen=True)
class Tolerance:
    atol: Optional[float] = DEFAULT_ATOL
    """Largest |logit difference| allowed (None: not checked)."""
    min_agreement: float = 0.0
    """Smallest top-1 agreement allowed."""

    def check(self, result: Agreement) -> Optional[str]:
        """Why ``result`` fails this tolerance, or None."""
        if self.atol is not None and not result.max_abs_diff <= self.atol:
            return f"max |logit diff| {result.max_abs_diff:.2e} > {self.atol:.1e}"
        if result.top1_agreement < self.min_agreement:
            return f"top-1 agreement {100 * result.top1_agreement:.2f}% < {100 * self.min_agreement:.2f}%"
        return None

    def describe(self) -> str:
        parts = [f"max |logit diff| <= {self.atol:.1e}"] if self.atol is not None else []
        if self.min_agreement > 0:
            parts.append(f"top-1 agreement >= {100 * self.min_agreement:.1f}%")
        return " and ".join(parts) or "none"


def validation_images(config, dataset: str, count: int = 64, *, data_dir: str | None = None,
                      seed: int = 0) -> ValidationImages:
    """``count`` images (seeded sample) of ``dataset``'s evaluation split, through the model's eval transform."""
    if count < 1:
        raise ValueError(f"--validate-images must be at least 1, got {count}")
    split = load_split(dataset, "test", data_dir=data_dir)
    if len(split) == 0:
        raise ValueError(f"{split.location}: the evaluation split has no images to validate on")
    chosen = np.sort(np.random.default_rng(seed).choice(len(split), size=min(count, len(split)), replace=False))
    sample = split.subset(chosen, f"{len(chosen)}@{seed}")
    transform = eval_transform(config)
    images = transform.normalize(sample.resized(transform))
    labels = sample.labels
    names = list(config.class_names or [])
    if names and list(sample.class_names) != names:
        labels = np.full_like(labels, -1)  # another label set: accuracy is not meaningful, agreement still is
    return ValidationImages(images, np.asarray(labels), str(split.location))


def resized(images: Tensor, size: tuple[int, int]) -> Tensor:
    """The same images at another input size (bilinear), for checking a dynamic-size graph."""
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def logits_of(model: nn.Module, images: Tensor, batch_size: int = 32) -> Tensor:
    """float32 logits, in batches (the model is expected in eval mode: an exported program has no ``eval()``)."""
    return torch.cat([model(images[i:i + batch_size]).float() for i in range(0, len(images), batch_size)])


def compare(label: str, reference: nn.Module, candidate: nn.Module, images: Tensor,
            labels: Optional[np.ndarray] = None, *, batch_size: int = 32) -> Agreement:
    """Run both on ``images`` and measure how far the candidate's logits are from the reference's."""
    ref, got = logits_of(reference, images, batch_size), logits_of(candidate, images, batch_size)
    if ref.shape != got.shape:
        raise ExportMismatch(f"{label}: logits of shape {tuple(got.shape)}, the eager model gives {tuple(ref.shape)}")
    ref_top, got_top = ref.argmax(-1), got.argmax(-1)
    ref_acc = got_acc = None
    if labels is not None and len(labels) == len(images) and (labels >= 0).all():
        target = torch.as_tensor(labels)
        ref_acc = float((ref_top == target).float().mean())
        got_acc = float((got_top == target).float().mean())
    diff = float((ref - got).abs().max()) if torch.isfinite(got).all() else float("inf")
    return Agreement(label, len(images), tuple(images.shape[-2:]), diff, float((ref_top == got_top).float().mean()),
                     ref_acc, got_acc)
