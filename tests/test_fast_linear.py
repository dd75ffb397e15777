"""vitkit's fast CPU path for ``nn.Linear`` (oneDNN GEMMs) must compute exactly what ``nn.Linear`` computes,
and must step aside whenever anything could tell the difference (a hook, a wrapper, a tracer, a transform)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import vitkit.models.linear as fast
from vitkit.models.layers import Mlp
from vitkit.models.linear import is_plain_linear, run_linear, run_linear_gelu, set_fast_cpu_linear, uses_fast_path

needs_onednn = pytest.mark.skipif(fast._onednn_linear is None or not torch.backends.mkldnn.is_available(),
                                  reason="this torch build has no oneDNN linear")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the calls that go through the oneDNN kernel."""
    calls = []
    kernel = fast._onednn_linear

    def counting(*args):
        calls.append(args[0].shape)
        return kernel(*args)

    monkeypatch.setattr(fast, "_onednn_linear", counting)
    return calls


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24)])
def test_values_and_gradients_equal_nn_linear(bias, shape, onednn_calls):
    layer = nn.Linear(24, 40, bias=bias)
    plain = nn.Linear(24, 40, bias=bias)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    assert uses_fast_path(x) and is_plain_linear(layer)
    grad = torch.randn(*shape[:-1], 40)
    y, y_ref = run_linear(layer, x), plain(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    y.backward(grad), y_ref.backward(grad)
    assert len(onednn_calls) == 2  # forward and input gradient
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-4)
    if bias:
        torch.testing.assert_close(layer.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-4)


def test_frozen_weights_and_strided_inputs():
    layer = nn.Linear(16, 8).requires_grad_(False)
    leaf = torch.randn(16, 6, requires_grad=True)
    x = leaf.t()  # non-contiguous (6, 16)
    torch.testing.assert_close(run_linear(layer, x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-5)
    run_linear(layer, x).sum().backward()
    torch.testing.assert_close(leaf.grad, layer.weight.sum(0).expand(6, 16).t(), rtol=0, atol=1e-5)
    assert layer.weight.grad is None


@needs_onednn
def test_fused_gelu_and_mlp_paths_agree(onednn_calls):
    mlp = Mlp(32, 64).eval()
    x = torch.randn(4, 9, 32)
    with torch.no_grad():
        unfused = mlp.fc2(mlp.act(mlp.fc1(x)))
        torch.testing.assert_close(mlp(x), unfused, rtol=0, atol=1e-5)
        assert len(onednn_calls) == 2  # fc1+GELU fused, fc2
        torch.testing.assert_close(run_linear_gelu(mlp.fc1, mlp.act, x),
                                   F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), rtol=0, atol=1e-5)
    seen = []
    mlp.act.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    with torch.no_grad():
        mlp(x)
    assert seen == [(4, 9, 64)]  # a hook on act disables the fusion so the hook still fires


@needs_onednn
def test_anything_that_watches_the_layer_gets_the_module_call(onednn_calls):
    """Hooks (module and global), a parametrization, a subclass and a replacement all see ``layer(x)``."""
    x = torch.randn(3, 8)
    cases = []
    hooked = nn.Linear(8, 4)
    hooked.register_forward_hook(lambda m, i, o: cases.append("forward hook"))
    pre = nn.Linear(8, 4)
    pre.register_forward_pre_hook(lambda m, i: cases.append("pre hook"))
    param = nn.Linear(8, 4)

    class Doubled(nn.Module):
        def forward(self, w):
            cases.append("parametrization")
            return 2 * w

    parametrize.register_parametrization(param, "weight", Doubled())
    cases.clear()  # registering evaluates the parametrization once

    class Sub(nn.Linear):
        def forward(self, x):
            cases.append("subclass")
            return super().forward(x)

    for layer in (hooked, pre, param, Sub(8, 4)):
        assert not is_plain_linear(layer)
        run_linear(layer, x)
    assert cases == ["forward hook", "pre hook", "parametrization", "subclass"]
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: cases.append("global hook"))
    try:
        run_linear(nn.Linear(8, 4), x)
    finally:
        handle.remove()
    assert cases[-1] == "global hook"
    assert onednn_calls == []
    run_linear(nn.Linear(8, 4), x)
    assert len(onednn_calls) == 1  # and the unwatched plain layer takes the fast path


@needs_onednn
def test_double_backward_through_the_fast_path(onednn_calls):
    """The fast backward is itself differentiable: a gradient penalty gives nn.Linear's second derivatives."""
    layer, ref = nn.Linear(6, 5), nn.Linear(6, 5)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(4, 6, requires_grad=True)
    results = []
    for run in (lambda t: torch.tanh(run_linear(layer, t)), lambda t: torch.tanh(ref(t))):
        xi = x.detach().clone().requires_grad_()
        g, = torch.autograd.grad(run(xi).pow(2).sum(), xi, create_graph=True)
        g.pow(2).sum().backward()
        results.append(xi.grad)
    assert onednn_calls  # the fast path was taken in the first run
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_func_transforms_and_forward_ad_take_the_standard_operator(onednn_calls):
    """Per-sample gradients (vmap over grad) and forward-mode AD through the MLP equal nn.Linear's."""
    mlp = Mlp(6, 12)
    x = torch.randn(3, 6)
    params = {k: v.detach() for k, v in mlp.named_parameters()}

    def loss(p, xi):
        return torch.func.functional_call(mlp, p, (xi,)).pow(2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    assert onednn_calls == []
    for i in range(3):
        expected = torch.autograd.grad(loss(dict(mlp.named_parameters()), x[i]), mlp.fc1.weight)[0]
        torch.testing.assert_close(per_sample["fc1.weight"][i], expected, rtol=1e-5, atol=1e-6)
    onednn_calls.clear()
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        tangent = torch.autograd.forward_ad.unpack_dual(run_linear(mlp.fc1, dual)).tangent
    torch.testing.assert_close(tangent, mlp.fc1.weight.detach().sum(1).expand(3, 12))
    assert onednn_calls == []


def test_switching_the_fast_path_off_gives_f_linear():
    layer = nn.Linear(8, 8)
    x = torch.randn(2, 8)
    try:
        set_fast_cpu_linear(False)
        assert not uses_fast_path(x)
        assert torch.equal(run_linear(layer, x), F.linear(x, layer.weight, layer.bias))
    finally:
        set_fast_cpu_linear(True)
