"""Checkpoint interchange: parity with timm, transformers, torchvision and Google's npz layouts,
lossless round trips, clear errors, and refusal of files that would run code.

Reference models are randomly initialised in their own library, then every parameter (LayerNorm
scales and biases included) is perturbed, so that a swapped or transposed tensor cannot go unnoticed.
"""

from __future__ import annotations

import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vitkit
from vitkit import ViTConfig, build_model
from vitkit.checkpoint import CheckpointError
from vitkit.cli import main as cli_main
from vitkit.convert import read_checkpoint, save_as, to_huggingface, to_npz, to_timm, to_torchvision

TOL = 1e-5  # float32, max abs logit difference


def perturb(module: nn.Module, scale: float = 0.05) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module.eval()


def images(size: int, batch: int = 2, chans: int = 3) -> Tensor:
    return torch.randn(batch, chans, size, size)


def max_diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_parity(ours: Tensor, theirs: Tensor, what: str) -> None:
    err = max_diff(ours, theirs)
    print(f"parity {what}: max abs diff {err:.3g}")
    assert err < TOL, f"{what}: max abs logit difference {err:.3g}"


def tiny_vitkit(**overrides) -> nn.Module:
    fields = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_dim=128, num_classes=5)
    return perturb(build_model(ViTConfig(**{**fields, **overrides})))


def assert_same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------------------ timm
TIMM_CASES = {
    "D64_32px_pth": (dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                          num_classes=10), "model.pth", 4),
    "Ti-width_48px_safetensors": (dict(img_size=48, patch_size=16, embed_dim=192, depth=2, num_heads=3,
                                       num_classes=7), "model.safetensors", None),  # heads from Table 1
    "avg_pool_fc_norm_no_cls": (dict(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=3, num_classes=4,
                                     class_token=False, global_pool="avg"), "model.bin", 3),
    "no_qkv_bias_avg_with_cls": (dict(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=2, num_classes=3,
                                      qkv_bias=False, global_pool="avg", fc_norm=False), "model.pth", 2),
}


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_parity(tmp_path, case):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    kwargs, filename, heads = TIMM_CASES[case]
    reference = perturb(TimmViT(**kwargs))
    path = tmp_path / filename
    vitkit.convert.export.save_state_dict_file(reference.state_dict(), path)
    overrides = {"global_pool": kwargs["global_pool"]} if "global_pool" in kwargs else {}
    model = vitkit.from_pretrained(path, num_heads=heads, **overrides).eval()
    assert model.config.num_heads == kwargs["num_heads"] and model.config.extra["converted_from"] == "timm"
    x = images(kwargs["img_size"])
    with torch.no_grad():
        assert_parity(model(x), reference(x), f"timm {case}")
        # and back: timm loads our export strictly and agrees
        reference.load_state_dict(to_timm(model), strict=True)
        assert_parity(model(x), reference(x), f"timm {case} (exported back)")


