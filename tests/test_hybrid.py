"""Hybrid ViT (BiT ResNet stem) and the ResNet CNN baseline: weight-exact against timm / torchvision,
the Google hybrid .npz layout, checkpoints, and a short real-data fit."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import vitkit
from jax_layout import transformer_npz
from vitkit.checkpoint import load_weights
from vitkit.convert.jax_hybrid import hybrid_npz_to_state_dict, state_dict_to_hybrid_npz
from vitkit.models.resnet import ResNet, ResNetConfig

DATA = Path(os.environ.get("VITKIT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
TIMM_HYBRIDS = ["vit_tiny_r_s16_p8_224", "vit_tiny_r_s16_p8_384", "vit_small_r26_s32_224", "vit_small_r26_s32_384",
                "vit_base_r26_s32_224", "vit_base_r50_s16_224", "vit_base_r50_s16_384", "vit_large_r50_s32_224",
                "vit_large_r50_s32_384"]
# Small versions of timm's hybrids (same ResNet, shorter/narrower encoder, 64px) for fast parity checks.
SMALL = dict(img_size=64, depth=2, embed_dim=192, num_heads=3, num_classes=10)


def _randomize_norms(model: nn.Module) -> None:
    """Give norms and biases non-trivial values so that a wrong mapping of any of them shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (0.8 if name.endswith("weight") else 0.0))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _ours_like_timm(name: str, **kw) -> nn.Module:
    return vitkit.create_model(name, mlp_dim=4 * kw.get("embed_dim", 192), **kw).eval()


# ------------------------------------------------------------------------------------- registry
@pytest.mark.slow
def test_every_timm_hybrid_is_registered_with_timm_parameter_count_and_keys():
    assert set(TIMM_HYBRIDS) <= set(vitkit.list_models("vit_*_r*"))
    for name in TIMM_HYBRIDS:
        with torch.device("meta"):
            ours = vitkit.create_model(name)
            ref = timm.create_model(name, num_classes=1000)  # timm's r50_s16_224 defaults to a headless in21k model
        ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()), name
        assert list(ours_sd) == list(ref_sd), name
        assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd), name


def test_r50_vit_b16_has_the_papers_shape():
    model = vitkit.create_model("vit_base_r50_s16_224")
    assert model.patch_embed.stride == 16 and model.grid_size == (14, 14)
    assert model.pos_embed.shape == (1, 1 + 14 * 14, 768)
    assert "patch_embed.backbone.stem.conv.weight" in model.state_dict()
    assert model.state_dict()["patch_embed.proj.weight"].shape == (768, 1024, 1, 1)  # patch size 1 on the map


# ----------------------------------------------------------------------------------- timm parity
@pytest.mark.parametrize("name, kw", [
    ("vit_base_r50_s16_224", SMALL),
    ("vit_small_r26_s32_224", SMALL),
    ("vit_tiny_r_s16_p8_224", dict(img_size=64, depth=2, num_classes=10)),
])
def test_timm_hybrid_weights_give_identical_logits(name, kw):
    torch.manual_seed(0)
    ref = timm.create_model(name, **kw).eval()
    _randomize_norms(ref)
    ours = _ours_like_timm(name, **kw)
    load_weights(ours, ref.state_dict(), source=name)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected, got = ref(images), ours(images)
        # the token sequence too, so an error cannot hide behind the classifier
        ref_tokens = ref.patch_embed(images)
        our_tokens, grid = ours.patch_embed(images)
    assert grid == ours.grid_size
    torch.testing.assert_close(our_tokens, ref_tokens, rtol=0, atol=1e-5)
    err = (got - expected).abs().max().item()
    assert err < 1e-5, f"{name}: max |logit difference| {err:.2e}"  # measured: 0.0 (same fp32 operations)


def test_timm_hybrid_weights_fine_tune_at_higher_resolution():
    """A 64px checkpoint loads into a 96px model: position embeddings are resampled like timm's."""
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_r26_s32_224", **SMALL).eval()
    ours = _ours_like_timm("vit_small_r26_s32_224", **{**SMALL, "img_size": 96})
    load_weights(ours, ref.state_dict())
    ref96 = timm.create_model("vit_small_r26_s32_224", **{**SMALL, "img_size": 96}, pretrained=False).eval()
    state = ref.state_dict()
    state["pos_embed"] = ours.pos_embed.detach().clone()
    ref96.load_state_dict(state)
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), ref96(images), rtol=0, atol=1e-5)
    assert ours.grid_size == (3, 3)


# -------------------------------------------------------------------------------- Google .npz


