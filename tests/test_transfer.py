"""Transfer: fine-tuning preparation (zero head, 2-D position-embedding resampling, optimizer groups)
and few-shot linear evaluation (closed-form ridge against torch's solvers, exactness on separable
data, the CLI on real MNIST and CIFAR-10)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit import ViTConfig
from vitkit.cli import main
from vitkit.data import DatasetNotFoundError, EvalTransform, load_split
from vitkit.evaluation import (
    FeatureCache,
    RidgeSolver,
    extract_features,
    fewshot_evaluate,
    fit_logistic,
    fit_ridge,
    linear_probe,
)
from vitkit.evaluation.fewshot import BIAS_CONSTANT
from vitkit.models.transfer import freeze_backbone, prepare_for_finetuning
from vitkit.preprocessing import Preprocessing
from vitkit.train.config import OptimConfig, finetune_config
from vitkit.train.optim import build_optimizer, param_groups

TINY = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_dim=64)


@pytest.fixture(scope="module")
def data_root() -> Path:
    root = Path(os.environ.get("VITKIT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not (root / "cifar10").is_dir():
        pytest.fail(f"test data not found at {root}: set VITKIT_DATA to the folder holding cifar10/, mnist/, ...")
    return root


@pytest.fixture(scope="module")
def cifar_images(data_root) -> torch.Tensor:
    with np.load(data_root / "cifar10" / "test.npz") as f:
        images = torch.from_numpy(f["images"][:6])
    return EvalTransform(Preprocessing(size=32), 3)(images.permute(0, 3, 1, 2))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny(**overrides) -> vitkit.VisionTransformer:
    return vitkit.VisionTransformer(ViTConfig(**{**TINY, **overrides})).eval()


def sinusoid_table(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """A smooth 2-D pattern sampled at the centres of a grid covering [0, 1]^2: (H*W, dim)."""
    h, w = grid
    v = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    u = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    channels = []
    for k in range(dim):
        fy, fx, phase = 1 + k % 2, 1 + (k // 2) % 2, k * 0.7
        channels.append(torch.sin(math.pi * fy * vv + phase) * torch.cos(math.pi * fx * uu + phase / 2))
    return torch.stack(channels, dim=-1).reshape(h * w, dim).float()


# ------------------------------------------------------------------------------ fine-tuning
def test_head_is_zero_at_finetuning_start_and_backbone_is_kept(cifar_images):
    pretrained = tiny(num_classes=21, representation_size=24)
    model = prepare_for_finetuning(pretrained, 3, class_names=["cat", "dog", "ship"])
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert model.head.weight.shape == (3, TINY["embed_dim"])  # D x K: the representation layer is gone
    assert isinstance(model.pre_logits, torch.nn.Identity) and model.config.representation_size is None
    assert model.config.class_names == ["cat", "dog", "ship"] and model.config.num_classes == 3
    with torch.no_grad():
        assert torch.equal(model(cifar_images), torch.zeros(len(cifar_images), 3))
        torch.testing.assert_close(model.forward_features(cifar_images), pretrained.forward_features(cifar_images))
    assert pretrained.config.num_classes == 21 and pretrained.head.weight.shape == (21, 24)  # input untouched


def test_prepare_keeps_representation_when_asked():
    pretrained = tiny(representation_size=24)
    model = prepare_for_finetuning(pretrained, 4, keep_representation=True)
    assert model.head.weight.shape == (4, 24) and torch.count_nonzero(model.head.weight) == 0
    torch.testing.assert_close(model.pre_logits.fc.weight, pretrained.pre_logits.fc.weight)


def test_resampling_to_the_same_size_leaves_outputs_unchanged(cifar_images):
    pretrained = tiny()
    model = prepare_for_finetuning(pretrained, 10, img_size=32, zero_init_head=False)
    model.head.load_state_dict(pretrained.head.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(cifar_images), pretrained(cifar_images), rtol=0, atol=0)


@pytest.mark.parametrize("old_size, new_size", [(32, 48), ((32, 48), (48, 64)), ((48, 32), 40)])
def test_resampling_to_a_new_size_keeps_the_2d_pattern(old_size, new_size):
    pretrained = tiny(img_size=old_size)
    old_grid, dim = pretrained.grid_size, TINY["embed_dim"]
    cls_entry = torch.randn(1, 1, dim)
    with torch.no_grad():
        pretrained.pos_embed.copy_(torch.cat([cls_entry, sinusoid_table(old_grid, dim)[None]], dim=1))
    model = prepare_for_finetuning(pretrained, 5, img_size=new_size)
    new_grid = model.grid_size
    assert model.pos_embed.shape == (1, 1 + new_grid[0] * new_grid[1], dim)
    assert torch.equal(model.pos_embed[:, :1], cls_entry)  # the class token's entry is kept apart
    expected = sinusoid_table(new_grid, dim)
    error = (model.pos_embed[0, 1:] - expected).abs().amax(dim=1).reshape(new_grid)
    # Where the bicubic kernel's 4x4 support lies inside the old grid, the pattern is reproduced closely;
    # the outer ring of the new grid lies beyond the old grid's outer centres (edge values are clamped).
    interior = _interior(old_grid[0], new_grid[0])[:, None] & _interior(old_grid[1], new_grid[1])[None, :]
    assert interior.sum() >= 16
    assert error[interior].max() < 0.025, f"interior error {error[interior].max():.3f}"
    assert error.max() < 0.15, f"border error {error.max():.3f}"
    # The check can fail: interpolating the flattened sequence in 1-D scrambles the rows.
    flat = F.interpolate(pretrained.pos_embed[:, 1:].detach().transpose(1, 2), size=expected.shape[0],
                         mode="linear", align_corners=False).transpose(1, 2)[0]
    flat_error = (flat - expected).abs().amax(dim=1).reshape(new_grid)
    assert flat_error[interior].max() > 0.5


def _interior(old: int, new: int) -> torch.Tensor:
    """New cells whose centre maps to old-grid coordinate in [1, old - 2] (a full bicubic support)."""
    coord = (torch.arange(new) + 0.5) / new * old - 0.5
    return (coord >= 1) & (coord <= old - 2)


def test_prepare_reinit_position_embeddings_and_errors():
    pretrained = tiny()
    model = prepare_for_finetuning(pretrained, 3, img_size=48, pos_embed="reinit")
    assert model.pos_embed.shape[1] == 1 + 12 * 12
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.3)  # fresh N(0, 0.02) draw
    with pytest.raises(ValueError, match="pos_embed must be"):
        prepare_for_finetuning(pretrained, 3, pos_embed="zero")
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        prepare_for_finetuning(pretrained, 3, class_names=["a", "b"])


def test_layer_decay_groups_and_weight_decay_exclusions():
    model = tiny(depth=3)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale_of = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    wd_of = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert scale_of["pos_embed"] == scale_of["patch_embed.proj.weight"] == 0.5 ** 4
    assert scale_of["blocks.0.attn.qkv.weight"] == 0.5 ** 3 and scale_of["blocks.2.mlp.fc2.bias"] == 0.5
    assert scale_of["head.weight"] == scale_of["norm.weight"] == 1.0
    assert wd_of["blocks.1.mlp.fc1.weight"] == 0.05 and wd_of["head.weight"] == 0.05
    for name in ("pos_embed", "cls_token", "blocks.1.mlp.fc1.bias", "blocks.1.norm1.weight", "norm.bias"):
        assert wd_of[name] == 0.0, name
    assert sorted(scale_of) == sorted(n for n, _ in model.named_parameters())
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, layer_decay=0.5))
    assert sorted(g["lr"] for g in optimizer.param_groups)[0] == pytest.approx(0.1 * 0.5 ** 4)
    assert optimizer.defaults["momentum"] == 0.9


def test_frozen_backbone_trains_only_the_head(cifar_images):
    model = prepare_for_finetuning(tiny(), 10)
    trainable = freeze_backbone(model)
    assert trainable == TINY["embed_dim"] * 10 + 10
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.5, weight_decay=0.0))
    model.train()
    F.cross_entropy(model(cifar_images), torch.arange(len(cifar_images))).backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"head.weight", "head.bias"}


# -------------------------------------------------------------------------- closed-form ridge
def _reference_ridge(x: torch.Tensor, labels: torch.Tensor, k: int, l2: float) -> torch.Tensor:
    """Ridge as an ordinary least-squares problem: [X; sqrt(l2) I] W = [Y; 0], solved by lstsq."""
    x = x.double()
    x = (x - x.mean(0)) / (x.std(0, unbiased=False) + 1e-5)
    x = torch.cat([x, torch.full((len(x), 1), BIAS_CONSTANT, dtype=x.dtype)], dim=1)
    y = 2.0 * F.one_hot(labels, k).double() - 1.0
    a = torch.cat([x, math.sqrt(l2) * torch.eye(x.shape[1], dtype=x.dtype)])
    b = torch.cat([y, torch.zeros(x.shape[1], k, dtype=x.dtype)])
    return torch.linalg.lstsq(a, b, driver="gelsd").solution


@pytest.mark.parametrize("n, d", [(60, 12), (12, 60)])  # more points than dimensions, and fewer
@pytest.mark.parametrize("form", ["primal", "dual"])
@pytest.mark.parametrize("l2", [1e-3, 1.0, 2.0 ** 10])
def test_ridge_matches_lstsq_in_primal_and_dual_form(n, d, form, l2):
    gen = torch.Generator().manual_seed(n * d)
    x = torch.randn(n, d, generator=gen) * torch.rand(d, generator=gen) * 3 + torch.randn(d, generator=gen)
    labels = torch.randint(0, 4, (n,), generator=gen)
    clf = fit_ridge(x, labels, 4, l2=l2, form=form)
    torch.testing.assert_close(clf.weight, _reference_ridge(x, labels, 4, l2), rtol=1e-6, atol=1e-6)


def test_ridge_auto_form_picks_the_smaller_system():
    assert RidgeSolver(torch.randn(50, 8), torch.randint(0, 3, (50,)), 3).form == "primal"
    assert RidgeSolver(torch.randn(8, 50), torch.randint(0, 3, (8,)), 3).form == "dual"
    solver = RidgeSolver(torch.randn(8, 50), torch.randint(0, 3, (8,)), 3)
    with pytest.raises(ValueError, match="l2 must be positive"):
        solver.solve(0.0)


def _separable(n_per_class: int, k: int = 5, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight clusters around well-separated class centres (the same centres for every seed)."""
    centres = 5.0 * torch.randn(k, d, generator=torch.Generator().manual_seed(123))
    labels = torch.arange(k).repeat_interleave(n_per_class)
    noise = 0.1 * torch.randn(len(labels), d, generator=torch.Generator().manual_seed(seed))
    return centres[labels] + noise, labels


