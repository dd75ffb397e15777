"""Masked autoencoders: the model against its definition, Hugging Face's ViTMAE and the official layouts;
pre-training through the training loop on real CIFAR-10; the MAE fine-tuning recipe."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from vitkit.config import ViTConfig
from vitkit.models.mae import MAEConfig, MaskedAutoencoder
from vitkit.models.pos_embed import sincos_2d_pos_embed
from vitkit.models.registry import build_registered, get_model_config


def tiny_mae(**changes) -> MaskedAutoencoder:
    encoder = ViTConfig(img_size=32, patch_size=8, num_classes=0, embed_dim=32, depth=2, num_heads=2, mlp_dim=64)
    config = MAEConfig(encoder=encoder, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                       decoder_mlp_dim=64).replace(**changes)
    return MaskedAutoencoder(config).eval()


# ------------------------------------------------------------------------------------- masking
def test_masking_equals_its_definition():
    torch.manual_seed(0)
    batch, length, dim = 4, 16, 8
    tokens = torch.randn(batch, length, dim)
    noise = torch.rand(batch, length)
    for ratio in (0.75, 0.5, 0.6):
        kept, mask, ids_restore = MaskedAutoencoder.random_masking(tokens, ratio, noise)
        keep = int(length * (1 - ratio))
        assert kept.shape == (batch, keep, dim)
        assert (mask.sum(dim=1) == length - keep).all()  # the count
        for b in range(batch):
            lowest = noise[b].argsort()[:keep]
            assert set(lowest.tolist()) == set((mask[b] == 0).nonzero().flatten().tolist())  # kept = lowest noise
            torch.testing.assert_close(kept[b], tokens[b, lowest], rtol=0, atol=0)  # in ascending-noise order
        # unshuffle restores the order: kept tokens then anything, gathered by ids_restore, is the input
        # wherever the patch was kept
        shuffled = torch.gather(tokens, 1, noise.argsort(dim=1)[..., None].expand(-1, -1, dim))
        restored = torch.gather(shuffled, 1, ids_restore[..., None].expand(-1, -1, dim))
        torch.testing.assert_close(restored, tokens, rtol=0, atol=0)


def test_patchify_unpatchify_round_trip_and_layout():
    model = tiny_mae()
    images = torch.randn(2, 3, 32, 32)
    patches = model.patchify(images)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    # patch (row 1, col 2), pixel (y=3, x=5), channel 1 sits at (3 * 8 + 5) * 3 + 1
    assert patches[1, 1 * 4 + 2, (3 * 8 + 5) * 3 + 1] == images[1, 1, 8 + 3, 16 + 5]
    torch.testing.assert_close(model.unpatchify(patches), images, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_covers_masked_patches_only(norm_pix_loss):
    torch.manual_seed(1)
    model = tiny_mae(norm_pix_loss=norm_pix_loss)
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    loss, pred, mask = model(images, noise=noise)
    changed = model.patchify(images).clone()
    visible = (mask == 0).nonzero()
    masked = (mask == 1).nonzero()
    for b, i in visible.tolist():
        changed[b, i] = torch.randn_like(changed[b, i]) * 5
    loss_visible_changed = model.forward_loss(model.unpatchify(changed), pred, mask)
    torch.testing.assert_close(loss_visible_changed, loss, rtol=0, atol=0)
    b, i = masked[0].tolist()
    changed[b, i] += torch.randn_like(changed[b, i])  # not a constant: norm_pix_loss would remove it
    assert not torch.equal(model.forward_loss(model.unpatchify(changed), pred, mask), loss)
    # and the value is the definition: mean over masked patches of the per-patch mean squared error
    target = model.patchify(images)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    expected = ((pred - target) ** 2).mean(-1)[mask.bool()].mean()
    torch.testing.assert_close(loss, expected)


def test_decoder_position_table_is_the_2d_sincos_formula():
    model = tiny_mae()
    table = model.decoder_pos_embed[0]
    dim, grid = 16, 4
    assert torch.equal(table[0], torch.zeros(dim))  # the class token's row
    quarter = dim // 4
    for row in range(grid):
        for col in range(grid):
            expected = []
            for coord in (col, row):  # the column half first, as the official release
                expected += [math.sin(coord / 10000 ** (k / quarter)) for k in range(quarter)]
                expected += [math.cos(coord / 10000 ** (k / quarter)) for k in range(quarter)]
            torch.testing.assert_close(table[1 + row * grid + col], torch.tensor(expected), rtol=0, atol=1e-6)
    assert not model.decoder_pos_embed.requires_grad and not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed, sincos_2d_pos_embed(32, (4, 4)), rtol=0, atol=0)


# ----------------------------------------------------------------------------- official numbers
def test_official_models_parameter_counts_equal_the_reference():
    transformers = pytest.importorskip("transformers")
    from vitkit.convert.mae import hf_to_vitkit

    official = {"mae_vit_base_patch16": (768, 12, 12, 3072, 16), "mae_vit_large_patch16": (1024, 24, 16, 4096, 16),
                "mae_vit_huge_patch14": (1280, 32, 16, 5120, 14)}
    for name, (dim, depth, heads, mlp, patch) in official.items():
        with torch.device("meta"):
            reference = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(
                hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp,
                patch_size=patch, image_size=224, decoder_hidden_size=512, decoder_num_hidden_layers=8,
                decoder_num_attention_heads=16, decoder_intermediate_size=2048))
            ours = build_registered(name)
        count = sum(p.numel() for p in ours.parameters())
        assert count == sum(p.numel() for p in reference.parameters()), name
        mapped = hf_to_vitkit(reference.state_dict(), name)
        shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in mapped.items()} == shapes
    cfg = get_model_config("mae_vit_base_patch16")
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads, cfg.encoder.norm_eps) == (512, 8, 16, 1e-6)


def test_small_image_maes_build_and_run():
    for name, shape in (("mae_vit_mini_patch4_32", (2, 3, 32, 32)), ("mae_vit_mnist_patch4_28", (2, 1, 28, 28))):
        model = build_registered(name)
        loss, pred, mask = model(torch.randn(shape))
        n = (shape[-1] // 4) ** 2
        assert pred.shape == (2, n, 16 * shape[1]) and mask.shape == (2, n)
        assert mask.sum().item() == 2 * (n - int(n * 0.25)) and torch.isfinite(loss)
        assert model.config.decoder_embed_dim < 512


# ------------------------------------------------------------------------------ Hugging Face parity
def _hf_pair(norm_pix_loss: bool):
    transformers = pytest.importorskip("transformers")
    from vitkit.convert.mae import hf_config_to_vitkit, hf_to_vitkit

    config = transformers.ViTMAEConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=32,
        patch_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
        decoder_intermediate_size=64, layer_norm_eps=1e-6, norm_pix_loss=norm_pix_loss, mask_ratio=0.75)
    torch.manual_seed(0)
    hf = transformers.ViTMAEForPreTraining(config).eval()
    with torch.no_grad():  # random values everywhere, so that no zero-initialised tensor hides a mix-up
        for name, p in hf.named_parameters():
            if "pos_embed" not in name and "position_embeddings" not in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    ours = MaskedAutoencoder(hf_config_to_vitkit(config.to_dict(), "hf")).eval()
    ours.load_state_dict(hf_to_vitkit(hf.state_dict(), "hf"))
    return hf, ours


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_parity_with_huggingface_vitmae_given_the_same_noise(norm_pix_loss):
    hf, ours = _hf_pair(norm_pix_loss)
    torch.manual_seed(3)
    images, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    with torch.no_grad():
        out = hf(pixel_values=images, noise=noise)
        loss, pred, mask = ours(images, noise=noise)
    assert torch.equal(mask, out.mask)
    torch.testing.assert_close(pred, out.logits, rtol=0, atol=2e-5)
    torch.testing.assert_close(loss, out.loss, rtol=0, atol=2e-5)
    latent, _, _ = ours.forward_encoder(images, noise=noise)
    torch.testing.assert_close(latent, hf.vit(pixel_values=images, noise=noise).last_hidden_state, rtol=0, atol=2e-5)


# ------------------------------------------------------------------------------------ checkpoints
def _same_outputs(a: MaskedAutoencoder, b: MaskedAutoencoder) -> None:
    torch.manual_seed(5)
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        for x, y in zip(a(images, noise=noise), b(images, noise=noise)):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_official_checkpoints_load(tmp_path):
    from vitkit import from_pretrained
    from vitkit.models.vit import VisionTransformer

    model = tiny_mae()
    torch.save({"model": model.state_dict()}, tmp_path / "mae_visualize_tiny.pth")  # encoder + decoder
    loaded = from_pretrained(tmp_path / "mae_visualize_tiny.pth", num_heads=2, decoder_num_heads=2)
    assert isinstance(loaded, MaskedAutoencoder) and loaded.config.decoder_depth == 1
    _same_outputs(model, loaded.eval())

    torch.save({"model": model.encoder_state_dict()}, tmp_path / "mae_pretrain_tiny.pth")  # encoder only
    encoder = from_pretrained(tmp_path / "mae_pretrain_tiny.pth", num_heads=2).eval()
    assert isinstance(encoder, VisionTransformer) and encoder.config.num_classes == 0
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder.forward_features(images), model.forward_features(images), rtol=0, atol=0)


def test_huggingface_directories_load_and_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    from vitkit import from_pretrained
    from vitkit.convert import save_as

    hf, ours = _hf_pair(norm_pix_loss=True)
    hf.save_pretrained(tmp_path / "hf")  # ViTMAEForPreTraining
    _same_outputs(ours, from_pretrained(tmp_path / "hf").eval())

    save_as(ours, tmp_path / "exported", "hf")  # and back into transformers
    back = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "exported").eval()
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        loss, pred, _ = ours(images, noise=noise)
        out = back(pixel_values=images, noise=noise)
    torch.testing.assert_close(out.logits, pred, rtol=0, atol=2e-5)
    torch.testing.assert_close(out.loss, loss, rtol=0, atol=2e-5)

    hf.vit.config.mask_ratio = 0.0
    hf.vit.save_pretrained(tmp_path / "hf_model")  # ViTMAEModel: the encoder alone, read as a ViT
    encoder = from_pretrained(tmp_path / "hf_model").eval()
    ordered = torch.arange(16.0).expand(2, 16)  # ascending noise keeps every patch in place
    with torch.no_grad():
        reference = hf.vit(pixel_values=images, noise=ordered).last_hidden_state
        torch.testing.assert_close(encoder.forward_features(images), reference, rtol=0, atol=2e-5)


def test_encoder_exports_as_a_plain_vit(tmp_path):
    from vitkit import from_pretrained, load_model
    from vitkit.convert import save_as

    model = tiny_mae()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model.forward_features(images)
    save_as(model, tmp_path / "encoder.safetensors", "timm")  # timm state dict of the encoder
    vit = from_pretrained(tmp_path / "encoder.safetensors", num_heads=2).eval()
    save_as(model.export_encoder(), tmp_path / "encoder_dir", "vitkit")  # a vitkit directory
    for encoder in (vit, load_model(tmp_path / "encoder_dir").eval()):
        with torch.no_grad():
            torch.testing.assert_close(encoder.forward_features(images), reference, rtol=0, atol=0)
    finetunable = model.export_encoder(num_classes=10, global_pool="avg")
    assert finetunable.config.fc_norm and finetunable(images).shape == (2, 10)
    assert torch.equal(finetunable.fc_norm.weight, torch.ones(32))  # fresh, as the official fine-tuning


# ------------------------------------------------------------------------ pre-training in the loop
TINY_MAE = ["--model", "mae_vit_mini_patch4_32", "--model.patch_size", "8", "--model.embed_dim", "32",
            "--model.depth", "2", "--model.num_heads", "2", "--model.mlp_dim", "64", "--model.decoder_embed_dim", "32",
            "--model.decoder_depth", "1", "--model.decoder_num_heads", "2", "--model.decoder_mlp_dim", "64"]


@pytest.fixture(scope="module")
def small_cifar(tmp_path_factory) -> Path:
    """A data root with real CIFAR-10 images: 1,000 training images (100 per class) and 200 test images."""
    import numpy as np

    source = Path(os.environ.get("VITKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "cifar10"
    root = tmp_path_factory.mktemp("data")
    (root / "cifar10").mkdir()
    for split, per_class in (("train", 100), ("test", 20)):
        with np.load(source / f"{split}.npz") as data:
            images, labels = data["images"], data["labels"]
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
        np.savez(root / "cifar10" / f"{split}.npz", images=images[keep], labels=labels[keep])
    shutil.copy(source / "meta.json", root / "cifar10" / "meta.json")
    return root


def _pretrain_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", "mae_cifar10", *TINY_MAE, "--data_dir", str(root), "--out_dir", str(out),
            "--batch_size", "50", "--eval_batch_size", "200", "--progress", "none", "--log_every", "1",
            "--optim.blr", "1e-2", "--warmup_epochs", "0.2", *extra]


@pytest.fixture(scope="module")
def pretrained_run(small_cifar, tmp_path_factory) -> Path:
    from vitkit.cli import main

    out = tmp_path_factory.mktemp("runs")
    assert main(["pretrain", *_pretrain_args(small_cifar, out, "--epochs", "3", "--run_name", "mae",
                                             "--ckpt_every_steps", "7", "--keep_last_k", "10")]) == 0
    return out / "mae"


def test_pretraining_steps_lower_the_loss_on_cifar10(pretrained_run):
    from vitkit.train.monitor import read_metrics

    records = read_metrics(pretrained_run)
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 60  # 3 epochs x 1,000 images / 50
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and "train_acc" not in epochs[0]
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"]  # the same masks at every evaluation
    assert epochs[-1]["best_loss"] == min(r["val_loss"] for r in epochs)


def test_a_run_writes_figures_model_encoder_and_curves(pretrained_run):
    from vitkit import load_model
    from vitkit.models.vit import VisionTransformer

    assert (pretrained_run / "reconstruction.png").stat().st_size > 1000
    assert sorted(p.name for p in (pretrained_run / "figures").iterdir()) == [
        f"reconstruction-epoch00{i}.png" for i in (1, 2, 3)]
    assert (pretrained_run / "curves.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(pretrained_run / "tensorboard")).Reload()
    assert "reconstruction" in events.Tags()["images"] and "epoch/val_loss" in events.Tags()["scalars"]
    mae, encoder = load_model(pretrained_run / "model"), load_model(pretrained_run / "encoder")
    assert isinstance(mae, MaskedAutoencoder) and isinstance(encoder, VisionTransformer)
    assert mae.config.preprocess == encoder.config.preprocess and mae.config.preprocess.mean[0] != 0.5
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval().forward_features(images), mae.eval().forward_features(images),
                                   rtol=0, atol=0)


@pytest.mark.slow
def test_resume_is_exact(pretrained_run, small_cifar, tmp_path):
    """Continuing from the mid-epoch checkpoint of step 14 ends with the weights and metrics of the run
    that never stopped (same masks, data order and optimizer state)."""
    from safetensors.torch import load_file

    from vitkit.train import resume
    from vitkit.train.monitor import read_metrics

    copy = tmp_path / "copy"
    shutil.copytree(pretrained_run, copy)
    shutil.rmtree(copy / "model")
    resume(copy / "checkpoints" / "step-00000014.pt")
    straight = load_file(str(pretrained_run / "model" / "model.safetensors"))
    resumed = load_file(str(copy / "model" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    strip = ("img_per_s", "epoch_time", "epoch_cpu_time")
    clean = lambda rs: [{k: v for k, v in r.items() if k not in strip} for r in rs]  # noqa: E731
    assert clean(read_metrics(copy)) == clean(read_metrics(pretrained_run))


def test_method_mae_wraps_any_vit_with_the_official_recipe():
    from vitkit.train.mae import pretrain_config

    cfg = pretrain_config(None, ["--model", "vit_tiny_patch4_32", "--model.mask_ratio", "0.6"])
    assert cfg.task == "mae" and cfg.optim.betas == (0.9, 0.95) and cfg.optim.blr == 1.5e-4
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.clip_grad is None and cfg.optim.min_lr == 0
    assert cfg.data.crop == "random_resized_crop" and cfg.data.rrc_scale == (0.2, 1.0) and cfg.data.hflip
    from types import SimpleNamespace

    from vitkit.train.mae import mae_model_config

    config = mae_model_config(cfg.model, SimpleNamespace(in_chans=3, img_size=32))
    assert config.encoder.embed_dim == 192 and config.mask_ratio == 0.6 and config.decoder_embed_dim == 192
    with pytest.raises(ValueError, match="model.*depthh"):
        mae_model_config({"name": "vit_tiny_patch4_32", "depthh": 3}, SimpleNamespace(in_chans=3, img_size=32))


def test_finetune_and_linear_probe_of_an_mae_use_its_recipes(pretrained_run, small_cifar):
    from vitkit.data import build_data
    from vitkit.train.config import finetune_config
    from vitkit.train.optim import build_optimizer
    from vitkit.train.rundir import build_run_model

    cfg = finetune_config(str(pretrained_run), "cifar10", overrides=["--data_dir", str(small_cifar)])
    assert cfg.optim.layer_decay == 0.75 and cfg.optim.blr == 1e-3 and cfg.optim.weight_decay == 0.05
    data = build_data(cfg.data)
    model = build_run_model(cfg, data)
    assert model.config.global_pool == "avg" and model.config.fc_norm and model.config.drop_path_rate == 0.1
    assert torch.equal(model.fc_norm.weight, torch.ones(32))  # a fresh fc_norm; the pre-trained norm is dropped
    mae = __import__("vitkit").load_model(pretrained_run / "model")
    assert torch.equal(model.blocks[1].mlp.fc2.weight, mae.blocks[1].mlp.fc2.weight)
    scales = {round(g["lr_scale"], 6) for g in build_optimizer(model, cfg.optim).param_groups}
    assert scales == {round(0.75 ** k, 6) for k in range(0, 4)}  # head, 2 blocks, embeddings

    probe = finetune_config(str(pretrained_run), "cifar10",
                            overrides=["--data_dir", str(small_cifar), "--finetune.freeze_backbone"])
    assert probe.optim.name == "sgd" and probe.optim.weight_decay == 0
    model = build_run_model(probe, data)
    assert isinstance(model.head[0], torch.nn.BatchNorm1d) and not model.head[0].affine
    assert model.config.global_pool == "token"
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]


@pytest.mark.slow
def test_pretraining_under_torchrun_with_two_processes(small_cifar, tmp_path):
    """DDP: two gloo processes pre-train one model (each draws its own masks), evaluate the whole
    validation set together, and only rank 0 writes the run."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vitkit",
              "pretrain", *_pretrain_args(small_cifar, tmp_path, "--epochs", "1", "--run_name", "ddp",
                                          "--batch_size", "25", "--device", "cpu")]
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from vitkit.train.monitor import read_metrics

    records = read_metrics(tmp_path / "ddp")
    assert len([r for r in records if r["kind"] == "train"]) == 20  # 1,000 images / (2 x 25)
    epoch = [r for r in records if r["kind"] == "epoch"][-1]
    assert math.isfinite(epoch["val_loss"]) and epoch["train_loss"] > 0
    assert (tmp_path / "ddp" / "model" / "model.safetensors").is_file()
    assert len(list((tmp_path / "ddp" / "tensorboard").iterdir())) == 1  # only rank 0 writes