@pytest.mark.parametrize("name, kw", [
    ("vit_small_r26_s32_224", SMALL),  # four stages, with projection units
    ("vit_tiny_r_s16_p8_224", dict(img_size=64, depth=2, num_classes=10)),  # root block only, patch 8
])
@pytest.mark.slow
def test_hybrid_npz_layout_round_trip_and_timm_reads_our_file(tmp_path, name, kw):
    torch.manual_seed(0)
    model = _ours_like_timm(name, **kw)
    _randomize_norms(model)
    state = model.state_dict()
    hybrid = state_dict_to_hybrid_npz(state)
    assert {"conv_root/kernel", "gn_root/scale", "gn_root/bias", "embedding/kernel", "embedding/bias"} <= set(hybrid)
    if name == "vit_small_r26_s32_224":
        assert hybrid["block1/unit1/conv1/kernel"].shape == (1, 1, 64, 64)  # HWIO
        assert hybrid["conv_root/kernel"].shape == (7, 7, 3, 64)
        assert {"block1/unit1/conv_proj/kernel", "block1/unit1/gn_proj/scale", "block4/unit2/gn3/bias"} <= set(hybrid)
        assert not any(k.startswith(("block5/", "block4/unit3/")) for k in hybrid)
        assert not any(k.startswith("block2/unit2/conv_proj") for k in hybrid)
    path = tmp_path / f"{name}.npz"
    np.savez(path, **hybrid, **transformer_npz(state, model.config.num_heads))

    # 1. an independent reader (timm's) loads our file into a model that computes the same function
    ref = timm.create_model(name, **kw).eval()
    ref.load_pretrained(str(path))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ref(images), model(images), rtol=0, atol=1e-5)

    # 2. our reader maps the file's hybrid part back to exactly the tensors it came from
    with np.load(path, allow_pickle=False) as npz:
        restored = hybrid_npz_to_state_dict(dict(npz))
    expected = {k: v for k, v in state.items() if k.startswith("patch_embed.")}
    assert set(restored) == set(expected)
    for key, value in expected.items():
        assert torch.equal(restored[key], value), key

    # 3. and a fresh model given those tensors (plus the transformer) equals the original
    fresh = _ours_like_timm(name, **kw)
    load_weights(fresh, {**{k: v for k, v in state.items() if not k.startswith("patch_embed.")}, **restored})
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))


def test_hybrid_npz_reader_rejects_a_plain_vit_checkpoint():
    with pytest.raises(KeyError, match="conv_root"):
        hybrid_npz_to_state_dict({"embedding/kernel": np.zeros((16, 16, 3, 8), np.float32)})


# ------------------------------------------------------------------------------ small-image hybrid
def test_cifar_hybrid_tokens_stride_and_gradients():
    model = vitkit.create_model("vit_hybrid_cifar_32")
    assert model.patch_embed.stride == 4 and model.grid_size == (8, 8)
    images = torch.randn(4, 3, 32, 32)
    tokens, grid = model.patch_embed(images)
    assert tokens.shape == (4, 64, 192) and grid == (8, 8)
    logits = model(images)
    assert logits.shape == (4, 10)
    logits.logsumexp(-1).mean().backward()
    stem_conv = model.patch_embed.backbone.stem.conv.weight
    assert stem_conv.grad is not None and stem_conv.grad.abs().sum() > 0


def test_hybrid_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="stride 4"):
        vitkit.create_model("vit_hybrid_cifar_32", img_size=30)
    with pytest.raises(ValueError, match=r"unknown config key stem\.stem_widht \(did you mean stem\.stem_width\?\)"):
        vitkit.create_model("vit_hybrid_cifar_32", stem={"layers": [1], "stem_widht": 64})
    with pytest.raises(ValueError, match="widths"):
        vitkit.create_model("vit_hybrid_cifar_32", stem={"layers": [1, 1], "widths": [128]})


def test_dynamic_img_size_hybrid_accepts_other_sizes():
    model = vitkit.create_model("vit_hybrid_cifar_32", dynamic_img_size=True).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 48)).shape == (1, 10)
    with pytest.raises(ValueError, match="stride 4"):
        model(torch.randn(1, 3, 30, 30))


# ------------------------------------------------------------------------------------ conv stem
def test_conv_stem_strides_tokens_and_matches_its_layers():
    model = vitkit.create_model("vit_convstem_cifar_32").eval()
    assert model.patch_embed.stride == 4 and model.grid_size == (8, 8)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, grid = model.patch_embed(images)
        # The definition: conv-BN-ReLU layers, then a 1x1 projection, flattened row-major.
        x = images
        for layer in model.patch_embed.stem:
            x = F.relu(layer.bn(layer.conv(x)))
        expected = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    assert tokens.shape == (2, 64, 128) and grid == (8, 8)
    torch.testing.assert_close(tokens, expected)
    assert tokens.is_contiguous()  # the channels-last map is the token layout: no copy after the stem
    keys = set(model.state_dict())
    assert {"patch_embed.stem.0.conv.weight", "patch_embed.stem.2.bn.running_var",
            "patch_embed.proj.weight"} <= keys