@pytest.mark.parametrize("l2", [2.0 ** 10, "auto"])
def test_fewshot_on_separable_features_is_exact(l2):
    train_x, train_y = _separable(40)
    test_x, test_y = _separable(100, seed=1)
    results = fewshot_evaluate(train_x, train_y, test_x, test_y, shots=(1, 5, 10), seeds=3, l2=l2)
    assert [r.shots for r in results] == [1, 5, 10]
    for r in results:
        assert r.accuracies == [1.0, 1.0, 1.0] and r.std == 0.0
    probe = linear_probe(train_x, train_y, test_x, test_y, weight_decay=1e-3)
    assert probe.test_accuracy == 1.0 and probe.train_accuracy == 1.0


def test_probe_chooses_weight_decay_on_held_out_training_features_only():
    gen = torch.Generator().manual_seed(0)
    train_y, test_y = torch.arange(2).repeat(60), torch.arange(2).repeat(100)
    train_x = (2 * train_y[:, None] - 1) * 0.7 + 1.5 * torch.randn(120, 20, generator=gen)
    test_x = (2 * test_y[:, None] - 1) * 0.7 + 1.5 * torch.randn(200, 20, generator=gen)
    grid = (1e-3, 1e-1, 10.0)
    chosen = linear_probe(train_x, train_y, test_x, test_y, grid=grid, val_fraction=0.3)
    order = np.random.default_rng(0).permutation(120)  # the probe's split: 30 % held out, seed 0
    val, fit = torch.from_numpy(order[:36]), torch.from_numpy(order[36:])
    scores = {wd: fit_logistic(train_x[fit], train_y[fit], 2, weight_decay=wd)[0].accuracy(train_x[val], train_y[val])
              for wd in grid}
    assert chosen.weight_decay == max(wd for wd, acc in scores.items() if acc == max(scores.values()))
    shuffled = linear_probe(train_x, train_y, test_x, test_y[torch.randperm(200, generator=gen)], grid=grid,
                            val_fraction=0.3)
    assert shuffled.weight_decay == chosen.weight_decay  # the test labels play no part in the choice