def test_timm_hub_directory(tmp_path):
    """timm's Hub layout: config.json naming the architecture, weights in model.safetensors."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    reference = perturb(TimmViT(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=2))
    (tmp_path / "hub").mkdir()
    vitkit.convert.export.save_state_dict_file(reference.state_dict(), tmp_path / "hub" / "model.safetensors")
    (tmp_path / "hub" / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224.augreg_in21k_ft_in1k", "num_classes": 2, "num_features": 192,
        "pretrained_cfg": {"label_names": ["no", "yes"], "mean": [0.5] * 3, "std": [0.5] * 3}}))
    model = vitkit.from_pretrained(tmp_path / "hub").eval()
    assert model.config.class_names == ["no", "yes"] and model.config.extra["converted_from"] == "timm"
    x = images(32)
    with torch.no_grad():
        assert_parity(model(x), reference(x), "timm Hub directory")


def test_timm_resolution_change_matches_timm_resampling(tmp_path):
    """Loading at 64 px a checkpoint trained at 32 px: vitkit's 2-D resampling equals timm's own."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from timm.models.vision_transformer import checkpoint_filter_fn

    kwargs = dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=6)
    small = perturb(TimmViT(img_size=32, **kwargs))
    path = tmp_path / "small.safetensors"
    vitkit.convert.export.save_state_dict_file(small.state_dict(), path)
    large = TimmViT(img_size=64, **kwargs).eval()
    large.load_state_dict(checkpoint_filter_fn(small.state_dict(), large))
    model = vitkit.from_pretrained(path, img_size=64, num_heads=4).eval()
    assert model.pos_embed.shape == large.pos_embed.shape == (1, 1 + 64, 64)
    x = images(64)
    with torch.no_grad():
        assert_parity(model(x), large(x), "timm 32->64 px resampled")

    bilinear = vitkit.from_pretrained(path, img_size=64, num_heads=4, interpolation="bilinear")
    assert bilinear.config.pos_embed_interpolation == "bilinear"
    old = small.pos_embed.detach()
    assert torch.equal(bilinear.pos_embed[:, :1], old[:, :1])  # the class token's entry is kept apart
    grid = old[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(bilinear.pos_embed[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 64, 64), atol=1e-6)
    assert not torch.allclose(bilinear.pos_embed, model.pos_embed, atol=1e-4)  # bicubic differs


# ---------------------------------------------------------------------------------- transformers
HF_CASES = {
    "D64_32px_named_labels": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  image_size=32, patch_size=8, num_labels=3,
                                  id2label={0: "cat", 1: "dog", 2: "emu"}, label2id={"cat": 0, "dog": 1, "emu": 2}),
    "D192_48px_no_qkv_bias": dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=384,
                                  image_size=48, patch_size=16, num_labels=5, qkv_bias=False),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_transformers_classifier_parity(tmp_path, case):
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification

    cfg = HF_CASES[case]
    reference = perturb(ViTForImageClassification(HFConfig(**cfg)))
    sharded = cfg["hidden_size"] > 64
    reference.save_pretrained(tmp_path / "hf", max_shard_size="200KB" if sharded else "5GB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == sharded
    model = vitkit.from_pretrained(tmp_path / "hf").eval()
    assert model.config.norm_eps == 1e-12  # Hugging Face's default, read from config.json
    if "id2label" in cfg:
        assert model.config.class_names == ["cat", "dog", "emu"]
    x = images(cfg["image_size"])
    with torch.no_grad():
        expected = reference(pixel_values=x).logits
        assert_parity(model(x), expected, f"transformers {case}")
        if not sharded:  # the weights file alone takes its config.json from beside it
            alone = vitkit.from_pretrained(tmp_path / "hf" / "model.safetensors").eval()
            assert alone.config.class_names == ["cat", "dog", "emu"]
            assert_parity(alone(x), expected, f"transformers {case} (weights file)")
        # an in-memory transformers 5 state dict (q_proj/o_proj names), saved bare
        unused_pooler = {"vit.pooler.dense.weight": torch.randn(cfg["hidden_size"], cfg["hidden_size"]),
                         "vit.pooler.dense.bias": torch.randn(cfg["hidden_size"])}  # ignored by transformers too
        torch.save({**reference.state_dict(), **unused_pooler}, tmp_path / "bare.pth")
        bare = vitkit.from_pretrained(tmp_path / "bare.pth", num_heads=cfg["num_attention_heads"]).eval()
        assert_parity(bare(x), expected, f"transformers {case} (bare 5.x state dict)")


def test_transformers_vitmodel_pooler_is_the_representation_layer(tmp_path):
    from transformers import ViTConfig as HFConfig
    from transformers import ViTModel

    reference = perturb(ViTModel(HFConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128, image_size=32, patch_size=8)))
    reference.save_pretrained(tmp_path / "hf")
    model = vitkit.from_pretrained(tmp_path / "hf").eval()
    assert model.config.num_classes == 0 and model.config.representation_size == 64
    x = images(32)
    with torch.no_grad():
        out = reference(pixel_values=x)
        assert_parity(model.forward_features(x), out.last_hidden_state, "transformers ViTModel tokens")
        assert_parity(model(x), out.pooler_output, "transformers ViTModel pooler")


