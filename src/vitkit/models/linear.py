"""A faster float32 CPU path for the model's ``nn.Linear`` layers, taken only where nothing can tell.

The model's linear layers are plain ``nn.Linear`` modules: PEFT, ``quantize_dynamic``, FX, hooks and
parametrizations see exactly what they see in any PyTorch model. The parent module (attention, MLP)
calls a layer through :func:`run_linear`, which takes the fast path only when the layer is still the
one vitkit built (type exactly ``nn.Linear``, no hook of any kind, weights plain float32 tensors) and
the call is an ordinary eager one; otherwise it calls the module, so a wrapper, a replacement, a hook
or a tracer gets exactly what it would get from ``layer(x)``.

Why a fast path at all: on CPU, ``nn.Linear`` runs its GEMMs through the BLAS behind ``torch.mm``
(MKL), which on AMD processors does not take its AVX-512 code path; oneDNN, PyTorch's other CPU GEMM
library, does, and is ~30% faster on the forward and input-gradient GEMMs of a ViT here
(``docs/performance.md``). The bias gradient is a matrix-vector product instead of a column sum, which
is several times faster.

The fast path is used only where it is exact up to float32 rounding: CPU tensors in float32, outside
autocast, ``torch.compile``, tracing (jit, FX, export), ``torch.func`` transforms and forward-mode AD.
Its backward is differentiable: under ``create_graph=True`` (double backward) it is computed in
ordinary differentiable operations. ``set_fast_cpu_linear(False)`` turns it off process-wide.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
import torch.nn.modules.module as module_hooks
from torch import Tensor, fx, nn

_onednn_linear = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_fast_path_enabled = _onednn_linear is not None and torch.backends.mkldnn.is_available()


def set_fast_cpu_linear(enabled: bool) -> None:
    """Switch the oneDNN path on or off process-wide (off gives exactly ``nn.Linear``'s kernels)."""
    global _fast_path_enabled
    _fast_path_enabled = enabled and _onednn_linear is not None and torch.backends.mkldnn.is_available()


def uses_fast_path(x: Tensor) -> bool:
    """Whether a call on ``x`` may take the oneDNN path: an eager float32 CPU call that no transform,
    tracer or compiler is watching (they need the standard operator)."""
    return (_fast_path_enabled and not isinstance(x, fx.Proxy) and type(x) is Tensor
            and x.is_cpu and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and not torch._C._are_functorch_transforms_active()
            and forward_ad._current_level < 0)


def _no_global_hooks() -> bool:
    return not (module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks
                or module_hooks._global_backward_hooks or module_hooks._global_backward_pre_hooks)


def is_plain_linear(layer: nn.Module) -> bool:
    """``layer`` is exactly an ``nn.Linear`` that nobody wraps, hooks or parametrizes (a parametrized module
    has another type), with plain float32 weights: calling its weights directly skips nothing."""
    if type(layer) is not nn.Linear or (layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
                                        or layer._backward_pre_hooks):
        return False
    params = layer._parameters  # not layer.weight: nn.Module.__getattr__ costs a microsecond per look-up
    weight, bias = params["weight"], params["bias"]
    return (type(weight) is nn.Parameter and weight.dtype == torch.float32
            and (bias is None or type(bias) is nn.Parameter) and _no_global_hooks())


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
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        x_rows = x.reshape(-1, x.shape[-1])
        grad_x = grad_w = grad_b = None
        if torch.is_grad_enabled():
            # create_graph=True: the gradients must themselves be differentiable, so ordinary operations
            if need_x:
                grad_x = grad_out.matmul(weight)
            if need_w:
                grad_w = rows.t().matmul(x_rows)
            if need_b and ctx.has_bias:
                grad_b = rows.sum(0)
            return grad_x, grad_w, grad_b
        grad_out = grad_out.contiguous()
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        if need_x:
            grad_x = _onednn_linear(grad_out, weight.t().contiguous(), None, "none", [], "")
        if need_w:
            grad_w = rows.t() @ x_rows
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


def run_linear(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)``, through oneDNN when ``layer`` is the plain ``nn.Linear`` vitkit built and the call may."""
    if is_plain_linear(layer) and uses_fast_path(x):
        return linear(x, layer._parameters["weight"], layer._parameters["bias"])
    return layer(x)


def _is_plain_gelu(act: nn.Module) -> bool:
    return (type(act) is nn.GELU and act.approximate == "none"
            and not (act._forward_hooks or act._forward_pre_hooks or act._backward_hooks or act._backward_pre_hooks))


def run_linear_gelu(layer: nn.Module, act: nn.Module, x: Tensor) -> Tensor:
    """``act(layer(x))``; one fused oneDNN kernel at inference when both are the plain modules vitkit built
    (exact erf GELU), so fusing skips no wrapper or hook of either."""
    if _is_plain_gelu(act) and is_plain_linear(layer) and uses_fast_path(x) and not _needs_grad(x, layer):
        return _onednn_linear(x.contiguous(), layer._parameters["weight"], layer._parameters["bias"], "gelu", [],
                              "none")
    return act(run_linear(layer, x))


def _needs_grad(x: Tensor, layer: nn.Linear) -> bool:
    weight, bias = layer._parameters["weight"], layer._parameters["bias"]
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))