def test_fewshot_draws_differ_by_seed_and_fail_clearly():
    gen = torch.Generator().manual_seed(0)
    train_x, train_y = torch.randn(200, 8, generator=gen), torch.arange(4).repeat(50)
    test_x, test_y = torch.randn(100, 8, generator=gen), torch.arange(4).repeat(25)
    (result,) = fewshot_evaluate(train_x, train_y, test_x, test_y, shots=(5,), seeds=4)
    assert len(set(result.accuracies)) > 1 and result.std > 0  # different draws, sample std over seeds
    with pytest.raises(ValueError, match="class 0 has 50 training images available, fewer than 60 shots"):
        fewshot_evaluate(train_x, train_y, test_x, test_y, shots=(60,), seeds=1)


# ---------------------------------------------------------------------------------- features
def test_features_are_the_head_input_and_are_cached(data_root):
    model = tiny(representation_size=24)
    data = load_split("cifar10", "test", data_dir=data_root).subset(range(40), ":40")
    feats = extract_features(model, data, batch_size=16)
    with torch.no_grad():
        x = EvalTransform(Preprocessing(size=32), 3)(torch.from_numpy(data.images).permute(0, 3, 1, 2))
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
    assert feats.shape == (40, 24)
    torch.testing.assert_close(feats, expected)
    cache = FeatureCache()
    assert cache.features(model, data) is cache.features(model, data)
    assert (cache.hits, cache.misses) == (1, 1)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.add_(0.1)  # changed weights must not read stale features
    assert not torch.allclose(cache.features(model, data), feats) and cache.misses == 2