def test_export_to_transformers_loads_and_agrees(tmp_path):
    from transformers import ViTForImageClassification, ViTModel

    model = tiny_vitkit(class_names=["a", "b", "c", "d", "e"])
    to_huggingface(model, tmp_path / "cls")
    reference = ViTForImageClassification.from_pretrained(tmp_path / "cls").eval()
    assert reference.config.id2label[4] == "e"
    x = images(32)
    with torch.no_grad():
        assert_parity(model(x), reference(pixel_values=x).logits, "export -> transformers classifier")

    backbone = tiny_vitkit(num_classes=0, representation_size=48)
    to_huggingface(backbone, tmp_path / "backbone")
    reference = ViTModel.from_pretrained(tmp_path / "backbone").eval()
    with torch.no_grad():
        assert_parity(backbone(x), reference(pixel_values=x).pooler_output, "export -> transformers ViTModel")


# ----------------------------------------------------------------------------------- torchvision
TV_CASES = {
    "D64_32px_patch8": dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                            num_classes=10),
    "D192_64px_patch16_representation": dict(image_size=64, patch_size=16, num_layers=2, num_heads=3, hidden_dim=192,
                                             mlp_dim=256, num_classes=4, representation_size=96),
}


@pytest.mark.parametrize("case", list(TV_CASES))
def test_torchvision_parity(tmp_path, case):
    from torchvision.models import VisionTransformer as TorchvisionViT

    cfg = TV_CASES[case]
    reference = perturb(TorchvisionViT(**cfg))
    path = tmp_path / "vit.pth"
    torch.save(reference.state_dict(), path)
    heads = cfg["num_heads"] if cfg["hidden_dim"] == 64 else None  # 192 -> 3 heads from Table 1
    model = vitkit.from_pretrained(path, num_heads=heads).eval()
    assert model.config.representation_size == cfg.get("representation_size")
    x = images(cfg["image_size"])
    with torch.no_grad():
        assert_parity(model(x), reference(x), f"torchvision {case}")
        reference.load_state_dict(to_torchvision(model), strict=True)
        assert_parity(model(x), reference(x), f"torchvision {case} (exported back)")


