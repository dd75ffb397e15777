"""Weight initialisers shared by the model files (JAX's, where the paper's models used them)."""

from __future__ import annotations

import math

from torch import Tensor, nn


def lecun_normal_(weight: Tensor) -> None:
    """JAX's lecun_normal: a normal truncated at two standard deviations, rescaled to variance 1/fan_in."""
    fan_in = weight[0].numel()
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of a unit normal truncated to [-2, 2]
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