def test_conv_stem_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="stride 4"):
        vitkit.create_model("vit_convstem_cifar_32", img_size=30)
    with pytest.raises(ValueError, match=r"stem\.type must be one of bit, conv; got 'resnet'"):
        vitkit.create_model("vit_convstem_cifar_32", stem={"type": "resnet"})
    with pytest.raises(ValueError, match="'channels' but 2 'strides'"):
        vitkit.create_model("vit_convstem_cifar_32", stem={"type": "conv", "channels": [8], "strides": [2, 2]})
    with pytest.raises(ValueError, match=r"unknown config key stem\.chanels \(did you mean stem\.channels\?\)"):
        vitkit.create_model("vit_convstem_cifar_32", stem={"type": "conv", "chanels": [8]})
    with pytest.raises(ValueError,
                       match=r"stem\.layers does not apply to a 'conv' stem, "
                             r"which takes: act, channels, downsample, strides"):
        vitkit.create_model("vit_convstem_cifar_32", stem={"type": "conv", "channels": [8], "layers": [1]})
    from vitkit.convert import to_timm

    with pytest.raises(ValueError, match="a timm state dict cannot record this hybrid stem"):  # no conv-stem layout
        to_timm(vitkit.create_model("vit_convstem_cifar_32", depth=1))


def test_airbench_stem_pools_between_conv_and_norm():
    """downsample="maxpool": conv (stride 1) -> max-pool -> BN -> GELU, airbench's block order; the
    strided road stays the default."""
    model = vitkit.create_model("vit_airstem_cifar_32").eval()
    _randomize_norms(model)
    assert model.patch_embed.stride == 4 and model.grid_size == (8, 8)
    stem = model.patch_embed.stem
    assert [layer.conv.stride for layer in stem] == [(1, 1)] * 5
    assert [hasattr(layer, "pool") for layer in stem] == [False, True, False, True, False]
    assert all(isinstance(layer.act, nn.GELU) for layer in stem)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, grid = model.patch_embed(images)
        x = images
        for layer in stem:
            x = layer.conv(x)
            if hasattr(layer, "pool"):
                x = F.max_pool2d(x, 2)
            x = F.gelu(layer.bn(x))
        expected = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    assert grid == (8, 8) and tokens.shape == (2, 64, 192)
    torch.testing.assert_close(tokens, expected)
    # The pool has no parameters: the keys are the strided stem's, layer for layer.
    assert {"patch_embed.stem.1.conv.weight", "patch_embed.stem.1.bn.running_mean"} <= set(model.state_dict())
    assert "downsample" not in vitkit.create_model("vit_convstem_cifar_32").config.stem.to_dict()


def test_airbench_stem_matches_timm_around_the_same_cnn():
    """The bench's reference (timm's HybridEmbed around the stem's layers) gives the same logits."""
    from vitkit.bench.reference import reference_twin

    model = vitkit.create_model("vit_airstem_cifar_32").eval()
    _randomize_norms(model)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference_twin(model).eval()(images), atol=1e-5, rtol=1e-5)


def test_airbench_stem_options_are_checked_by_name():
    with pytest.raises(ValueError, match=r"stem\.downsample"):
        vitkit.create_model("vit_convstem_cifar_32",
                            stem={"type": "conv", "channels": [8], "strides": [2], "downsample": "avgpool"})
    with pytest.raises(ValueError, match=r"stem\.act"):
        vitkit.create_model("vit_convstem_cifar_32", stem={"type": "conv", "channels": [8], "act": "tanh"})
    with pytest.raises(ValueError, match=r"stem\.downsample does not apply to a 'bit' stem"):
        vitkit.create_model("vit_hybrid_cifar_32", stem={"layers": [1], "downsample": "maxpool"})


def test_conv_stem_mnist_model_takes_grayscale_28px():
    model = vitkit.create_model("vit_convstem_mnist_28").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model.grid_size == (7, 7)


# ----------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", ["vit_hybrid_cifar_32", "vit_convstem_cifar_32", "resnet20_cifar"])
def test_save_pretrained_and_load_model_round_trip(tmp_path, name):
    model = vitkit.create_model(name, num_classes=3, class_names=["a", "b", "c"]).eval()
    _randomize_norms(model)
    model.save_pretrained(tmp_path / name)
    loaded = vitkit.load_model(tmp_path / name).eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_resnet_config_json_names_its_architecture(tmp_path):
    import json

    vitkit.create_model("resnet20_cifar").save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["architecture"] == "resnet" and data["layers"] == [3, 3, 3]
    data["layrs"] = data.pop("layers")
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="layrs"):
        vitkit.load_model(tmp_path)