# ------------------------------------------------------------------------------ Google npz (JAX)
def vit_jax_arrays(*, dim=64, depth=2, heads=4, mlp=96, patch=8, img=32, classes=5, rep=32, cls=True, seed=0):
    """Random arrays in vit_jax's layout and shapes (Flax: Dense kernels (in, out), HWIO conv)."""
    g = np.random.default_rng(seed)
    r = lambda *shape: g.normal(0, 0.2, shape).astype(np.float32)  # noqa: E731
    n = (img // patch) ** 2 + int(cls)
    a = {"embedding/kernel": r(patch, patch, 3, dim), "embedding/bias": r(dim),
         "Transformer/posembed_input/pos_embedding": r(1, n, dim),
         "Transformer/encoder_norm/scale": 1 + r(dim), "Transformer/encoder_norm/bias": r(dim)}
    if cls:
        a["cls"] = r(1, 1, dim)
    for i in range(depth):
        p = f"Transformer/encoderblock_{i}"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            a[f"{p}/{ln}/scale"], a[f"{p}/{ln}/bias"] = 1 + r(dim), r(dim)
        for name in ("query", "key", "value"):
            a[f"{p}/MultiHeadDotProductAttention_1/{name}/kernel"] = r(dim, heads, dim // heads)
            a[f"{p}/MultiHeadDotProductAttention_1/{name}/bias"] = r(heads, dim // heads)
        a[f"{p}/MultiHeadDotProductAttention_1/out/kernel"] = r(heads, dim // heads, dim)
        a[f"{p}/MultiHeadDotProductAttention_1/out/bias"] = r(dim)
        a[f"{p}/MlpBlock_3/Dense_0/kernel"], a[f"{p}/MlpBlock_3/Dense_0/bias"] = r(dim, mlp), r(mlp)
        a[f"{p}/MlpBlock_3/Dense_1/kernel"], a[f"{p}/MlpBlock_3/Dense_1/bias"] = r(mlp, dim), r(dim)
    width = dim
    if rep:
        a["pre_logits/kernel"], a["pre_logits/bias"] = r(dim, rep), r(rep)
        width = rep
    a["head/kernel"], a["head/bias"] = r(width, classes), r(classes)
    return a


def jax_reference_forward(a: dict[str, np.ndarray], x: Tensor) -> Tensor:
    """The vit_jax forward pass written from the Flax modules' semantics (NHWC, per-head einsums),
    independently of vitkit's code. GELU is exact, as in vitkit and timm (Flax's default is tanh)."""
    t = {k: torch.from_numpy(v).double() for k, v in a.items()}
    x = x.double().permute(0, 2, 3, 1)  # NHWC
    kernel = t["embedding/kernel"]
    p, dim = kernel.shape[0], kernel.shape[-1]
    b, h, w, c = x.shape
    patches = x.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
    z = patches @ kernel.reshape(p * p * c, dim) + t["embedding/bias"]
    if "cls" in t:
        z = torch.cat([t["cls"].expand(b, 1, dim), z], dim=1)
    z = z + t["Transformer/posembed_input/pos_embedding"]

    def ln(v, prefix):
        return F.layer_norm(v, (dim,), t[f"{prefix}/scale"], t[f"{prefix}/bias"], eps=1e-6)

    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in t:
        pre, att = f"Transformer/encoderblock_{i}", f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1"
        y = ln(z, f"{pre}/LayerNorm_0")
        q, k, v = (torch.einsum("bnd,dhk->bnhk", y, t[f"{att}/{n}/kernel"]) + t[f"{att}/{n}/bias"]
                   for n in ("query", "key", "value"))
        weights = torch.einsum("bqhk,bphk->bhqp", q, k).div(math.sqrt(q.shape[-1])).softmax(-1)
        heads_out = torch.einsum("bhqp,bphk->bqhk", weights, v)
        z = z + torch.einsum("bqhk,hkd->bqd", heads_out, t[f"{att}/out/kernel"]) + t[f"{att}/out/bias"]
        y = ln(z, f"{pre}/LayerNorm_2")
        y = F.gelu(y @ t[f"{pre}/MlpBlock_3/Dense_0/kernel"] + t[f"{pre}/MlpBlock_3/Dense_0/bias"])
        z = z + y @ t[f"{pre}/MlpBlock_3/Dense_1/kernel"] + t[f"{pre}/MlpBlock_3/Dense_1/bias"]
        i += 1
    z = ln(z, "Transformer/encoder_norm")
    y = z[:, 0] if "cls" in t else z.mean(dim=1)
    if "pre_logits/kernel" in t:
        y = torch.tanh(y @ t["pre_logits/kernel"] + t["pre_logits/bias"])
    return (y @ t["head/kernel"] + t["head/bias"]).float()


def to_big_vision(a: dict[str, np.ndarray], *, scan: bool) -> dict[str, np.ndarray]:
    """The same weights under big_vision's names, as its optimiser checkpoints store them."""
    names = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0", "LayerNorm_2": "LayerNorm_1",
             "MlpBlock_3": "MlpBlock_0", "Transformer/posembed_input/pos_embedding": "pos_embedding"}
    out = {}
    for key, value in a.items():
        for old, new in names.items():
            key = key.replace(old, new)
        out[f"params/{key}"] = value
    if scan:
        blocks = sorted({k.split("/")[2] for k in out if "/encoderblock_" in k})
        for rest in {k.split("/", 3)[3] for k in out if "/encoderblock_" in k}:
            out[f"params/Transformer/encoderblock/{rest}"] = np.stack(
                [out.pop(f"params/Transformer/{blk}/{rest}") for blk in sorted(blocks, key=lambda s: int(s[13:]))])
    return out


@pytest.mark.parametrize("layout", ["vit_jax", "vit_jax_gap", "big_vision", "big_vision_scan"])
def test_npz_parity_with_the_flax_forward(tmp_path, layout):
    arrays = vit_jax_arrays(cls=not layout.endswith("gap"), rep=0 if layout.endswith("gap") else 32)
    x = images(32)
    expected = jax_reference_forward(arrays, x)
    if layout.startswith("big_vision"):
        arrays = to_big_vision(arrays, scan=layout.endswith("scan"))
    path = tmp_path / "vit.npz"
    np.savez(path, **arrays)
    model = vitkit.from_pretrained(path).eval()  # heads come from the kernels' shapes
    assert model.config.num_heads == 4 and model.config.representation_size == (None if "gap" in layout else 32)
    with torch.no_grad():
        assert_parity(model(x), expected, f"npz {layout}")


def test_npz_from_a_known_model(tmp_path):
    model = tiny_vitkit(representation_size=24)
    to_npz(model, tmp_path / "known.npz")
    with np.load(tmp_path / "known.npz") as npz:
        arrays = dict(npz)
    assert arrays["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"].shape == (64, 4, 16)
    assert arrays["embedding/kernel"].shape == (8, 8, 3, 64)  # HWIO
    x = images(32)
    with torch.no_grad():
        assert_parity(model(x), jax_reference_forward(arrays, x), "known model -> npz -> Flax forward")


# ------------------------------------------------------------------------------------ round trips
ROUND_TRIPS = {
    "timm": ("timm", "w.safetensors", {}),
    "timm_pth": ("timm", "w.pth", dict(class_token=False, global_pool="avg", fc_norm=True)),
    "hf": ("hf", "hf_dir", dict(class_names=list("abcde"))),
    "hf_vitmodel": ("hf", "hf_dir", dict(num_classes=0, representation_size=32)),
    "torchvision": ("torchvision", "tv.pth", dict(representation_size=32)),
    "npz": ("npz", "w.npz", dict(representation_size=32)),
    "vitkit": ("vitkit", "vk_dir", dict(class_names=list("abcde"))),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trips_are_lossless(tmp_path, case):
    fmt, name, overrides = ROUND_TRIPS[case]
    model = tiny_vitkit(**overrides)
    save_as(model, tmp_path / name, fmt)
    back = vitkit.from_pretrained(tmp_path / name, num_heads=4, global_pool=model.config.global_pool)
    assert_same_tensors(model, back)
    expected_format = {"hf": "huggingface", "npz": "jax"}.get(fmt, fmt)
    assert read_checkpoint(tmp_path / name).format == expected_format
    if fmt in ("hf", "vitkit"):
        assert back.config.class_names == model.config.class_names
    if fmt == "vitkit":  # the weights file alone finds its config.json
        assert read_checkpoint(tmp_path / name / "model.safetensors").config == model.config


def test_exports_refuse_what_the_target_cannot_hold():
    with pytest.raises(ValueError, match="representation layer"):
        to_timm(tiny_vitkit(representation_size=32))
    with pytest.raises(ValueError, match="class token"):
        to_torchvision(tiny_vitkit(class_token=False, global_pool="avg"))
    with pytest.raises(ValueError, match="representation layer followed by a classifier"):
        to_huggingface(tiny_vitkit(representation_size=32), "unused")


# ------------------------------------------------------------------------- options and errors
def test_num_classes_and_model_name(tmp_path):
    source = tiny_vitkit(embed_dim=192, num_heads=3, mlp_dim=768, img_size=32, patch_size=16)
    save_as(source, tmp_path / "w.safetensors", "timm")
    fresh = vitkit.from_pretrained(tmp_path / "w.safetensors", num_classes=3)
    assert fresh.head.out_features == 3 and torch.count_nonzero(fresh.head.weight) == 0
    assert torch.equal(fresh.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    target = ViTConfig(img_size=64, patch_size=16, embed_dim=192, depth=2, num_heads=3, mlp_dim=768, num_classes=7,
                       global_pool="token", drop_path_rate=0.1)
    named = vitkit.from_pretrained(tmp_path / "w.safetensors", model=target)
    assert named.config.drop_path_rate == 0.1 and named.pos_embed.shape == (1, 1 + 16, 192)  # resampled
    assert named.head.out_features == 7  # the model's head, fresh
    with pytest.raises(CheckpointError, match=r"does not fit vit_small_patch16_224: embed_dim: checkpoint 192"):
        vitkit.from_pretrained(tmp_path / "w.safetensors", model="vit_small_patch16_224")


def test_shape_mismatch_names_the_key(tmp_path):
    state = to_timm(tiny_vitkit())
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 64)
    vitkit.convert.export.save_state_dict_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.fc1\.weight: checkpoint \(100, 64\) vs model"):
        vitkit.from_pretrained(tmp_path / "bad.safetensors", num_heads=4)


def test_errors_name_the_fault(tmp_path):
    vitkit.convert.export.save_state_dict_file(to_timm(tiny_vitkit()), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="pass num_heads="):
        vitkit.from_pretrained(tmp_path / "w.safetensors")  # width 64 is not a standard ViT width

    from timm.models.vision_transformer import VisionTransformer as TimmViT

    regs = TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, reg_tokens=2)
    torch.save(regs.state_dict(), tmp_path / "regs.pth")
    with pytest.raises(CheckpointError, match="'reg_token' belongs to register tokens"):
        vitkit.from_pretrained(tmp_path / "regs.pth", num_heads=4)

    (tmp_path / "deit").mkdir()
    (tmp_path / "deit" / "config.json").write_text(json.dumps({"model_type": "deit"}))
    with pytest.raises(CheckpointError, match="model_type 'deit' is not supported"):
        vitkit.from_pretrained(tmp_path / "deit")

    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match=r"resnet\.pth: not a ViT checkpoint.*conv1\.weight"):
        vitkit.from_pretrained(tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        vitkit.from_pretrained(tmp_path / "missing.pth")


# --------------------------------------------------------------------------------------- safety
class _Payload:
    """Unpickling this calls ``os.system`` and creates the marker file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    live = tmp_path / "live_marker"
    with open(tmp_path / "probe.pkl", "wb") as f:
        pickle.dump(_Payload(live), f)
    with open(tmp_path / "probe.pkl", "rb") as f:
        pickle.load(f)  # proves the payload is live: a plain unpickler runs it
    assert live.exists()

    marker = tmp_path / "marker"
    for name in ("evil.pth", "evil.bin"):
        torch.save({"state_dict": {"cls_token": torch.zeros(1), "x": _Payload(marker)}}, tmp_path / name)
        with pytest.raises(CheckpointError, match=rf"{name}: refused for safety: .*pickle data that imports code "
                                                  r"\(posix\.system\)") as refused:
            vitkit.from_pretrained(tmp_path / name)
        assert "weights_only" not in str(refused.value) and "corrupt" not in str(refused.value)
    assert cli_main(["convert", str(tmp_path / "evil.pth"), str(tmp_path / "out")]) == 2
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_an_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "evil.npz", **{"embedding/kernel": np.array([_Payload(tmp_path / "m")], dtype=object)})
    with pytest.raises(CheckpointError, match="evil.npz: cannot read checkpoint safely"):
        vitkit.from_pretrained(tmp_path / "evil.npz")
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------------- CLI
def test_cli_convert(tmp_path, capsys):
    from torchvision.models import VisionTransformer as TorchvisionViT

    reference = perturb(TorchvisionViT(image_size=32, patch_size=8, num_layers=1, num_heads=4, hidden_dim=64,
                                       mlp_dim=128, num_classes=3))
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    assert cli_main(["convert", str(tmp_path / "tv.pth"), str(tmp_path / "vk"), "--num-heads", "4"]) == 0
    assert "torchvision" in capsys.readouterr().out
    model = vitkit.load_model(tmp_path / "vk").eval()
    x = images(32)
    with torch.no_grad():
        assert_parity(model(x), reference(x), "CLI torchvision -> vitkit")

    assert cli_main(["convert", str(tmp_path / "vk"), str(tmp_path / "hf"), "--to", "hf", "--img-size", "48"]) == 0
    assert "vk: vitkit model directory -> " in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["image_size"] == 48
    assert vitkit.from_pretrained(tmp_path / "hf").pos_embed.shape == (1, 1 + 36, 64)

    assert cli_main(["convert", str(tmp_path / "vk"), str(tmp_path / "x.npz"), "--to", "timm"]) == 2
    assert "suffix" in capsys.readouterr().err
