"""Weight initialisation (issue 25): each module initialises its own weights, one mode switch serves every
family, each family starts from its published recipe, and every weight is initialised once."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vitkit.models import build_registered, get_model_config
from vitkit.models.init import whiten_conv_
from vitkit.models.mae import MaskedAutoencoder
from vitkit.models.t2t import T2TViT
from vitkit.models.vit import VisionTransformer

FAMILIES = {"vit": "vit_mini_patch4_32", "t2t": "t2t_vit_t_mini_32", "mae": "mae_vit_mini_patch4_32"}


def _xavier_bound(layer: nn.Linear) -> float:
    return math.sqrt(6 / (layer.in_features + layer.out_features))


def check_linear(layer: nn.Linear, mode: str) -> None:
    """The statistics a linear layer of the encoder's MLP has under ``mode``."""
    w, b = layer.weight.detach(), layer.bias.detach()
    if mode == "timm":  # trunc-normal(0.02), cut at +-2 (i.e. 100 std): the sample std is 0.02
        assert abs(w.std().item() - 0.02) < 0.002 and torch.count_nonzero(b) == 0
    else:  # Xavier-uniform fills its bound
        assert 0.9 * _xavier_bound(layer) < w.abs().max().item() <= _xavier_bound(layer)
        assert abs(w.std().item() - _xavier_bound(layer) / math.sqrt(3)) < 0.1 * _xavier_bound(layer)
    if mode == "jax":  # the JAX release's N(0, 1e-6) MLP biases
        assert 0 < b.abs().max().item() < 1e-5
    else:
        assert torch.count_nonzero(b) == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["jax", "timm", "mae"])
def test_one_mode_switch_for_every_family(family, mode):
    model = build_registered(FAMILIES[family])
    model.init_weights(mode)
    check_linear(model.blocks[0].mlp.fc1, mode)
    check_linear(model.blocks[-1].mlp.fc2, mode)
    qkv = model.blocks[0].attn.qkv
    if qkv.bias is not None:
        assert torch.count_nonzero(qkv.bias) == 0
    norm = model.blocks[0].norm1
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and torch.count_nonzero(norm.bias) == 0
    token_std = model.cls_token.std().item()
    assert token_std < 1e-5 if mode == "jax" else 0.01 < token_std < 0.03


def test_bad_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="weight init mode must be one of jax, timm, mae"):
        build_registered("vit_mini_patch4_32", depth=1).init_weights("xavier")


@pytest.mark.parametrize(("family", "mode"), [("vit", "jax"), ("t2t", "timm"), ("mae", "mae")])
def test_each_family_starts_from_its_own_recipe(family, mode):
    model = build_registered(FAMILIES[family])
    assert model.weight_init == mode
    check_linear(model.blocks[0].mlp.fc1, mode)
    if family == "t2t":  # the official T2T init reaches the tokens-to-token transformers too
        check_linear(model.tokens_to_token.attention1.mlp.fc1, "timm")
        assert not model.pos_embed.requires_grad  # the fixed sinusoid is not re-initialised
    if family == "mae":
        assert 0.01 < model.mask_token.std().item() < 0.03
        check_linear(model.decoder_blocks[0].mlp.fc1, "mae")


def test_the_masked_autoencoder_builds_its_own_encoder_and_initialises_once(monkeypatch):
    def no_vit(*args, **kwargs):
        raise AssertionError("a VisionTransformer was built")

    monkeypatch.setattr(VisionTransformer, "__init__", no_vit)
    calls = []
    xavier = nn.init.xavier_uniform_
    monkeypatch.setattr(nn.init, "xavier_uniform_", lambda t, *a, **k: calls.append(t.shape) or xavier(t, *a, **k))
    model = MaskedAutoencoder(get_model_config("mae_vit_mini_patch4_32"))
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert len(calls) == linears + 1  # each linear once, and the patch projection


def test_t2t_is_a_vision_transformer_built_by_its_constructor():
    """T2T-ViT changes only its tokenizer, position table and init recipe; construction, head and reset are
    VisionTransformer's (it no longer skips its parent's constructor or re-implements the head)."""
    own = set(vars(T2TViT))
    assert not own & {"__init__", "_new_head", "reset_head", "init_weights", "no_weight_decay"}
    model = build_registered("t2t_vit_t_mini_32")
    model.reset_head(3)
    assert torch.count_nonzero(model.head.weight) == 0 and model.head.out_features == 3
    model.reset_head(4, zero_init=False)
    assert abs(model.head.weight.std().item() - 0.02) < 0.004  # T2T's own head init: trunc-normal(0.02)


def test_whitening_init_decorrelates_the_first_layers_patches():
    # Images with strongly correlated neighbouring pixels and channels (a blurred, channel-mixed field).
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 3, 20, 20, generator=generator)
    images = torch.nn.functional.avg_pool2d(noise, 3, stride=1, padding=1) @ torch.ones(20, 20) / 20 + 0.5 * noise
    images = torch.einsum("dc,bchw->bdhw", torch.tensor([[1.0, 0.5, 0.2], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]]), images)
    conv = nn.Conv2d(3, 24, 3, padding=1, bias=False)
    eigenvalues = whiten_conv_(conv, images.split(16), eps=1e-6)
    assert eigenvalues.shape == (27,) and bool((eigenvalues[:-1] >= eigenvalues[1:]).all())

    # Where the filters see no padding, the first 12 channels are uncorrelated with unit variance (up to eps)
    # and the second 12 are their negations.
    out = conv(images)[:, :, 1:-1, 1:-1].permute(0, 2, 3, 1).reshape(-1, 24).double()
    torch.testing.assert_close(out[:, 12:], -out[:, :12])
    covariance = torch.cov(out[:, :12].T)
    expected = torch.diag(eigenvalues[:12] / (eigenvalues[:12] + 1e-6))
    torch.testing.assert_close(covariance, expected, atol=1e-4, rtol=0)

    # More output channels than twice the patch dimension: the extra ones keep their initialisation.
    wide = nn.Conv2d(1, 6, 1, bias=False)
    before = wide.weight.detach().clone()
    whiten_conv_(wide, [images[:, :1]])
    assert not torch.equal(wide.weight[:2], before[:2]) and torch.equal(wide.weight[2:], before[2:])
    with pytest.raises(ValueError, match="groups=3"):
        whiten_conv_(nn.Conv2d(3, 6, 3, groups=3), [images])
