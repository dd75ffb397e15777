"""``Linear``: ``nn.Linear`` (same parameters, same math, y = x W^T + b) with a faster float32 CPU path.

On CPU, ``nn.Linear`` runs its GEMMs through the BLAS behind ``torch.mm`` (MKL), which on AMD
processors does not take its AVX-512 code path; oneDNN, PyTorch's other CPU GEMM library, does, and
is ~30% faster on the forward and input-gradient GEMMs of a ViT here (``docs/performance.md``).
The bias gradient is a matrix-vector product instead of a column sum, which is several times faster.

The fast path is used only where it is exact up to float32 rounding and supported: CPU tensors in
float32, outside autocast, ``torch.compile`` (which picks its own kernels) and tracing. Everywhere else,
including every GPU, this is plain ``F.linear``. The fast path's backward is first-order only
(``once_differentiable``); for double backward, call ``set_fast_cpu_linear(False)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_onednn_linear = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_fast_path_enabled = _onednn_linear is not None and torch.backends.mkldnn.is_available()


def set_fast_cpu_linear(enabled: bool) -> None:
    """Switch the oneDNN path on or off process-wide (off gives exactly ``nn.Linear``'s kernels)."""
    global _fast_path_enabled
    _fast_path_enabled = enabled and _onednn_linear is not None and torch.backends.mkldnn.is_available()


def uses_fast_path(x: Tensor) -> bool:
    return (_fast_path_enabled and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing())  # traced graphs (ONNX export) must hold standard ops


_ones_cache = torch.ones(0)


def _ones(n: int) -> Tensor:
    """A float32 CPU vector of n ones, reused across calls (one allocation and fill per size increase)."""
    global _ones_cache
    if _ones_cache.numel() < n:
        _ones_cache = torch.ones(n)
    return _ones_cache[:n]


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with oneDNN GEMMs for y and dL/dx, the BLAS for dL/dW, a GEMV for dL/db."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = _onednn_linear(grad_out, weight.t().contiguous(), None, "none", [], "")
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        if need_w:
            grad_w = rows.t() @ x.reshape(-1, x.shape[-1])
        if need_b and ctx.has_bias:
            grad_b = rows.t() @ _ones(rows.shape[0])
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, through oneDNN for float32 CPU tensors."""
    if not uses_fast_path(x):
        return F.linear(x, weight, bias)
    x = x.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn_linear(x, weight, bias, "none", [], "")


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.gelu(F.linear(x, weight, bias))`` (exact erf GELU); one fused oneDNN kernel at inference."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if needs_grad or not uses_fast_path(x):
        return F.gelu(linear(x, weight, bias))
    return _onednn_linear(x.contiguous(), weight, bias, "gelu", [], "none")


class Linear(nn.Linear):
    """``nn.Linear`` with the fast CPU path; a drop-in with the same parameter names and shapes."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
