"""FLOP counting with PyTorch's ``FlopCounterMode``, completed for attention on every device.

PyTorch counts the CUDA attention kernels (flash, memory-efficient, cuDNN) but not the CPU flash
kernel that ``scaled_dot_product_attention`` uses on CPU, nor the oneDNN GEMM of vitkit's fast CPU
``Linear``, so a plain count silently drops them. We add formulas for the kernels the registry lacks. Convention:
one multiply-add = 2 FLOPs, as in PyTorch's counter and the MFU literature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry


def _attention_forward_flops(query: Sequence[int], key: Sequence[int], value: Sequence[int]) -> int:
    """softmax(Q K^T) V on shapes (..., N, d): two batched matmuls, (Nq x d)(d x Nk) and (Nq x Nk)(Nk x dv)."""
    *batch, n_q, d = query
    n_k, d_v = key[-2], value[-1]
    heads = 1
    for b in batch:
        heads *= b
    return 2 * heads * n_q * n_k * (d + d_v)


# FlopCounterMode calls formulas with the shapes of tensor arguments in place of the tensors.
def _sdpa_cpu_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _attention_forward_flops(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    # dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q: twice the forward's matmul work.
    return 2 * _attention_forward_flops(query, key, value)


def _onednn_linear(x, weight, *args, out_shape=None, **kwargs) -> int:
    """oneDNN's ``_linear_pointwise(x, weight, bias, ...)``: the GEMM of a Linear layer (vitkit's CPU path)."""
    rows = 1
    for size in x[:-1]:
        rows *= size
    return 2 * rows * weight[0] * weight[1]


def _missing_formulas() -> dict[Any, Callable[..., int]]:
    """Formulas for kernels this PyTorch build has but its FLOP registry does not count."""
    candidates = {
        ("aten", "_scaled_dot_product_flash_attention_for_cpu"): _sdpa_cpu_forward,
        ("aten", "_scaled_dot_product_flash_attention_for_cpu_backward"): _sdpa_cpu_backward,
        ("mkldnn", "_linear_pointwise"): _onednn_linear,
    }
    formulas = {}
    for (namespace, name), formula in candidates.items():
        packet = getattr(getattr(torch.ops, namespace, None), name, None)
        if packet is not None and packet not in flop_registry and packet.default not in flop_registry:
            formulas[packet] = formula
    return formulas


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts CPU attention and oneDNN linear kernels (quiet by default)."""
    return FlopCounterMode(display=False, custom_mapping=_missing_formulas())


def count_flops(model: nn.Module, images: Tensor, *, train: bool = False,
                loss_fn: Callable[[Tensor], Tensor] | None = None) -> int:
    """FLOPs of one forward pass (``train=False``) or one forward + backward pass over ``images``.

    The optimizer step is not counted (it is O(parameters), not O(parameters x tokens)).
    """
    counter = flop_counter()
    if train:
        with counter:
            out = model(images)
            loss = loss_fn(out) if loss_fn is not None else out.float().square().mean()
            loss.backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad(), counter:
            model(images)
    return int(counter.get_total_flops())