# -------------------------------------------------------------------------------- CNN baseline
@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_resnets_have_torchvision_keys_shapes_and_parameter_counts(name):
    with torch.device("meta"):
        ref, ours = getattr(torchvision.models, name)(), vitkit.create_model(name)
    ref_sd, ours_sd = ref.state_dict(), ours.state_dict()
    assert list(ours_sd) == list(ref_sd)
    assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_resnet_weights_give_identical_logits(name):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)(num_classes=10).eval()
    _randomize_norms(ref)
    ours = vitkit.create_model(name, num_classes=10).eval()
    load_weights(ours, ref.state_dict(), source=name)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        err = (ours(images) - ref(images)).abs().max().item()
    assert err < 1e-5  # measured: 0.0 (same operations in the same order)


def test_cifar_resnets_shapes_head_and_gradients():
    model = vitkit.create_model("resnet18_cifar")
    assert isinstance(model, ResNet) and isinstance(model.maxpool, nn.Identity)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    images = torch.randn(2, 3, 32, 32)
    features = model.forward_features(images)
    assert features.shape == (2, 512, 4, 4)
    assert model.forward_head(features, pre_logits=True).shape == (2, 512)
    logits = model(images)
    assert logits.shape == (2, 10)
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())

    small = vitkit.create_model("resnet20_cifar")
    assert 0.26e6 < sum(p.numel() for p in small.parameters()) < 0.29e6  # He et al.: 0.27M
    assert small.forward_features(images).shape == (2, 64, 8, 8)

    small.reset_head(5, class_names=list("abcde"))
    assert small.config.num_classes == 5 and small.config.class_names == list("abcde")
    assert torch.equal(small(images), torch.zeros(2, 5))  # zero-initialised head
    assert small.no_weight_decay() == set()


def test_resnet_rejects_bad_input_and_config():
    model = vitkit.create_model("resnet20_cifar")
    with pytest.raises(ValueError, match=r"\(batch, 3, H, W\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="patch_size"):
        vitkit.create_model("resnet20_cifar", patch_size=4)
    with pytest.raises(ValueError, match="block"):
        ResNetConfig(block="wide")


def test_resnet_stochastic_depth_only_in_training():
    model = vitkit.create_model("resnet20_cifar", drop_path_rate=0.5)
    _randomize_norms(model)
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), model(images))
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        outs = [model(images) for _ in range(3)]
    assert not all(torch.equal(outs[0], o) for o in outs[1:])


# ------------------------------------------------------------------------------- real-data fit
@pytest.fixture(scope="module")
def cifar_batch():
    path = DATA / "cifar10" / "test.npz"
    if not path.is_file():
        pytest.fail(f"CIFAR-10 not found at {path} (set VITKIT_DATA)")
    with np.load(path, allow_pickle=False) as npz:
        images, labels = npz["images"][:32], npz["labels"][:32]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    return (x - mean[:, None, None]) / std[:, None, None], torch.from_numpy(labels).long()


@pytest.mark.parametrize("name, overrides, steps", [
    ("resnet20_cifar", {}, 8),
    ("vit_hybrid_cifar_32", {"depth": 1}, 6),  # the full ResNet stem, a one-layer encoder for speed
    ("vit_convstem_cifar_32", {}, 6),
])
@pytest.mark.slow
def test_a_few_steps_on_real_cifar_images_reduce_the_loss(cifar_batch, name, overrides, steps):
    torch.manual_seed(0)
    images, labels = cifar_batch
    model = vitkit.create_model(name, **overrides).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2 if name.startswith("resnet") else 1e-3,
                                  weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss()

    def loss_now() -> float:  # in training mode: BatchNorm uses batch statistics, as while fitting
        with torch.no_grad():
            return loss_fn(model(images), labels).item()

    before = loss_now()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(images), labels).backward()
        optimizer.step()
    after = loss_now()
    assert after < 0.8 * before, f"{name}: loss {before:.3f} -> {after:.3f}"


def test_hybrid_supports_the_vit_inspection_api():
    model = vitkit.create_model("vit_hybrid_cifar_32", depth=2).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        maps = model.attention_maps(images)
        feats = model.forward_intermediates(images, indices=1, output_fmt="NCHW", intermediates_only=True)
    assert len(maps) == 2 and maps[0].shape == (1, 12, 65, 65)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(1, 12, 65))
    assert feats[0].shape == (1, 192, 8, 8)

