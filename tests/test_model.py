"""The ViT of the paper: structure, numerics against timm, API contracts and error messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

import vitkit
from vitkit import ViTConfig, create_model
from vitkit.checkpoint import CheckpointError
from vitkit.models import PatchEmbed
from vitkit.models.registry import get_model_config
from vitkit.models.zoo import SIZES

TINY = dict(img_size=32, patch_size=8, num_classes=7, embed_dim=48, depth=3, num_heads=4, mlp_dim=96)


def tiny(**overrides) -> vitkit.VisionTransformer:
    return vitkit.VisionTransformer(ViTConfig(**{**TINY, **overrides})).eval()


def timm_twin(config: ViTConfig, **kwargs) -> TimmViT:
    return TimmViT(img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans,
                   num_classes=config.num_classes, embed_dim=config.embed_dim, depth=config.depth,
                   num_heads=config.num_heads, mlp_ratio=config.mlp_dim / config.embed_dim, **kwargs).eval()


def cifar_batch(data_root, n=8, size=32) -> torch.Tensor:
    with np.load(data_root / "cifar10" / "test.npz") as f:
        images = torch.from_numpy(f["images"][:n]).permute(0, 3, 1, 2).float() / 255
    images = (images - 0.5) / 0.5
    if size != 32:
        images = nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)
    return images


# ------------------------------------------------------------------------------ the paper's model
def test_patch_embedding_equals_rearrange_then_linear():
    """Eq. 1: x_p^i E with x_p the flattened (p1 p2 c) patches equals the strided convolution."""
    P, C, D = 4, 3, 16
    embed = PatchEmbed(P, C, D)
    images = torch.randn(2, C, 12, 8)
    b, c, h, w = images.shape
    patches = images.reshape(b, c, h // P, P, w // P, P).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, P * P * C)
    linear = nn.Linear(P * P * C, D)
    with torch.no_grad():  # conv weight (D, C, p1, p2) -> linear weight (D, p1 p2 c)
        linear.weight.copy_(embed.proj.weight.permute(0, 2, 3, 1).reshape(D, -1))
        linear.bias.copy_(embed.proj.bias)
    tokens, grid = embed(images)
    assert grid == (3, 2)
    torch.testing.assert_close(tokens, linear(patches), rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", list(SIZES))
def test_parameter_counts_equal_timm_for_every_size(size):
    for name in vitkit.list_models(f"vit_{size}_patch*"):
        config = get_model_config(name)
        with torch.device("meta"):
            ours = sum(p.numel() for p in create_model(name).parameters())
            if config.representation_size is None:
                theirs = sum(p.numel() for p in timm_twin(config).parameters())
            else:  # timm dropped the representation layer: add Dense(D, D) by hand
                theirs = sum(p.numel() for p in timm_twin(config.replace(num_classes=0)).parameters())
                theirs += config.embed_dim * config.representation_size + config.representation_size
                theirs += (config.representation_size + 1) * config.num_classes
        assert ours == theirs, name


def test_parameter_counts_of_the_paper_table():
    """Table 1 of the paper (1000 classes): ViT-B/16 86M, ViT-L/16 307M -> exact public counts."""
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in create_model(n).parameters())
                  for n in ("vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224")}
    assert counts == {"vit_base_patch16_224": 86_567_656, "vit_large_patch16_224": 304_326_632,
                      "vit_huge_patch14_224": 632_045_800}


def test_pre_norm_block_layout():
    block = tiny().blocks[0]
    assert [name for name, _ in block.named_children()] == ["norm1", "attn", "drop_path1", "norm2", "mlp",
                                                            "drop_path2"]
    assert block.norm1.eps == 1e-6
    assert isinstance(block.mlp.act, nn.GELU) and block.mlp.act.approximate == "none"
    assert block.attn.qkv.out_features == 3 * 48


# ---------------------------------------------------------------------------- numerics vs timm
@pytest.mark.parametrize("overrides,timm_kwargs", [
    ({}, {}),
    ({"global_pool": "avg", "fc_norm": True}, {"global_pool": "avg", "fc_norm": True}),
    ({"global_pool": "avg", "class_token": False, "fc_norm": True},
     {"global_pool": "avg", "class_token": False, "fc_norm": True}),
    ({"img_size": (32, 48)}, {}),
])
def test_logits_equal_timm_with_the_same_weights(data_root, overrides, timm_kwargs):
    model = tiny(**overrides)
    reference = timm_twin(model.config, **timm_kwargs)
    reference.load_state_dict(model.state_dict())
    images = cifar_batch(data_root)
    if model.config.image_hw != (32, 32):
        images = nn.functional.interpolate(images, size=model.config.image_hw)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(model.forward_head(model.forward_features(images), pre_logits=True),
                                   reference.forward_head(reference.forward_features(images), pre_logits=True),
                                   rtol=0, atol=1e-5)


def test_forward_intermediates_match_timm(data_root):
    model = tiny()
    reference = timm_twin(model.config)
    reference.load_state_dict(model.state_dict())
    images = cifar_batch(data_root)
    with torch.no_grad():
        final, ours = model.forward_intermediates(images, indices=[0, -1], output_fmt="NCHW")
        ref_final, theirs = reference.forward_intermediates(images, indices=[0, 2], output_fmt="NCHW")
        torch.testing.assert_close(final, ref_final, rtol=0, atol=1e-5)
        for a, b in zip(ours, theirs, strict=True):
            assert a.shape == (8, 48, 4, 4)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        last_two = model.forward_intermediates(images, indices=2, intermediates_only=True, norm=True, output_fmt="NLC")
        assert [t.shape for t in last_two] == [(8, 16, 48)] * 2  # patch tokens: timm drops the class token
        torch.testing.assert_close(last_two[-1], model.forward_features(images)[:, 1:], rtol=0, atol=1e-6)


def test_attention_probabilities_match_the_fused_path(data_root):
    model = tiny()
    images = cifar_batch(data_root)
    with torch.no_grad():
        x = model.embed(images)
        for block in model.blocks:
            fused = block(x)
            explicit, attn = block.forward_with_attention(x)
            torch.testing.assert_close(explicit, fused, rtol=0, atol=1e-5)
            assert attn.shape == (8, 4, 17, 17)
            torch.testing.assert_close(attn.sum(-1), torch.ones(8, 4, 17), rtol=0, atol=1e-5)
            # the probabilities themselves, from the definition softmax(q k^T / sqrt(d))
            q, k, _ = block.attn.qkv(block.norm1(x)).reshape(8, 17, 3, 4, 12).permute(2, 0, 3, 1, 4)
            torch.testing.assert_close(attn, (q @ k.transpose(-2, -1) / 12 ** 0.5).softmax(-1), rtol=0, atol=1e-6)
            x = fused
        maps = model.attention_maps(images, indices=[1])
        assert len(maps) == 1 and maps[0].shape == (8, 4, 17, 17)


# ---------------------------------------------------------------------------- heads and init
def test_init_follows_the_jax_release():
    model = create_model("vit_base_patch16_224")
    assert 0.015 < model.pos_embed.std().item() < 0.025
    assert model.pos_embed.abs().max().item() <= 0.04 + 1e-6
    assert model.cls_token.abs().max().item() < 1e-4
    fc1 = model.blocks[0].mlp.fc1
    bound = (6 / (fc1.in_features + fc1.out_features)) ** 0.5  # Xavier-uniform
    assert fc1.weight.abs().max().item() <= bound and fc1.weight.abs().max().item() > 0.9 * bound
    assert 0 < fc1.bias.abs().max().item() < 1e-4
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    patch = model.patch_embed.proj.weight
    assert abs(patch.std().item() - (1 / patch[0].numel()) ** 0.5) < 0.1 * (1 / patch[0].numel()) ** 0.5


def test_zero_head_and_reset_head(data_root):
    model = tiny(head_init="zeros")
    assert torch.count_nonzero(model.head.weight) == 0
    with torch.no_grad():
        assert torch.count_nonzero(model(cifar_batch(data_root))) == 0

    pretrain = tiny(representation_size=32)
    assert isinstance(pretrain.pre_logits.act, nn.Tanh) and pretrain.head.in_features == 32
    pretrain.reset_head(3, class_names=["a", "b", "c"])
    assert isinstance(pretrain.pre_logits, nn.Identity)
    assert pretrain.head.weight.shape == (3, 48) and torch.count_nonzero(pretrain.head.weight) == 0
    assert pretrain.config.num_classes == 3 and pretrain.config.class_names == ["a", "b", "c"]
    assert pretrain.config.representation_size is None


def test_drop_path_is_per_sample_and_off_in_eval():
    model = tiny(drop_path_rate=0.5)
    rates = [b.drop_path1.p for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == 0.5 and rates == sorted(rates)
    drop = model.blocks[-1].drop_path1.train()
    out = drop(torch.ones(4000, 3, 2))
    per_sample = out[:, 0, 0]
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert torch.all(out == out[:, :1, :1])  # the whole sample is kept or dropped
    assert abs(per_sample.mean().item() - 1.0) < 0.1
    assert torch.equal(drop.eval()(torch.ones(3, 2)), torch.ones(3, 2))


# ------------------------------------------------------------------------------- API contracts
def test_errors_say_what_was_expected():
    model = tiny()
    with pytest.raises(ValueError, match=r"3 input channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"shape \(batch, 3, H, W\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"floating-point.*uint8"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"size \(32, 32\), got \(64, 64\)"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"vit_base_patch16_224"):
        create_model("vit_bsae_patch16_224")
    with pytest.raises(ValueError, match=r"not divisible by patch_size"):
        ViTConfig(img_size=30, patch_size=4)
    with pytest.raises(TypeError, match=r"embed_dimm"):
        create_model("vit_tiny_patch16_224", embed_dimm=3)


def test_dynamic_img_size_resamples_on_the_fly(data_root):
    model = tiny(dynamic_img_size=True)
    fixed = vitkit.VisionTransformer(model.config.replace(dynamic_img_size=False)).eval()
    fixed.load_state_dict(model.state_dict())
    images = cifar_batch(data_root)
    with torch.no_grad():
        torch.testing.assert_close(model(images), fixed(images), rtol=0, atol=0)
        assert model(cifar_batch(data_root, size=48)).shape == (8, 7)


def test_list_models_and_registry_names():
    names = vitkit.list_models()
    for expected in ("vit_base_patch16_224", "vit_base_patch32_384", "vit_large_patch16_224",
                     "vit_huge_patch14_224", "vit_tiny_patch16_384", "vit_small_patch32_224"):
        assert expected in names
    assert vitkit.list_models("vit_large_patch*_384") == ["vit_large_patch16_384", "vit_large_patch32_384"]
    cfg = get_model_config("vit_large_patch16_384")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.img_size) == (1024, 24, 16, 4096, 384)


def test_config_serialises_to_json(tmp_path):
    config = ViTConfig(**{**TINY, "img_size": (32, 48)}, class_names=list("abcdefg"))
    config.to_json(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["img_size"] == [32, 48]
    assert ViTConfig.from_json(tmp_path / "c.json") == config
    (tmp_path / "bad.json").write_text(json.dumps({**config.to_dict(), "depht": 3}))
    with pytest.raises(ValueError, match=r"bad.json.*depht"):
        ViTConfig.from_json(tmp_path / "bad.json")


# ------------------------------------------------------------------------------ vitkit's format
def test_save_and_load_pretrained_round_trip(tmp_path, data_root):
    model = tiny(class_names=list("abcdefg"))
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = vitkit.load_model(tmp_path / "m").eval()
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    images = cifar_batch(data_root)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)
        bigger = vitkit.load_model(tmp_path / "m", img_size=64).eval()
        assert bigger.pos_embed.shape == (1, 1 + 64, 48) and bigger.grid_size == (8, 8)
        assert bigger(cifar_batch(data_root, size=64)).shape == (8, 7)
        torch.testing.assert_close(bigger.pos_embed[:, 0], model.pos_embed[:, 0])  # class token kept apart


def test_load_errors_name_the_fault(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    state = model.state_dict()
    from vitkit.checkpoint import load_weights
    from vitkit.fileio import save_state_dict

    bad = dict(state)
    bad["blocks.0.mlp.fc1.weight"] = torch.zeros(5, 48)
    del bad["norm.bias"]
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_weights(tiny(), bad, source="bad.safetensors")
    message = str(err.value)
    assert "bad.safetensors" in message and "norm.bias" in message and "extra.weight" in message
    assert "blocks.0.mlp.fc1.weight: checkpoint (5, 48) vs model (96, 48)" in message

    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 10)  # truncated
    with pytest.raises(CheckpointError, match=r"model.safetensors"):
        vitkit.load_model(tmp_path / "m")
    save_state_dict(state, tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json.*not valid JSON"):
        vitkit.load_model(tmp_path / "m")


def test_backward_reaches_every_parameter(data_root):
    model = tiny().train()
    loss = nn.functional.cross_entropy(model(cifar_batch(data_root)), torch.arange(8) % 7)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
