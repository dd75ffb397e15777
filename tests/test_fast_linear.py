"""vitkit's fast CPU ``Linear`` (oneDNN GEMMs) must compute exactly what ``nn.Linear`` computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitkit.models.layers import Mlp
from vitkit.models.linear import Linear, linear_gelu, set_fast_cpu_linear, uses_fast_path


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24)])
def test_values_and_gradients_equal_nn_linear(bias, shape):
    fast = Linear(24, 40, bias=bias)
    plain = nn.Linear(24, 40, bias=bias)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    assert uses_fast_path(x) == (torch.backends.mkldnn.is_available())
    grad = torch.randn(*shape[:-1], 40)
    y, y_ref = fast(x), plain(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    y.backward(grad), y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-4)
    if bias:
        torch.testing.assert_close(fast.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-4)


def test_frozen_weights_and_strided_inputs():
    fast = Linear(16, 8).requires_grad_(False)
    leaf = torch.randn(16, 6, requires_grad=True)
    x = leaf.t()  # non-contiguous (6, 16)
    torch.testing.assert_close(fast(x), F.linear(x, fast.weight, fast.bias), rtol=0, atol=1e-5)
    fast(x).sum().backward()
    torch.testing.assert_close(leaf.grad, fast.weight.sum(0).expand(6, 16).t(), rtol=0, atol=1e-5)
    assert fast.weight.grad is None


def test_fused_gelu_and_mlp_paths_agree():
    mlp = Mlp(32, 64).eval()
    x = torch.randn(4, 9, 32)
    with torch.no_grad():
        unfused = mlp.fc2(mlp.act(mlp.fc1(x)))
        torch.testing.assert_close(mlp(x), unfused, rtol=0, atol=1e-5)
        torch.testing.assert_close(linear_gelu(x, mlp.fc1.weight, mlp.fc1.bias),
                                   F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), rtol=0, atol=1e-5)
    seen = []
    mlp.act.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    with torch.no_grad():
        mlp(x)
    assert seen == [(4, 9, 64)]  # a hook on act disables the fusion so the hook still fires


def test_switching_the_fast_path_off_gives_f_linear():
    layer = Linear(8, 8)
    x = torch.randn(2, 8)
    try:
        set_fast_cpu_linear(False)
        assert not uses_fast_path(x)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    finally:
        set_fast_cpu_linear(True)