def test_eval_transform_adapts_channels_and_size():
    grey = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    x = EvalTransform(Preprocessing(size=32), 3)(grey)
    assert x.shape == (2, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2])
    assert EvalTransform(Preprocessing(size=28, mean=(0.5,), std=(0.5,)), 1)(grey).abs().max() <= 1.0
    with pytest.raises(DatasetNotFoundError, match="no_such_set"):
        load_split("no_such_set", "train", data_dir="/nonexistent")


# ------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_fewshot_on_real_mnist_and_cifar(tmp_path, data_root, capsys):
    model = tiny(in_chans=3)
    model.save_pretrained(tmp_path / "model")
    args = ["--data-dir", str(data_root), "--max-train", "1500", "--max-test", "400", "--shots", "1,5",
            "--seeds", "2", "--cache-dir", str(tmp_path / "cache")]
    assert main(["fewshot", str(tmp_path / "model"), "--dataset", "cifar10", "--json", str(tmp_path / "c.json"),
                 *args]) == 0
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["dataset"] == "cifar10" and report["feature_dim"] == TINY["embed_dim"]
    assert [r["shots"] for r in report["fewshot"]] == [1, 5]
    assert all(len(r["accuracies"]) == 2 and 0 <= r["mean"] <= 1 for r in report["fewshot"])
    assert "5-shot ridge" in capsys.readouterr().out

    # Grey MNIST through the RGB 32x32 model, twice: the second run reads features from the disk cache.
    mnist = ["fewshot", str(tmp_path / "model"), "--dataset", "mnist", *args]
    assert main([*mnist, "--json", str(tmp_path / "m1.json")]) == 0
    cached = sorted((tmp_path / "cache").iterdir())
    assert len(cached) == 4  # train + test features of two data sets
    assert main([*mnist, "--json", str(tmp_path / "m2.json")]) == 0
    assert sorted((tmp_path / "cache").iterdir()) == cached
    first, second = (json.loads((tmp_path / f).read_text())["fewshot"] for f in ("m1.json", "m2.json"))
    for a, b in zip(first, second):  # the same features; multithreaded solvers may round differently
        assert a["accuracies"] == pytest.approx(b["accuracies"], abs=0.006)
    assert first[1]["mean"] > 0.2  # even random ViT features beat chance (10%) on 5-shot MNIST


def test_cli_fewshot_errors(tmp_path, capsys):
    assert main(["fewshot", "vit_mnist_patch4_28", "--random-init", "--dataset", "no_such_set",
                 "--data-dir", str(tmp_path)]) == 2
    assert "no_such_set" in capsys.readouterr().err
    assert main(["fewshot", str(tmp_path / "missing"), "--dataset", "mnist"]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fewshot", "x", "--dataset", "mnist", "--shots", "0,5"])


# ------------------------------------------------------- fine-tuning through the training loop
def _image_folder(root: Path, data_root: Path, classes: int = 3, train: int = 10, val: int = 5) -> Path:
    """A small ImageFolder tree of real CIFAR-10 images: train/<class>/*.png and val/<class>/*.png."""
    from PIL import Image

    with np.load(data_root / "cifar10" / "test.npz") as f:
        images, labels = f["images"][:600], f["labels"][:600]
    for c in range(classes):
        picks = np.flatnonzero(labels == c)[: train + val]
        for i, index in enumerate(picks):
            split = "train" if i < train else "val"
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index]).save(root / split / f"class{c}" / f"{index}.png")
    return root


