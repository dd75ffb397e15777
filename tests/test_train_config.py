"""Training configuration, optimizer groups, learning-rate schedule and EMA: fast unit tests."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

import vitkit
from vitkit.data import DataConfig
from vitkit.train import TrainConfig, bundled_configs, load_config
from vitkit.train.config import parse_overrides
from vitkit.train.ema import ModelEMA
from vitkit.train.optim import build_optimizer, lr_at, no_decay_names, orthogonalize, param_groups


# ---------------------------------------------------------------------------------------- config
def test_yaml_then_overrides_dotted_equals_and_shortcuts(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name: vit_tiny_patch4_32, drop_path_rate: 0.1}\n"
                    "data: {dataset: cifar10, batch_size: 64}\n"
                    "optim: {lr: 1e-3, betas: [0.9, 0.95]}\n"  # YAML 1.1 reads 1e-3 as a string
                    "epochs: 5\n")
    cfg = load_config(path, ["--optim.lr", "5e-4", "--epochs=7", "--dataset", "mnist", "--warmup_epochs", "2",
                             "--model.depth", "3", "--compile", "--optim.clip_grad", "null"])
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.epochs == 7 and cfg.compile is True
    assert cfg.data.dataset == "mnist" and cfg.data.batch_size == 64
    assert cfg.optim.warmup_epochs == 2.0 and cfg.optim.clip_grad is None
    assert cfg.model == {"name": "vit_tiny_patch4_32", "drop_path_rate": 0.1, "depth": 3}


def test_model_name_shortcut():
    assert load_config(None, ["--model", "vit_small_patch4_32", "--model.depth", "4"]).model == \
        {"name": "vit_small_patch4_32", "depth": 4}


@pytest.mark.parametrize("args, message", [
    (["--optim.lrr", "1"], r"unknown config key optim\.lrr \(did you mean optim\.lr\?\)"),
    (["--epoch", "3"], r"unknown config key epoch \(did you mean epochs\?\)"),
    (["--data.nope", "1"], r"unknown config key data\.nope"),
    (["--epochs", "three"], r"epochs must be an integer, got 'three' \(a string\)"),
    (["--optim.betas", "[0.9]"], r"optim\.betas must have 2 entries"),
    (["--precision", "fp8"], r"precision must be one of fp32, bf16, fp16"),
    (["--optim.lr", "-1"], r"optim\.lr must be positive"),
    (["--data.batch_size", "0"], r"batch_size"),
    (["--ema_decay", "1.5"], r"ema_decay must be in \(0, 1\)"),
    (["oops"], r"unexpected argument 'oops'"),
])
def test_bad_keys_and_values_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, args)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown config key optim\.learning_rate"):
        load_config(path)
    path.write_text("epochs: [1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: not valid YAML"):
        load_config(path)


def test_a_config_file_builds_on_neutral_defaults_not_on_the_default_recipe(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("data: {dataset: mnist}\n")
    cfg = load_config(path)
    assert cfg.data == DataConfig(dataset="mnist") and cfg.optim == TrainConfig().optim


def test_missing_config_lists_the_bundled_ones():
    with pytest.raises(FileNotFoundError, match=r"no bundled config.*mnist_vit"):
        load_config("no_such_config")


def test_config_round_trips_through_yaml():
    cfg = load_config(None, ["--optim.betas", "[0.9, 0.98]", "--data.mean", "[0.5, 0.5, 0.5]",
                             "--data.std", "[0.2, 0.2, 0.2]", "--ema_decay", "0.999"])
    again = TrainConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_bundled_configs_load_by_name_and_by_path():
    names = bundled_configs()
    assert {"cifar10_convstem", "cifar10_vit", "mnist_convstem", "mnist_vit", "smoke"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert vitkit.get_model_config(cfg.model["name"])  # the model exists
        assert load_config(f"configs/{name}.yaml") == cfg


def test_default_run_is_the_cifar10_recipe():
    """`vitkit train` with no config trains what configs/cifar10_convstem.yaml describes."""
    cfg = load_config(None)
    assert cfg == load_config("cifar10_convstem")
    assert cfg.data.dataset == "cifar10" and cfg.model["name"] == "vit_airstem_cifar_32"


def test_overrides_merge_into_sections_and_a_new_model_name_replaces_the_model_section():
    recipe = load_config(None)
    cfg = load_config(None, ["--data.batch_size", "64", "--model.depth", "3"])
    assert cfg.data.batch_size == 64 and cfg.data.label_smoothing == recipe.data.label_smoothing == 0.1
    assert cfg.model == {**recipe.model, "depth": 3}
    assert load_config(None, ["--model.name", "vit_tiny_patch4_32"]).model == {"name": "vit_tiny_patch4_32"}
    assert TrainConfig.from_dict({"data": {"dataset": "mnist"}}).data == DataConfig(
        **{**TrainConfig().data.__dict__, "dataset": "mnist"})


def test_parse_overrides_flags_and_nesting():
    assert parse_overrides(["--deterministic", "--data.mean=[0.5]", "--run-name", "x"]) == {
        "deterministic": True, "data": {"mean": [0.5]}, "run_name": "x"}


# ----------------------------------------------------------------------------------- optimizer
def test_no_weight_decay_on_norms_biases_pos_embed_and_cls_token():
    model = vitkit.create_model("vit_tiny_patch4_32", depth=2)
    no_decay = set(no_decay_names(model))
    for name, _ in model.named_parameters():
        module = name.rsplit(".", 2)[-2] if "." in name else ""
        expected = name.endswith(".bias") or "norm" in module or name in ("pos_embed", "cls_token")
        assert (name in no_decay) == expected, name
    assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.1.attn.qkv.bias", "norm.weight",
            "head.bias", "patch_embed.proj.bias"} <= no_decay
    assert not {"blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "head.weight",
                "patch_embed.proj.weight"} & no_decay
    decay, rest = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_adamw_decays_only_the_decay_group():
    """With zero gradients, one AdamW step shrinks exactly the decayed weights by lr * wd."""
    model = vitkit.create_model("vit_tiny_patch4_32", depth=1)
    cfg = load_config(None, ["--optim.lr", "0.1", "--optim.weight_decay", "0.5"]).optim
    optimizer = build_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    no_decay = set(no_decay_names(model))
    for name, param in model.named_parameters():
        factor = 1.0 if name in no_decay else 1 - 0.1 * 0.5
        torch.testing.assert_close(param.detach(), before[name] * factor, msg=name)


def test_orthogonalize_approximates_the_polar_factor():
    torch.manual_seed(0)
    for shape in [(64, 192), (192, 64)]:
        matrix = torch.randn(shape) @ torch.diag(torch.logspace(-1.5, 0, shape[1]))  # condition number 9-49
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        result = orthogonalize(matrix)
        assert result.shape == matrix.shape
        singular = torch.linalg.svdvals(result)
        assert 0.6 < singular.min() and singular.max() < 1.25  # Newton-Schulz's band, not exactly 1
        polar = u @ vh
        assert (result * polar).sum() / (result.norm() * polar.norm()) > 0.95


def test_muon_trains_the_encoder_matrices_and_adamw_the_rest():
    """Muon groups get the blocks' 2-D weights only; one step from zero momentum is the orthogonalised
    gradient at 0.2 * sqrt(max(shape)) * lr (after decoupled decay); AdamW's first step is
    -lr * grad / (|grad| + eps)."""
    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch4_32", depth=1)
    cfg = load_config(None, ["--optim.name", "muon", "--optim.lr", "0.01", "--optim.weight_decay", "0.1",
                             "--optim.momentum", "0.95"]).optim
    optimizer = build_optimizer(model, cfg)
    muon = {n for g in optimizer.param_groups if g["muon"] for n in g["param_names"]}
    assert muon == {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight",
                    "blocks.0.mlp.fc2.weight"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    params = dict(model.named_parameters())
    for name in muon:
        grad = params[name].grad
        nesterov = grad.lerp(0.05 * grad, 0.95)  # buffer = (1 - momentum) * grad after one step
        expected = before[name] * (1 - 0.01 * 0.1) - 0.01 * 0.2 * max(grad.shape) ** 0.5 * orthogonalize(nesterov)
        torch.testing.assert_close(params[name].detach(), expected, msg=name)
    no_decay = set(no_decay_names(model))
    for name in ["head.weight", "patch_embed.proj.weight", "blocks.0.norm1.weight", "cls_token"]:
        decay = 1.0 if name in no_decay else 1 - 0.01 * 0.1
        grad = params[name].grad
        expected = before[name] * decay - 0.01 * grad / (grad.abs() + 1e-8)
        torch.testing.assert_close(params[name].detach(), expected, msg=name)
    state = optimizer.state_dict()
    again = build_optimizer(model, cfg)
    again.load_state_dict(state)
    assert torch.equal(again.state[params["blocks.0.attn.qkv.weight"]]["momentum_buffer"],
                       optimizer.state[params["blocks.0.attn.qkv.weight"]]["momentum_buffer"])


def test_muon_refuses_fsdp():
    with pytest.raises(ValueError, match=r"optim\.name muon is not supported with distributed\.strategy fsdp"):
        load_config(None, ["--optim.name", "muon", "--distributed.strategy", "fsdp"])


def test_warmup_then_cosine_values():
    kw = dict(total_steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    assert lr_at(0, **kw) == pytest.approx(1e-4)  # linear warmup starts at lr / warmup_steps
    assert lr_at(4, **kw) == pytest.approx(5e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)  # peak at the end of warmup
    assert lr_at(10, **kw) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(10 + 99 // 2, **kw) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 49 / 99)))
    assert lr_at(109, **kw) == pytest.approx(1e-5)  # the last step is at min_lr
    values = [lr_at(s, **kw) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_at(0, total_steps=5, warmup_steps=0, lr=1.0, min_lr=0.0) == 1.0


# ------------------------------------------------------------------------------------------ EMA
def test_ema_follows_the_weights_with_a_warming_decay():
    model = torch.nn.Linear(3, 2)
    ema = ModelEMA(model, decay=0.99)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # first update: decay min(0.99, 1/10) = 0.1
    torch.testing.assert_close(ema.module.weight, start * 0.1 + (start + 1) * 0.9)
    assert not ema.module.weight.requires_grad
    for _ in range(1000):
        ema.update(model)
    assert ema.current_decay() == 0.99
    torch.testing.assert_close(ema.module.weight, model.weight.detach(), atol=1e-4, rtol=0)
    fresh = ModelEMA(torch.nn.Linear(3, 2), decay=0.99)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.updates == ema.updates and torch.equal(fresh.module.weight, ema.module.weight)


# -------------------------------------------------------------------------------------- display
def test_progress_bar_on_a_terminal_and_plain_lines_elsewhere(capsys):
    from vitkit.train.monitor import Progress

    bar = Progress("bar")
    bar.start_epoch(0, 3, total_steps=10, done_steps=0)
    bar.step(4)
    bar.show(4, dict(loss=1.2345, acc=0.5, lr=1e-3, img_per_s=1234.0))
    bar.print("epoch 1/3 | summary")
    bar.end_epoch()
    out, err = capsys.readouterr()
    assert "epoch 1/3" in err and "4/10" in err and "loss 1.2345 acc 50.00% lr 1.00e-03 1,234 img/s" in err
    assert "epoch 1/3 | summary" in out

    plain = Progress("plain")
    plain.start_epoch(1, 3, total_steps=10, done_steps=0)
    plain.show(5, dict(loss=0.5, acc=0.75, lr=2e-4, img_per_s=99.0))
    plain.end_epoch()
    out, err = capsys.readouterr()
    assert out == "epoch 2/3 step 5/10 | loss 0.5000 | acc 75.00% | lr 2.00e-04 | 99 img/s\n" and err == ""

    quiet = Progress("bar", enabled=False)  # processes other than rank 0
    quiet.start_epoch(0, 1, 10, 0)
    quiet.show(1, dict(loss=1.0, acc=0.1, lr=1e-3, img_per_s=1.0))
    quiet.print("nothing")
    assert capsys.readouterr() == ("", "")


def test_whiten_stem_sets_the_first_conv_from_the_training_images():
    from vitkit.data import build_data
    from vitkit.models.init import whiten_conv_
    from vitkit.train.distributed import World
    from vitkit.train.task import ClassificationTask, whiten_stem_

    cfg = TrainConfig(model={"name": "vit_airstem_cifar_32", "depth": 1}, whiten_stem=True,
                      data=DataConfig(dataset="cifar10", batch_size=100, train_fraction=0.01))
    data = build_data(cfg.data)
    task = ClassificationTask(cfg, data, device=torch.device("cpu"), world=World())
    model = task.build_model()
    # the first 5,000 training images, as epoch 0's batches deliver them (here all 500 of the subset)
    reference = vitkit.create_model("vit_airstem_cifar_32", depth=1, num_classes=10)
    conv = reference.patch_embed.stem[0].conv
    whiten_conv_(conv, [images for images, _ in data.train.batches(0)])
    torch.testing.assert_close(model.patch_embed.stem[0].conv.weight, conv.weight)
    # the filters whiten real images: 24 = both signs of the 12 leading directions of 27
    with torch.no_grad():
        out = model.patch_embed.stem[0].conv(next(iter(data.train.batches(0)))[0])[:, :12, 1:-1, 1:-1]
    variance = out.permute(1, 0, 2, 3).reshape(12, -1).var(dim=1)
    assert 0.5 < float(variance.min()) and float(variance.max()) < 1.5

    # a plain ViT: the 4x4 patch projection, 96 of its 192 filters (both signs of all 48 directions)
    plain = vitkit.create_model("vit_tiny_patch4_32", depth=1, num_classes=10)
    before = plain.patch_embed.proj.weight.detach().clone()
    whiten_stem_(plain, data, World())
    reference = torch.nn.Conv2d(3, 192, 4, stride=4)
    whiten_conv_(reference, [images for images, _ in data.train.batches(0)])
    torch.testing.assert_close(plain.patch_embed.proj.weight[:96], reference.weight[:96])
    assert torch.equal(plain.patch_embed.proj.weight[96:], before[96:])
    with pytest.raises(ValueError, match="no patch embedding with a convolution"):
        whiten_stem_(torch.nn.Linear(2, 2), data, World())
    with pytest.raises(ValueError, match="patch_embed.backbone.conv, is a StdConv2d"):
        whiten_stem_(vitkit.create_model("vit_tiny_r_s16_p8_224", num_classes=10), data, World())
    with pytest.raises(ValueError, match="task mae has its own"):
        TrainConfig(whiten_stem=True, task="mae", model={"name": "mae_vit_base_patch16"})
    with pytest.raises(ValueError, match="whiten_stem .*finetune.init"):
        TrainConfig(whiten_stem=True, finetune={"init": "vit_tiny_patch16_224"})
