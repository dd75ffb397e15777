"""Hybrid ViT interchange: timm hybrid state dicts and Google hybrid .npz files read by
``vitkit.from_pretrained`` (stem shape inferred from the weights), exports back to timm and npz,
lossless round trips, resolution changes, and refusals that name the reason.

Reference models are built in timm (its ``VisionTransformer`` with ``HybridEmbed`` over a ``ResNetV2``),
every parameter perturbed, so that a swapped, transposed or misplaced tensor changes the logits.
"""

from __future__ import annotations

import re
from functools import partial

import numpy as np
import pytest
import timm
import torch
from timm.layers import HybridEmbed, StdConv2dSame
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

import vitkit
from jax_layout import transformer_npz
from vitkit import ViTConfig, build_model
from vitkit.checkpoint import CheckpointError
from vitkit.cli import main as cli_main
from vitkit.convert import read_checkpoint, save_as, to_huggingface, to_npz, to_timm, to_torchvision
from vitkit.convert.export import save_state_dict_file
from vitkit.convert.infer import stem_spec

TOL = 1e-5  # float32, max abs logit difference


def perturb(module: nn.Module, scale: float = 0.05) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module.eval()


def images(size: int, batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def assert_parity(ours: Tensor, theirs: Tensor, what: str) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    err = (ours - theirs).abs().max().item()
    print(f"parity {what}: max abs diff {err:.3g}")
    assert err < TOL, f"{what}: max abs logit difference {err:.3g}"
    return err


def assert_same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def custom_timm_hybrid(img_size: int = 64) -> nn.Module:
    """A hybrid no registry names: two stages (1 and 2 units) of 128/256 channels on a 32-channel root,
    stride 8, a width-96 encoder with 4 heads; built from timm's parts as its hybrid factory does."""
    backbone = ResNetV2(layers=(1, 2), channels=(128, 256), stem_chs=32, num_classes=0, global_pool="",
                        preact=False, stem_type="same", conv_layer=partial(StdConv2dSame, eps=1e-8))
    return VisionTransformer(img_size=img_size, patch_size=1, embed_dim=96, depth=2, num_heads=4, num_classes=7,
                             embed_layer=partial(HybridEmbed, backbone=backbone))


# name -> (timm reference factory, file name, num_heads to pass, expected stem)
TIMM_CASES = {
    "custom_resnetv2_pth": (custom_timm_hybrid, "hybrid.pth", 4,
                            {"layers": [1, 2], "widths": [128, 256], "stem_width": 32}),
    "r50_s16_safetensors": (lambda: timm.create_model("vit_base_r50_s16_224", img_size=64, depth=1, embed_dim=192,
                                                      num_heads=3, num_classes=5),
                            "r50.safetensors", None, {"layers": [3, 4, 9]}),
    "r_ti_root_only_p8": (lambda: timm.create_model("vit_tiny_r_s16_p8_224", img_size=64, depth=2, num_classes=10),
                          "rti.bin", None, {"layers": []}),
}


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_hybrid_file_parity_and_export_back(tmp_path, case):
    factory, filename, heads, stem = TIMM_CASES[case]
    reference = perturb(factory())
    path = tmp_path / filename
    save_state_dict_file(reference.state_dict(), path)

    model = vitkit.from_pretrained(path, num_heads=heads).eval()
    cfg = model.config
    assert cfg.stem.to_dict() == stem and cfg.extra["converted_from"] == "timm"
    assert (cfg.img_size, cfg.in_chans, cfg.num_heads) == (64, 3, reference.blocks[0].attn.num_heads)
    x = images(64)
    with torch.no_grad():
        assert_parity(model(x), reference(x), f"timm hybrid {case}")
        reference.load_state_dict(to_timm(model), strict=True)  # and back: timm loads our export strictly
        assert_parity(model(x), reference(x), f"timm hybrid {case} (exported back)")


def test_timm_hybrid_at_a_new_resolution_resamples_like_timm(tmp_path):
    """A 64 px hybrid checkpoint read at 96 px: the 8x8 position grid becomes 12x12, as timm resamples it."""
    small = perturb(custom_timm_hybrid(64))
    save_state_dict_file(small.state_dict(), tmp_path / "hybrid.safetensors")
    large = custom_timm_hybrid(96).eval()
    large.load_state_dict(checkpoint_filter_fn(small.state_dict(), large))

    model = vitkit.from_pretrained(tmp_path / "hybrid.safetensors", img_size=96, num_heads=4).eval()
    assert model.grid_size == (12, 12) and model.pos_embed.shape == large.pos_embed.shape == (1, 1 + 144, 96)
    assert torch.equal(model.pos_embed[:, :1], small.pos_embed[:, :1])  # the class token's entry is kept apart
    x = images(96)
    with torch.no_grad():
        assert_parity(model(x), large(x), "timm hybrid 64->96 px resampled")


# ------------------------------------------------------------------------------------ Google .npz
def google_hybrid_npz(state: dict[str, Tensor], num_heads: int) -> dict[str, np.ndarray]:
    """A timm hybrid's weights under Google's vit_jax names, written independently of vitkit's mapping:
    the ResNet at the top level (conv_root, gn_root, block{s}/unit{u}/...), HWIO kernels, per-head
    attention kernels."""
    n = {k: v.detach().numpy() for k, v in state.items()}
    out: dict[str, np.ndarray] = {}
    for key, a in n.items():
        a = a.transpose(2, 3, 1, 0) if a.ndim == 4 else a
        if m := re.fullmatch(r"patch_embed\.backbone\.(?:stem\.)?(conv|norm)\.(weight|bias)", key):
            out["conv_root/kernel" if m[1] == "conv" else f"gn_root/{'scale' if m[2] == 'weight' else 'bias'}"] = a
        elif m := re.fullmatch(r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.(downsample\.)?(conv|norm)(\d?)"
                               r"\.(weight|bias)", key):
            module = ("conv" if m[4] == "conv" else "gn") + ("_proj" if m[3] else m[5])
            leaf = "kernel" if m[4] == "conv" else ("scale" if m[6] == "weight" else "bias")
            out[f"block{int(m[1]) + 1}/unit{int(m[2]) + 1}/{module}/{leaf}"] = a
        elif key.startswith("patch_embed.proj."):
            out[f"embedding/{'kernel' if key.endswith('weight') else 'bias'}"] = a
    return out | transformer_npz(state, num_heads)


NPZ_CASES = {  # timm factory, key prefix (vit_jax optimiser checkpoints store everything under opt/target/)
    "custom_resnetv2": (custom_timm_hybrid, ""),
    "r_ti_root_only_p8_opt_target": (TIMM_CASES["r_ti_root_only_p8"][0], "opt/target/"),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_google_hybrid_npz_parity(tmp_path, case):
    factory, prefix = NPZ_CASES[case]
    source = perturb(factory())
    arrays = google_hybrid_npz(source.state_dict(), source.blocks[0].attn.num_heads)
    assert "conv_root/kernel" in arrays and arrays["embedding/kernel"].ndim == 4
    path = tmp_path / "hybrid.npz"
    np.savez(path, **{prefix + k: v for k, v in arrays.items()})

    reference = factory().eval()
    reference.load_pretrained(str(path))  # timm's own npz reader: the independent reference
    model = vitkit.from_pretrained(path).eval()  # heads from the attention kernels, stem from the ResNet
    assert model.config.extra["converted_from"] == "jax" and model.config.stem is not None
    x = images(64)
    with torch.no_grad():
        assert_parity(reference(x), source(x), f"npz {case}: timm's reader vs the source model")
        assert_parity(model(x), reference(x), f"npz {case}")


# ------------------------------------------------------------------------------------ round trips
def tiny_hybrid(**overrides) -> nn.Module:
    fields = dict(img_size=64, patch_size=1, embed_dim=64, depth=2, num_heads=4, mlp_dim=128, num_classes=5,
                  stem={"layers": [1, 1], "widths": [128, 256], "stem_width": 32})
    return perturb(build_model(ViTConfig(**{**fields, **overrides})))


ROUND_TRIPS = {
    "timm_safetensors": ("timm", "w.safetensors"),
    "timm_pth": ("timm", "w.pth"),
    "npz": ("npz", "w.npz"),
    "vitkit": ("vitkit", "vk_dir"),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_hybrid_round_trips_are_lossless(tmp_path, case):
    fmt, name = ROUND_TRIPS[case]
    model = tiny_hybrid(class_names=list("abcde") if fmt == "vitkit" else None)
    save_as(model, tmp_path / name, fmt)
    back = vitkit.from_pretrained(tmp_path / name, num_heads=4)
    assert_same_tensors(model, back)
    assert stem_spec(back.config.stem) == stem_spec(model.config.stem)
    assert read_checkpoint(tmp_path / name).format == {"npz": "jax"}.get(fmt, fmt)
    if fmt == "vitkit":
        assert back.config == model.config


def test_npz_export_is_read_by_timm(tmp_path):
    """Our hybrid .npz, read by timm's own loader into the timm model it came from, computes the same logits."""
    model = vitkit.from_pretrained(_timm_file(tmp_path), num_heads=4).eval()
    to_npz(model, tmp_path / "ours.npz")
    with np.load(tmp_path / "ours.npz", allow_pickle=False) as npz:
        assert npz["conv_root/kernel"].shape == (7, 7, 3, 32)  # HWIO
        assert {"block1/unit1/conv_proj/kernel", "block2/unit2/gn3/scale"} <= set(npz.files)
        assert "block2/unit2/conv_proj/kernel" not in npz.files
    reference = custom_timm_hybrid().eval()
    reference.load_pretrained(str(tmp_path / "ours.npz"))
    x = images(64)
    with torch.no_grad():
        assert_parity(model(x), reference(x), "vitkit hybrid -> npz -> timm's reader")


def _timm_file(tmp_path) -> str:
    """A perturbed custom timm hybrid saved as a timm state dict."""
    path = tmp_path / "hybrid.safetensors"
    save_state_dict_file(perturb(custom_timm_hybrid()).state_dict(), path)
    return str(path)


def test_vitkit_format_keeps_a_small_image_stem(tmp_path):
    """save_pretrained / load_model keep what no tensor records (a stride-1 root without pooling);
    timm and npz exports would lose it and refuse, Hugging Face and torchvision have no hybrid at all."""
    model = vitkit.create_model("vit_hybrid_cifar_32", depth=1)
    perturb(model)
    model.save_pretrained(tmp_path / "vk")
    loaded = vitkit.load_model(tmp_path / "vk")
    assert loaded.config == model.config and loaded.grid_size == (8, 8)
    assert_same_tensors(model, loaded)
    assert_same_tensors(model, vitkit.from_pretrained(tmp_path / "vk"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))

    with pytest.raises(ValueError, match="timm state dict cannot record this hybrid stem's.*stem_stride.*stem_pool"):
        to_timm(model)
    with pytest.raises(ValueError, match="vit_jax layout cannot represent the hybrid stem's.*stem_stride"):
        to_npz(model, tmp_path / "x.npz")
    with pytest.raises(ValueError, match="Hugging Face transformers has no hybrid ViT"):
        to_huggingface(model, tmp_path / "hf")
    with pytest.raises(ValueError, match="torchvision has no hybrid ViT"):
        to_torchvision(model)
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "hf").exists()

    # a bare state dict of it reads back exactly once the unrecorded stem fields are stated
    save_state_dict_file(model.state_dict(), tmp_path / "bare.safetensors")
    bare = vitkit.from_pretrained(tmp_path / "bare.safetensors", num_heads=12,
                                  stem={"stem_stride": 1, "stem_pool": False})
    assert stem_spec(bare.config.stem) == stem_spec(model.config.stem) and bare.config.img_size == 32
    with torch.no_grad():
        assert torch.equal(bare.eval()(x), model(x))
    # and on the command line
    assert cli_main(["convert", str(tmp_path / "bare.safetensors"), str(tmp_path / "cli"), "--num-heads", "12",
                     "--stem", '{"stem_stride": 1, "stem_pool": false}']) == 0
    cli = vitkit.load_model(tmp_path / "cli")
    assert stem_spec(cli.config.stem) == stem_spec(model.config.stem) and cli.grid_size == (8, 8)
    assert_same_tensors(model, cli)


# ------------------------------------------------------------------------- options and errors
def test_named_model_must_fit_the_hybrid_checkpoint(tmp_path):
    path = _timm_file(tmp_path)
    stem = {"layers": [1, 2], "widths": [128, 256], "stem_width": 32}
    target = ViTConfig(img_size=64, patch_size=1, embed_dim=96, depth=2, num_heads=4, mlp_dim=384, num_classes=3,
                       stem=stem, drop_path_rate=0.1)
    model = vitkit.from_pretrained(path, model=target)
    assert model.config.drop_path_rate == 0.1 and model.head.out_features == 3
    wrong = {**stem, "layers": [1, 1]}
    with pytest.raises(CheckpointError, match=r"does not fit the given config: stem: checkpoint \{'layers': \[1, 2\].*"
                                              r"model \{'layers': \[1, 1\]"):
        vitkit.from_pretrained(path, model=target.replace(stem=wrong))
    with pytest.raises(CheckpointError, match=r"does not fit .*stem: checkpoint \{'layers'.*model None"):
        vitkit.from_pretrained(path, model=target.replace(stem=None, patch_size=8))


def test_stated_stem_fields_are_checked(tmp_path):
    save_as(tiny_hybrid(), tmp_path / "w.safetensors", "timm")
    typo = r"w\.safetensors: unknown config key stem\.stem_strid \(did you mean stem\.stem_stride\?\)"
    with pytest.raises(CheckpointError, match=typo):
        vitkit.from_pretrained(tmp_path / "w.safetensors", num_heads=4, stem={"stem_strid": 1})
    with pytest.raises(CheckpointError, match=r"stem \{'layers': \[2, 2\]\} disagrees with the weights, whose stem is "
                                              r"\{'layers': \[1, 1\], 'widths': \[128, 256\], 'stem_width': 32\}"):
        vitkit.from_pretrained(tmp_path / "w.safetensors", num_heads=4, stem={"layers": [2, 2]})


def test_backbones_other_than_bit_are_refused_by_key(tmp_path):
    """timm's ResNet-D hybrids (BatchNorm backbone) are not a BiT stem: refused, naming the first key."""
    other = timm.create_model("vit_small_resnet26d_224", img_size=64, depth=1, num_classes=2)
    torch.save(other.state_dict(), tmp_path / "r26d.pth")
    with pytest.raises(CheckpointError, match=r"r26d\.pth: key 'patch_embed\.backbone\.bn1\.bias' does not belong "
                                              "to a BiT ResNet stem"):
        vitkit.from_pretrained(tmp_path / "r26d.pth", num_heads=8)


# ------------------------------------------------------------------------------------------- CLI
def test_cli_converts_a_hybrid_npz_to_timm_and_back(tmp_path, capsys):
    source = perturb(TIMM_CASES["r_ti_root_only_p8"][0]())
    np.savez(tmp_path / "rti.npz", **google_hybrid_npz(source.state_dict(), 3))
    assert cli_main(["convert", str(tmp_path / "rti.npz"), str(tmp_path / "rti.safetensors"), "--to", "timm"]) == 0
    assert "rti.npz: Google .npz checkpoint -> " in capsys.readouterr().out
    reference = TIMM_CASES["r_ti_root_only_p8"][0]().eval()
    reference.load_state_dict(vitkit.checkpoint.load_state_dict(tmp_path / "rti.safetensors"))
    x = images(64)
    with torch.no_grad():
        assert_parity(reference(x), source(x), "CLI npz -> timm (hybrid)")
