"""Weight initialisation: one mode switch shared by every model family, applied by the modules themselves.

Each module that owns weights has an ``init_weights(mode)`` method (as big_vision's and timm's ViT modules
do), so no loop has to recognise a layer by its name. The modes are the published recipes of the
families vitkit builds:

- ``"jax"``: the public JAX ViT release (vit_jax ``models_vit.py``), which the paper's results were
  obtained with: Xavier-uniform Dense kernels, N(0, 1e-6) MLP biases, LeCun-normal patch projection and
  representation layer, a near-zero class token. The default of :class:`VisionTransformer`.
- ``"timm"``: truncated normal (std 0.02) linear weights and class token, zero biases: timm's default and
  the official T2T-ViT's. The default of T2T-ViT.
- ``"mae"``: the official MAE: Xavier-uniform linears and patch projection (viewed as a linear), zero
  biases, N(0, 0.02) class and mask tokens. The default of the masked autoencoder.

LayerNorms start at weight 1, bias 0 in every mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

InitMode = Literal["jax", "timm", "mae"]
INIT_MODES: tuple[str, ...] = ("jax", "timm", "mae")


def check_mode(mode: str) -> None:
    if mode not in INIT_MODES:
        raise ValueError(f"weight init mode must be one of {', '.join(INIT_MODES)}, got {mode!r}")


def lecun_normal_(weight: Tensor) -> None:
    """JAX's lecun_normal: a normal truncated at two standard deviations, rescaled to variance 1/fan_in."""
    fan_in = weight[0].numel()
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of a unit normal truncated to [-2, 2]
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def init_linear_(layer: nn.Linear, mode: str, *, bias_std: float = 0.0) -> None:
    """A linear layer's weight by ``mode`` (trunc-normal 0.02 for ``timm``, Xavier-uniform otherwise) and its
    bias: zero, or N(0, bias_std) (the JAX release's MLP biases)."""
    if mode == "timm":
        nn.init.trunc_normal_(layer.weight, std=0.02)
    else:
        nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        if bias_std > 0:
            nn.init.normal_(layer.bias, std=bias_std)
        else:
            nn.init.zeros_(layer.bias)


def init_token_(token: Tensor, mode: str) -> None:
    """A learned token (class, mask): N(0, 1e-6) in the JAX release, trunc-normal 0.02 in timm and T2T,
    N(0, 0.02) in MAE."""
    if mode == "jax":
        nn.init.normal_(token, std=1e-6)
    elif mode == "timm":
        nn.init.trunc_normal_(token, std=0.02)
    else:
        nn.init.normal_(token, std=0.02)


def init_module_(module: nn.Module, mode: str) -> None:
    """Initialise one module: by its own ``init_weights(mode)`` if it has one, else a LayerNorm to (1, 0), a
    linear by :func:`init_linear_`; anything else (an identity, a stem that initialised itself) is left."""
    own = getattr(module, "init_weights", None)
    if callable(own):
        own(mode)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        init_linear_(module, mode)


@torch.no_grad()
def whiten_conv_(conv: nn.Conv2d, image_batches: Iterable[Tensor], eps: float = 5e-4,
                 sum_over_processes: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Make ``conv``'s filters whiten the patches of the images it will see (airbench's patch-whitening
    initialisation, Jordan 2024), and return the patch covariance's eigenvalues (largest first).

    The filters are the eigenvectors of the covariance of the images' ``kh x kw`` patches, largest variance
    first, each scaled by ``1 / sqrt(eigenvalue + eps)`` and followed by its negation, so that both signs
    survive the activation: the first layer starts out decorrelating its input instead of mixing it at
    random. With ``2k`` output channels the top ``k`` directions are used; channels beyond twice the patch
    dimension keep their initialisation. ``eps`` keeps the near-constant directions from being amplified.
    Under data parallelism each process passes its share of the batches and ``sum_over_processes`` (an
    all-reduce) adds up the patch statistics, so that every process sets the same filters.
    """
    if conv.groups != 1:
        raise ValueError(f"whitening needs an ungrouped convolution, got groups={conv.groups}")
    kh, kw = conv.kernel_size
    dim = conv.in_channels * kh * kw
    moments = torch.zeros(dim, dim, dtype=torch.float64, device=conv.weight.device)
    total = torch.zeros(dim, dtype=torch.float64, device=conv.weight.device)
    count = 0
    for images in image_batches:
        # every patch the convolution reads, padding left out (it would add zeros the data does not have)
        patches = F.unfold(images.to(conv.weight.device, torch.float64), (kh, kw), dilation=conv.dilation,
                           stride=conv.stride).transpose(1, 2).reshape(-1, dim)
        moments += patches.T @ patches
        total += patches.sum(dim=0)
        count += patches.shape[0]
    if sum_over_processes is not None:
        sums = sum_over_processes(torch.cat([moments.flatten(), total, total.new_tensor([count])]))
        moments, total, count = sums[:dim * dim].view(dim, dim), sums[dim * dim:-1], int(sums[-1])
    if count < 2:
        raise ValueError(f"whitening needs at least two image patches, the image batches gave {count}")
    mean = total / count
    covariance = moments / count - torch.outer(mean, mean)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
    k = min(conv.out_channels // 2, dim)
    filters = eigenvectors[:, :k].T / (eigenvalues[:k, None] + eps).sqrt()
    weight = torch.cat([filters, -filters]).reshape(2 * k, conv.in_channels, kh, kw)
    conv.weight[:2 * k] = weight.to(conv.weight.dtype)
    return eigenvalues
