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
from typing import Literal

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
