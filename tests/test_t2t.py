"""T2T-ViT: every part against a reference written here from the paper's equations (on perturbed weights),
the official parameter counts, checkpoint round trips, official ``.pth.tar`` files, and real training."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import vitkit
from vitkit import cli
from vitkit.checkpoint import CheckpointError
from vitkit.models.t2t import SoftSplit, T2TViT, TokenPerformer, TokenTransformer, sinusoid_table

torch.backends.mkldnn.deterministic = True


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every trained tensor (LayerNorm gains and biases included), so that no parameter
    sits at an initial value that could hide a wrong formula."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad:
                parts = name.split(".")
                gain = len(parts) > 1 and parts[-2].startswith("norm") and parts[-1] == "weight"  # LayerNorm gains ~1
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim > 1 else 0.5) + gain)


def _ln(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _lin(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return x @ layer.weight.t() + (layer.bias if layer.bias is not None else 0)


# ------------------------------------------------------------------------------- the equations
def soft_split_reference(x: torch.Tensor, k: int, s: int, p: int) -> torch.Tensor:
    """Eq. 3: every k x k window (stride s, zero padding p), its values concatenated channel by channel."""
    b, c, h, w = x.shape
    padded = torch.zeros(b, c, h + 2 * p, w + 2 * p, dtype=x.dtype)
    padded[:, :, p:p + h, p:p + w] = x
    rows, cols = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    tokens = [padded[:, :, i * s:i * s + k, j * s:j * s + k].reshape(b, c * k * k)
              for i in range(rows) for j in range(cols)]
    return torch.stack(tokens, dim=1)


def token_transformer_reference(x: torch.Tensor, layer: TokenTransformer) -> torch.Tensor:
    """T' = v + W_o softmax(q k^T / sqrt(d_in)) v on LN(T) (the residual is v), then T' + MLP(LN(T'))."""
    xn = _ln(x, layer.norm1)
    q, k, v = _lin(xn, layer.attn.qkv).chunk(3, dim=-1)
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(x.shape[-1]), dim=-1)
    y = v + _lin(attn @ v, layer.attn.proj)
    return y + _lin(_gelu(_lin(_ln(y, layer.norm2), layer.mlp.fc1)), layer.mlp.fc2)


def performer_reference(x: torch.Tensor, layer: TokenPerformer) -> torch.Tensor:
    """The Performer written with its N x N kernel matrix: A_ts = phi(q_t) . phi(k_s) with
    phi(x) = exp(W x - |x|^2 / 2) / sqrt(m); y = v + proj(A v / (A 1 + eps)); then y + MLP(LN(y))."""
    xn = _ln(x, layer.norm1)
    k, q, v = _lin(xn, layer.kqv).split(layer.emb, dim=-1)

    def phi(z: torch.Tensor) -> torch.Tensor:
        return torch.exp(z @ layer.w.t() - (z * z).sum(-1, keepdim=True) / 2) / math.sqrt(layer.w.shape[0])

    kernel = phi(q) @ phi(k).transpose(-2, -1)
    y = v + _lin((kernel @ v) / (kernel.sum(-1, keepdim=True) + 1e-8), layer.proj)
    mlp = layer.mlp
    return y + _lin(_gelu(_lin(_ln(y, layer.norm2), mlp[0])), mlp[2])


def t2t_vit_reference(model: T2TViT, images: torch.Tensor) -> torch.Tensor:
    """The whole model from the equations: three soft splits with re-structurisation, projection, class
    token + the sinusoid of "Attention is all you need", pre-norm blocks, norm, class-token head."""
    cfg = model.config
    t2t = model.tokens_to_token
    layer = token_transformer_reference if cfg.tokens_type == "transformer" else performer_reference
    x = images
    for i, (k, s, p) in enumerate(zip(cfg.kernel_sizes, cfg.strides, cfg.paddings)):
        if i:
            side = round(math.sqrt(x.shape[1]))
            x = x.transpose(1, 2).reshape(x.shape[0], -1, side, side)
        x = soft_split_reference(x, k, s, p)
        if i < 2:
            x = layer(x, getattr(t2t, f"attention{i + 1}"))
    x = _lin(x, t2t.project)
    n, d = x.shape[1] + 1, x.shape[2]
    table = torch.tensor([[math.sin(pos / 10000 ** (j / d)) if j % 2 == 0 else math.cos(pos / 10000 ** ((j - 1) / d))
                           for j in range(d)] for pos in range(n)], dtype=x.dtype)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + table
    heads = cfg.num_heads
    scale = cfg.qk_scale if cfg.qk_scale is not None else (d // heads) ** -0.5
    for block in model.blocks:
        b_, n_, _ = x.shape
        qkv = _lin(_ln(x, block.norm1), block.attn.qkv).reshape(b_, n_, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * scale, dim=-1)
        x = x + _lin((attn @ qkv[2]).transpose(1, 2).reshape(b_, n_, d), block.attn.proj)
        x = x + _lin(_gelu(_lin(_ln(x, block.norm2), block.mlp.fc1)), block.mlp.fc2)
    return _lin(_ln(x, model.norm)[:, 0], model.head)


# ----------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("k,s,p", [(7, 4, 2), (3, 2, 1), (3, 1, 1)])
def test_soft_split_is_the_unfold_of_overlapping_windows(k, s, p):
    x = torch.randn(2, 3, 13, 11)
    tokens, grid = SoftSplit(k, s, p)(x)
    expected = soft_split_reference(x, k, s, p)
    assert grid == ((13 + 2 * p - k) // s + 1, (11 + 2 * p - k) // s + 1)
    assert tokens.shape == expected.shape and torch.equal(tokens, expected)


def test_token_transformer_equals_its_equations():
    layer = TokenTransformer(27, 16).eval()
    _perturb(layer)
    x = torch.randn(2, 10, 27)
    torch.testing.assert_close(layer(x), token_transformer_reference(x, layer), atol=2e-5, rtol=1e-5)


def test_token_performer_equals_its_formula():
    layer = TokenPerformer(27, 16, kernel_ratio=0.5).eval()
    _perturb(layer)
    with torch.no_grad():
        layer.kqv.weight.mul_(0.3)  # keep exp() of the random features in a sane range
    assert layer.w.shape == (8, 16) and not layer.w.requires_grad  # m = 16 * 0.5 fixed features
    # the official draw: orthogonal rows, scaled by sqrt(m)
    torch.testing.assert_close(layer.w @ layer.w.t(), 8.0 * torch.eye(8), atol=1e-4, rtol=0)
    x = torch.randn(2, 10, 27)
    torch.testing.assert_close(layer(x), performer_reference(x, layer), atol=1e-4, rtol=1e-4)


def test_performer_attention_approaches_softmax_attention_with_more_random_features():
    """E_w[phi(q).phi(k)] = exp(q.k) for w ~ N(0, I): with m features the Performer's attention converges
    to softmax(q k^T) v (unscaled, as the official code uses it) at the rate 1/sqrt(m)."""
    d, n = 8, 12
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, n, d, generator=gen)
    weight = torch.randn(3 * d, d, generator=gen) * 0.15
    k, q, v = (x @ weight.t()).split(d, dim=-1)  # the official kqv order
    exact = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
    errors = []
    for m in (64, 1024, 16384, 262144):
        layer = TokenPerformer(d, d, kernel_ratio=m / d).eval()
        with torch.no_grad():
            layer.kqv.weight.copy_(weight)
            layer.kqv.bias.zero_()
            layer.proj.weight.copy_(torch.eye(d))
            layer.proj.bias.zero_()
            layer.w.copy_(torch.randn(m, d, generator=gen))
            approx = layer.attention(x) - v  # the attention's output before the residual on v
        errors.append(float((approx - exact).norm() / exact.norm()))
    assert errors[-1] < 0.03, errors  # measured: 0.44, 0.15, 0.050, 0.015
    assert all(later < earlier / 2 for earlier, later in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("tokens_type", ["transformer", "performer"])
def test_t2t_vit_equals_the_reference_forward(tokens_type):
    config = vitkit.get_model_config(f"t2t_vit{'_t' if tokens_type == 'transformer' else ''}_mini_32").replace(
        depth=2, qk_scale=128 ** -0.5)  # the official pretrained=True scale: embed_dim ** -0.5
    model = T2TViT(config).eval()
    _perturb(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "kqv" in name or "attn.qkv" in name:
                p.mul_(0.3)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(images), t2t_vit_reference(model, images), atol=2e-4, rtol=2e-4)
    default = T2TViT(config.replace(qk_scale=None)).eval()
    default.load_state_dict(model.state_dict())
    assert not torch.allclose(default(images), model(images), atol=1e-3)  # the scale matters


def test_sinusoid_table_matches_its_formula():
    table = sinusoid_table(197, 384)[0]
    assert table.shape == (197, 384)
    for pos, j in [(0, 0), (0, 1), (5, 10), (196, 383), (100, 7)]:
        i = j // 2
        value = math.sin(pos / 10000 ** (2 * i / 384)) if j % 2 == 0 else math.cos(pos / 10000 ** (2 * i / 384))
        assert abs(float(table[pos, j]) - value) < 1e-6


# --------------------------------------------------------------------------- official facts
# README of yitu-opensource/T2T-ViT: #params of each released model (the 384 px T2T-ViT-14: 21.7M).
OFFICIAL_PARAMS_M = {"t2t_vit_7": 4.3, "t2t_vit_10": 5.9, "t2t_vit_12": 6.9, "t2t_vit_14": 21.5, "t2t_vit_19": 39.2,
                     "t2t_vit_24": 64.1, "t2t_vit_t_14": 21.5, "t2t_vit_t_19": 39.2, "t2t_vit_t_24": 64.1}


def _count(name: str, **overrides) -> int:
    with torch.device("meta"):  # shapes only: the 64M-parameter models cost nothing to count
        model = vitkit.create_model(name, **overrides)
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_equal_the_official_models():
    counts = {name: _count(name) for name in OFFICIAL_PARAMS_M}
    assert {name: round(c / 1e6, 1) for name, c in counts.items()} == OFFICIAL_PARAMS_M
    # exact: what the official constructor builds (all parameters, as its main.py counts them)
    assert counts["t2t_vit_14"] == 21_545_550 and counts["t2t_vit_t_14"] == 21_541_070
    assert round(_count("t2t_vit_14", img_size=384) / 1e6, 1) == 21.7  # "T2T-ViT-14, 384": a longer table
    assert set(OFFICIAL_PARAMS_M) <= set(vitkit.list_models("t2t_vit_*"))


def test_official_key_names_and_defaults():
    model = vitkit.create_model("t2t_vit_7")
    keys = set(model.state_dict())
    for key in ["cls_token", "pos_embed", "tokens_to_token.attention1.w", "tokens_to_token.attention1.kqv.weight",
                "tokens_to_token.attention1.mlp.0.weight", "tokens_to_token.attention2.mlp.2.bias",
                "tokens_to_token.project.weight", "blocks.6.attn.qkv.weight", "blocks.6.mlp.fc2.bias", "norm.weight",
                "head.weight"]:
        assert key in keys
    assert "blocks.0.attn.qkv.bias" not in keys  # qkv_bias=False in T2T-ViT
    assert model.tokens_to_token.attention1.w.shape == (32, 64)  # token_dim 64, kernel_ratio 0.5
    assert model.tokens_to_token.attention1.kqv.in_features == 3 * 7 * 7
    assert model.grid_size == (14, 14) and model.pos_embed.shape == (1, 197, 256)
    assert not model.pos_embed.requires_grad and torch.equal(model.pos_embed, sinusoid_table(197, 256))
    with torch.device("meta"):
        transformer = vitkit.create_model("t2t_vit_t_14").tokens_to_token.attention2
    assert transformer.attn.scale == (64 * 9) ** -0.5  # the official quirk: the input width's scale
    small = vitkit.create_model("t2t_vit_mini_32")
    assert small.grid_size == (8, 8)  # not 2x2: smaller strides for 32 px
    assert small(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# ------------------------------------------------------------------------------ checkpoints
def test_save_pretrained_round_trip_and_other_resolutions(tmp_path):
    model = vitkit.create_model("t2t_vit_t_mini_32").eval()
    _perturb(model)
    images = torch.randn(2, 3, 32, 32)
    model.save_pretrained(tmp_path / "m")
    loaded = vitkit.load_model(tmp_path / "m").eval()
    assert isinstance(loaded, T2TViT) and loaded.config == model.config
    assert torch.equal(loaded(images), model(images))
    # another resolution: the fixed sinusoid table is regenerated for the new grid, every weight kept
    bigger = vitkit.load_model(tmp_path / "m", img_size=48)
    assert bigger.grid_size == (12, 12) and torch.equal(bigger.pos_embed, sinusoid_table(145, 128))
    assert torch.equal(bigger.tokens_to_token.project.weight, model.tokens_to_token.project.weight)
    assert bigger(torch.randn(1, 3, 48, 48)).shape == (1, 10)
    with pytest.raises(ValueError, match="img_size=48"):
        loaded(torch.randn(1, 3, 48, 48))


def _official_file(path: Path, model: torch.nn.Module, *, ema: dict | None, raw: dict | None) -> Path:
    """A checkpoint as the official training script writes it: timm's saver, DataParallel prefixes."""
    payload = {"epoch": 309, "arch": "t2t_vit_7", "version": 2, "metric": 71.7,
               "args": argparse.Namespace(model="t2t_vit_7", lr=1e-3, weight_decay=0.03, img_size=224, amp=True),
               "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]}}
    if raw is not None:
        payload["state_dict"] = {f"module.{k}": v for k, v in raw.items()}
    if ema is not None:
        payload["state_dict_ema"] = ema
    torch.save(payload, path)
    return path


def test_official_checkpoints_load_strictly_with_their_ema(tmp_path):
    reference = vitkit.create_model("t2t_vit_7")
    ema = {k: v.clone() for k, v in reference.state_dict().items()}
    raw = {k: v + 0.05 * torch.randn_like(v) for k, v in ema.items()}

    def same(model: torch.nn.Module, weights: dict) -> bool:
        state = model.state_dict()
        return set(state) == set(weights) and all(torch.equal(state[k], weights[k]) for k in weights)

    both = _official_file(tmp_path / "71.7_T2T_ViT_7.pth.tar", reference, ema=ema, raw=raw)
    model = vitkit.from_pretrained(both)
    assert isinstance(model, T2TViT) and model.config.depth == 7 and model.config.num_heads == 4
    assert model.config.extra["converted_from"] == "t2t" and model.config.img_size == 224
    prep = model.config.preprocessing()  # the official default_cfgs: ImageNet statistics, crop 0.9, bicubic
    assert (prep.mean, prep.crop_pct, prep.interpolation) == ((0.485, 0.456, 0.406), 0.9, "bicubic")
    assert same(model, ema)  # the EMA weights, as the official main.py --eval_checkpoint reads them

    raw_only = _official_file(tmp_path / "raw.pth.tar", reference, ema=None, raw=raw)
    assert same(vitkit.from_pretrained(raw_only), raw)
    ema_only = _official_file(tmp_path / "ema.pth.tar", reference, ema={f"module.{k}": v for k, v in ema.items()},
                              raw=None)
    named = vitkit.from_pretrained(ema_only, model="t2t_vit_7", num_classes=10)
    assert named.head.out_features == 10 and torch.count_nonzero(named.head.weight) == 0
    assert torch.equal(named.blocks[6].attn.qkv.weight, ema["blocks.6.attn.qkv.weight"])

    # at 384 px the table is the one the official model builds at 384 px; the other weights are the file's
    at_384 = vitkit.from_pretrained(both, img_size=384)
    assert at_384.grid_size == (24, 24) and torch.equal(at_384.pos_embed, sinusoid_table(577, 256))
    assert torch.equal(at_384.blocks[3].mlp.fc1.weight, ema["blocks.3.mlp.fc1.weight"])

    broken = dict(ema)
    del broken["blocks.6.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match="missing keys: blocks.6.mlp.fc2.bias"):
        vitkit.from_pretrained(_official_file(tmp_path / "bad.pth.tar", reference, ema=broken, raw=None))
    with pytest.raises(CheckpointError, match="depth: checkpoint 7, model 10"):
        vitkit.from_pretrained(both, model="t2t_vit_10")


def test_convert_cli_reads_official_files_and_writes_them_back(tmp_path, capsys):
    reference = vitkit.create_model("t2t_vit_t_mini_32").eval()
    path = _official_file(tmp_path / "small.pth.tar", reference, ema=None, raw=reference.state_dict())
    # a 32 px model's first split is not the official 7x7 one: the registry name supplies it
    with pytest.raises(CheckpointError, match="model="):
        vitkit.from_pretrained(path)
    model = vitkit.from_pretrained(path, model="t2t_vit_t_mini_32").eval()
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(images), reference(images))
    model.save_pretrained(tmp_path / "vk")
    assert cli.main(["convert", str(tmp_path / "vk"), str(tmp_path / "official.pth"), "--to", "t2t"]) == 0
    assert "T2T tokens=transformer" in capsys.readouterr().out
    written = torch.load(tmp_path / "official.pth", weights_only=True)["state_dict"]
    assert set(written) == set(reference.state_dict())
    assert torch.equal(vitkit.from_pretrained(tmp_path / "official.pth", model="t2t_vit_t_mini_32").eval()(images),
                       reference(images))


# -------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory, data_root) -> Path:
    """Real CIFAR-10 images in the .npz layout: 200 training and 100 test images."""
    source = data_root / "cifar10"
    root = tmp_path_factory.mktemp("data")
    (root / "cifar10").mkdir()
    with np.load(source / "train.npz", allow_pickle=False) as npz:
        np.savez(root / "cifar10" / "train.npz", images=npz["images"][:200], labels=npz["labels"][:200])
    with np.load(source / "test.npz", allow_pickle=False) as npz:
        np.savez(root / "cifar10" / "test.npz", images=npz["images"][:100], labels=npz["labels"][:100])
    shutil.copy(source / "meta.json", root / "cifar10" / "meta.json")
    return root


@pytest.mark.slow
def test_training_on_cifar10_lowers_the_loss_and_the_run_analyzes(tmp_path, tiny_cifar, monkeypatch):
    monkeypatch.setenv("VITKIT_DATA", str(tiny_cifar))
    out = tmp_path / "runs"
    argv = ["train", "--config", "cifar10_t2t", "--epochs", "6", "--batch_size", "50", "--log_every", "1",
            "--optim.warmup_epochs", "0.5", "--optim.lr", "3e-3", "--data.label_smoothing", "0", "--eval_every", "6",
            "--out_dir", str(out), "--run_name", "t2t", "--progress", "none", "--data.num_workers", "0",
            "--model.depth", "2", "--model.embed_dim", "64"]
    assert cli.main(argv) == 0
    run = out / "t2t"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 24 and losses[0] == pytest.approx(math.log(10), abs=1e-4)  # zero head: uniform at first
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1, losses
    model = vitkit.load_model(run / "model")
    assert isinstance(model, T2TViT) and model.config.depth == 2

    report = tmp_path / "report"
    assert cli.main(["analyze", str(run / "model"), "--dataset", "cifar10", "--out", str(report), "--images", "8",
                     "--show", "2", "--batch-size", "8"]) == 0
    summary = json.loads((report / "summary.json").read_text())
    assert "soft splits" in summary["notes"]["filters"] and not (report / "patch_embedding_pca.png").exists()
    assert summary["grid_size"] == [8, 8] and (report / "mean_attention_distance.png").is_file()