def test_finetune_config_layers_recipe_file_and_overrides(tmp_path):
    model = tiny()
    model.config = model.config.replace(extra={"preprocess": {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]}})
    model.save_pretrained(tmp_path / "pretrained")  # a model directory (a folder holding only model/ is no run)
    (tmp_path / "ft.yaml").write_text("epochs: 3\noptim:\n  lr: 0.003\n")
    cfg = finetune_config(str(tmp_path / "pretrained"), "cifar10", img_size=64, config=str(tmp_path / "ft.yaml"),
                          overrides=["--optim.layer_decay", "0.75", "--model.drop_path_rate", "0.1"])
    assert (cfg.optim.name, cfg.optim.weight_decay, cfg.optim.clip_grad, cfg.optim.momentum) == ("sgd", 0.0, 1.0, 0.9)
    assert (cfg.epochs, cfg.optim.lr, cfg.optim.layer_decay) == (3, 0.003, 0.75)
    assert (cfg.data.dataset, cfg.data.img_size, cfg.finetune.init) == ("cifar10", 64, str(tmp_path / "pretrained"))
    assert cfg.data.mean == (0.4, 0.4, 0.4) and cfg.data.std == (0.2, 0.2, 0.2)  # pre-training normalisation
    assert cfg.model == {"name": "pretrained", "drop_path_rate": 0.1}  # no from-scratch architecture defaults
    with pytest.raises(ValueError, match="finetune.pos_embed"):
        finetune_config(str(tmp_path / "pretrained"), "cifar10", overrides=["--finetune.pos_embed", "zeros"])


def test_layer_decay_survives_the_learning_rate_schedule():
    from vitkit.train.config import OptimConfig
    from vitkit.train.optim import build_optimizer as build_train_optimizer
    from vitkit.train.optim import set_lr

    model = tiny(depth=2)
    optimizer = build_train_optimizer(model, OptimConfig(name="sgd", lr=0.1, layer_decay=0.5, weight_decay=0.0))
    assert isinstance(optimizer, torch.optim.SGD)
    set_lr(optimizer, 0.02)
    lrs = {n: g["lr"] for g in optimizer.param_groups for n in g["param_names"]}
    assert lrs["head.weight"] == pytest.approx(0.02) and lrs["pos_embed"] == pytest.approx(0.02 * 0.5 ** 3)


@pytest.mark.slow
def test_cli_finetune_at_a_new_resolution_with_a_frozen_backbone(tmp_path, data_root):
    pretrained = tiny(num_classes=10, representation_size=16, drop_path_rate=0.1)
    pretrained.save_pretrained(tmp_path / "pretrained")
    folder = _image_folder(tmp_path / "data", data_root)
    args = ["finetune", "--init", str(tmp_path / "pretrained"), "--dataset", f"folder:{folder}", "--img-size", "48",
            "--epochs", "2", "--data.batch_size", "10", "--data.num_workers", "0", "--out_dir", str(tmp_path / "runs"),
            "--run_name", "frozen", "--progress", "none", "--finetune.freeze_backbone", "--optim.lr", "0.1"]
    assert main(args) == 0
    finetuned = vitkit.load_model(tmp_path / "runs" / "frozen" / "model")
    assert finetuned.config.img_size == 48 and finetuned.config.num_classes == 3
    assert finetuned.config.class_names == ["class0", "class1", "class2"]
    assert finetuned.config.representation_size is None and finetuned.config.extra["finetuned_from"]
    assert finetuned.config.drop_path_rate == 0.0  # no drop-path in a frozen feature extractor
    expected = prepare_for_finetuning(pretrained, 3, img_size=48)
    backbone = {k: v for k, v in expected.state_dict().items() if not k.startswith("head.")}
    for key, value in backbone.items():  # frozen: exactly the resampled pre-trained weights
        assert torch.equal(finetuned.state_dict()[key], value), key
    assert torch.count_nonzero(finetuned.head.weight) > 0  # the head did train


def test_load_split_reads_image_folders_through_the_eval_transform(tmp_path, data_root):
    folder = _image_folder(tmp_path / "folder", data_root, classes=2, train=3, val=2)
    train = load_split(str(folder), "train")
    test = load_split(f"folder:{folder}", "test")  # no test split: the val/ folder is the evaluation split
    assert len(train) == 6 and train.files is not None
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and train.class_names == ["class0", "class1"]
    assert len(test) == 4 and test.name.endswith("/val")
    assert train.resized(EvalTransform(Preprocessing(size=16), 3)).shape == (6, 3, 16, 16)
    with np.load(data_root / "cifar10" / "test.npz") as f:  # pixels survive the PNG round trip
        first = f["images"][np.flatnonzero(f["labels"][:600] == 0)[0]]
    native = train.resized(EvalTransform(Preprocessing(size=32), 3)).permute(0, 2, 3, 1).numpy()
    assert any(np.array_equal(image, first) for image in native)
