"""What a timm user does to a model works on vitkit's, with timm's results on the same weights (issue 21):
PEFT LoRA, dynamic quantization, double backward and torch.func, timm's model API and its model checks."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from vitkit.bench.reference import reference_twin
from vitkit.models import build_registered

peft = pytest.importorskip("peft")

MINI = dict(depth=2)  # vit_mini_patch4_32 (D 128, 2 heads) cut to two blocks: every check stays cheap


def cifar_batch(data_root, n: int = 4) -> torch.Tensor:
    with np.load(data_root / "cifar10" / "test.npz") as f:
        images = torch.from_numpy(f["images"][:n]).permute(0, 3, 1, 2).float() / 255
    return (images - 0.5) / 0.5


@pytest.fixture
def mini():
    return build_registered("vit_mini_patch4_32", **MINI).eval()


# ------------------------------------------------------------------------------------------- PEFT
@pytest.mark.parametrize(("targets", "wrapped"), [
    (["qkv", "proj", "fc1", "fc2"], 9),  # 4 per block, and patch_embed.proj (a Conv2d, as in timm)
    ("all-linear", 9),  # every Linear, the head included (peft spares only a transformers model's output layer)
    (["fc1"], 2),
])
def test_lora_adapters_are_all_used_and_merge_exactly(mini, targets, wrapped, data_root, one_thread):
    """Every LoRA tensor gets a gradient, and the adapter model computes what its merged weights compute."""
    images = cifar_batch(data_root)
    model = peft.get_peft_model(mini, peft.LoraConfig(target_modules=targets, r=4, init_lora_weights=False))
    lora = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert len(lora) == 2 * wrapped  # A and B per wrapped layer
    model.train()
    model(images).logsumexp(-1).sum().backward()
    starved = [name for name, p in lora.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert starved == []
    model.eval()
    with torch.no_grad():
        adapted = model(images)
        merged = model.merge_and_unload()(images)
    torch.testing.assert_close(adapted, merged, rtol=0, atol=1e-5)


def test_lora_model_equals_timm_lora_on_the_same_weights(mini, data_root, one_thread):
    images = cifar_batch(data_root)
    reference = reference_twin(mini).eval()
    config = peft.LoraConfig(target_modules=["qkv", "proj", "fc1", "fc2"], r=4, init_lora_weights=False)
    torch.manual_seed(1)
    ours = peft.get_peft_model(mini, copy.deepcopy(config))
    torch.manual_seed(1)
    theirs = peft.get_peft_model(reference, copy.deepcopy(config))
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ quantization
def _quantize(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice (its successor is torchao)
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def _serialised_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _quantized_linears(model: nn.Module) -> int:
    return sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())


def test_quantize_dynamic_quantizes_every_linear_like_timm(mini, data_root, one_thread):
    images = cifar_batch(data_root)
    reference = reference_twin(mini).eval()
    linears = sum(type(m) is nn.Linear for m in mini.modules())
    assert linears == 2 * 4 + 1  # qkv, proj, fc1, fc2 per block, and the head
    ours, theirs = _quantize(mini), _quantize(reference)
    assert _quantized_linears(ours) == _quantized_linears(theirs) == linears
    assert not any(type(m) is nn.Linear for m in ours.modules())
    assert abs(_serialised_bytes(ours) - _serialised_bytes(theirs)) < 0.02 * _serialised_bytes(theirs)
    assert _serialised_bytes(ours) < 0.5 * _serialised_bytes(mini)
    with torch.no_grad():
        logits, reference_logits, float_logits = ours(images), theirs(images), mini(images)
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=1e-4)
    assert not torch.equal(logits, float_logits)  # the quantized layers really run


# --------------------------------------------------------------------------- higher-order autograd
def test_double_backward_equals_timm(mini, data_root, one_thread):
    """A gradient penalty (create_graph=True) runs through vitkit's fast linear path and equals timm's. The
    default CPU attention kernel has no double backward in PyTorch (timm stops there too), so both run
    under the math kernel."""
    images = cifar_batch(data_root)
    reference = reference_twin(mini)
    grads = []
    for model in (mini, reference):
        x = images.clone().requires_grad_()
        with sdpa_kernel(SDPBackend.MATH):
            g, = torch.autograd.grad(model(x).logsumexp(-1).sum(), x, create_graph=True)
            g.pow(2).sum().backward()
        grads.append((x.grad, model.blocks[0].mlp.fc1.weight.grad))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_per_sample_gradients_with_torch_func_equal_timm(mini, data_root, one_thread):
    images = cifar_batch(data_root, n=3)
    reference = reference_twin(mini)
    results = []
    for model in (mini, reference):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, image, model=model):
            return torch.func.functional_call(model, p, (image[None],)).logsumexp(-1).sum()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no batching rule" notices for the attention kernels
            results.append(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, images))
    for name in ("blocks.0.mlp.fc1.weight", "blocks.1.attn.qkv.weight", "head.weight"):
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-4, atol=1e-6)
