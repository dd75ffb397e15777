"""`vitkit study`: the samples-matched plan, FLOPs with attention, tiny real-data runs of both
commands, and resumption (finished cells are skipped, an interrupted cell resumes)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import vitkit
from flop_formulas import vit_forward_flops
from vitkit import cli
from vitkit import study as study_mod
from vitkit.config import ViTConfig
from vitkit.models.registry import register_model
from vitkit.models.resnet import ResNetConfig
from vitkit.study import Cell, plan_compute_study, plan_data_study, training_flops_per_sample
from vitkit.train.evaluate import evaluate_trained

# Tiny members of the three families, so that a cell trains in about a second.
register_model("study_tiny_vit", ViTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=1,
                                           num_heads=2, mlp_dim=64))
register_model("study_tiny_hybrid", ViTConfig(img_size=32, patch_size=1, num_classes=10, embed_dim=32, depth=1,
                                              num_heads=2, mlp_dim=64,
                                              stem={"layers": [1], "widths": [128], "stem_width": 32,
                                                    "stem_kernel": 3, "stem_stride": 4, "stem_pool": False}))
register_model("study_tiny_resnet", ResNetConfig(img_size=32, num_classes=10, stem="cifar", stem_width=8,
                                                 layers=[1, 1], widths=[8, 16]), architecture="resnet")
MODELS = ["study_tiny_vit", "study_tiny_hybrid", "study_tiny_resnet"]


def test_data_study_gives_every_fraction_the_same_number_of_samples():
    steps = {1.0: 390, 0.5: 195, 0.1: 39, 0.05: 19}
    cells = plan_data_study(["a", "b"], [1.0, 0.05, 0.5, 0.1], epochs=4, steps_per_epoch=steps.__getitem__)
    assert [(c.fraction, c.epochs) for c in cells[::2]] == [(0.05, 82), (0.1, 40), (0.5, 8), (1.0, 4)]
    for cell in cells:  # samples seen within one epoch of the full-data budget
        assert abs(cell.epochs * steps[cell.fraction] - 4 * 390) <= steps[cell.fraction] / 2
    assert [c.model for c in cells[:2]] == ["a", "b"]
    with pytest.raises(ValueError, match="fractions"):
        plan_data_study(["a"], [0.0, 1.0], epochs=1, steps_per_epoch=steps.__getitem__)
    assert plan_compute_study(["a"], [4, 1]) == [Cell("a", 1.0, 1), Cell("a", 1.0, 4)]


def test_training_flops_equal_the_formula():
    """Forward + backward FLOPs per image of a ViT, by hand: the backward costs two forwards except the
    patch projection (images need no gradient). A plain FlopCounterMode, which the study used before,
    misses vitkit's oneDNN Linear and the CPU attention kernel and counts far less."""
    model = vitkit.create_model("study_tiny_vit")
    shapes = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=32, depth=1, mlp_dim=64)
    expected = vit_forward_flops(**shapes)
    assert training_flops_per_sample(model) == 3 * expected["forward"] - expected["patch"]


def test_training_flops_of_a_hybrid_add_the_stem_to_the_transformer():
    """The hybrid's count is its CNN stem (convolutions, which every counter sees) plus the same
    transformer as a ViT with as many tokens."""
    from torch.utils.flop_counter import FlopCounterMode

    hybrid = vitkit.create_model("study_tiny_hybrid")  # 32 px, stem stride 4, then 1x1 patches: 8x8 tokens
    stem = hybrid.patch_embed.backbone
    with FlopCounterMode(display=False) as counter:
        stem(torch.randn(2, 3, 32, 32)).sum().backward()
    stem_flops = counter.get_total_flops() / 2
    hybrid.zero_grad(set_to_none=True)
    shapes = dict(img_size=8, patch_size=1, in_chans=128, num_classes=10, embed_dim=32, depth=1, mlp_dim=64)
    expected = vit_forward_flops(**shapes)
    # the projection of the stem's features now needs its input gradient too: a full 3x forward
    assert training_flops_per_sample(hybrid) == stem_flops + 3 * expected["forward"]


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory, data_root) -> Path:
    """Real CIFAR-10 images in the .npz layout, few enough for seconds-long runs (300 train, 100 test)."""
    source = data_root / "cifar10"
    root = tmp_path_factory.mktemp("data")
    (root / "cifar10").mkdir()
    with np.load(source / "test.npz", allow_pickle=False) as npz:
        images, labels = npz["images"], npz["labels"]
    np.savez(root / "cifar10" / "train.npz", images=images[:300], labels=labels[:300])
    np.savez(root / "cifar10" / "test.npz", images=images[300:400], labels=labels[300:400])
    shutil.copy(source / "meta.json", root / "cifar10" / "meta.json")
    return root


@pytest.fixture
def base_config(tmp_path, tiny_cifar, monkeypatch) -> Path:
    monkeypatch.setenv("VITKIT_DATA", str(tiny_cifar))
    path = tmp_path / "base.yaml"
    path.write_text("data: {dataset: cifar10, batch_size: 50, eval_batch_size: 100}\n"
                    "optim: {warmup_epochs: 0}\nlog_every: 1\n")
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_data_study_cli_writes_table_and_plot_and_skips_finished_cells(tmp_path, base_config, monkeypatch, capsys):
    out = tmp_path / "study"
    argv = ["study", "data", "--models", ",".join(MODELS), "--fractions", "0.5,1", "--epochs", "1",
            "--out", str(out), "--config", str(base_config)]
    assert cli.main(argv) == 0
    rows = _rows(out / "results.csv")
    assert len(rows) == 6 and (out / "accuracy_vs_data.png").stat().st_size > 10_000
    by_cell = {(r["model"], float(r["fraction"])): r for r in rows}
    assert {r["family"] for r in rows} == {"vit", "hybrid", "resnet"}
    for model in MODELS:
        half, full = by_cell[model, 0.5], by_cell[model, 1.0]
        assert (int(half["train_size"]), int(full["train_size"])) == (150, 300)  # stratified subsets
        assert (int(half["epochs"]), int(full["epochs"])) == (2, 1)
        assert half["samples_seen"] == full["samples_seen"] == "300"  # the same number of samples
        assert float(half["train_flops"]) == pytest.approx(float(full["train_flops"]))
        model = vitkit.load_model(Path(full["run_dir"]) / "model")
        per_sample = training_flops_per_sample(model)
        assert float(full["flops_per_sample"]) == pytest.approx(per_sample)
        assert float(full["train_flops"]) == pytest.approx(per_sample * 300)
    # the study's test accuracy is each run's final model evaluated on the full (100-image) test set, as
    # `vitkit eval` gives it (before: only 0 <= acc <= 1 was checked)
    for row in rows:
        report = evaluate_trained(Path(row["run_dir"]) / "model", dataset="cifar10", device="cpu",
                                  out_dir=tmp_path / "eval" / Path(row["run_dir"]).name)
        assert report.result.num_samples == 100
        assert float(row["test_acc"]) == pytest.approx(report.result.top1, abs=1e-9)
        assert float(row["test_loss"]) == pytest.approx(report.result.loss, rel=1e-4)

    # run again: nothing is trained
    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(study_mod, "train", no_training)
    monkeypatch.setattr(study_mod, "resume", no_training)
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "6 already done, 0 to run" in capsys.readouterr().out
    assert _rows(out / "results.csv") == rows


@pytest.mark.slow
def test_interrupted_cell_resumes_from_its_checkpoint(tmp_path, base_config, monkeypatch):
    from vitkit.train.config import load_config

    base = load_config(base_config)
    cells = [Cell("study_tiny_vit", 1.0, 2)]
    out = tmp_path / "study"
    study_mod.run_study("compute", cells, base, out, log=lambda s: None)
    first = _rows(out / "results.csv")[0]
    # as if killed after the last checkpoint but before the result was written
    (out / "cells" / f"{cells[0].key}.json").unlink()
    calls = []
    real_resume = study_mod.resume
    monkeypatch.setattr(study_mod, "train", lambda cfg: calls.append("train"))
    monkeypatch.setattr(study_mod, "resume", lambda run, *a: calls.append("resume") or real_resume(run, *a))
    study_mod.run_study("compute", cells, base, out, log=lambda s: None)
    assert calls == ["resume"]
    again = _rows(out / "results.csv")[0]
    assert again["test_acc"] == first["test_acc"] and again["steps"] == first["steps"]


@pytest.mark.slow
def test_compute_study_cli_on_two_processes(tmp_path, base_config):
    out = tmp_path / "study"
    argv = ["study", "compute", "--models", "resnet20_cifar", "--epochs", "1,2", "--fraction", "0.5",
            "--out", str(out), "--config", str(base_config), "--workers", "2"]
    assert cli.main(argv) == 0
    rows = _rows(out / "results.csv")
    assert [int(r["epochs"]) for r in rows] == [1, 2]
    assert float(rows[1]["train_flops"]) == pytest.approx(2 * float(rows[0]["train_flops"]))
    assert (out / "accuracy_vs_compute.png").is_file()


def test_study_rejects_unknown_models_before_training(tmp_path, base_config):
    with pytest.raises(ValueError, match="unknown model 'resnet2_cifar'"):
        study_mod.study("data", models=["resnet2_cifar"], fractions=[1.0], epochs=[1], out_dir=tmp_path,
                        config=base_config)


def test_cells_warm_up_over_the_same_number_of_samples(tmp_path):
    from vitkit.study import Cell, cell_config

    base = {"data": {"dataset": "cifar10"}, "optim": {"warmup_epochs": 0.5}}
    full, tenth = cell_config(Cell("vit_mini_patch4_32", 1.0, 2), base, tmp_path), \
        cell_config(Cell("vit_mini_patch4_32", 0.1, 20), base, tmp_path)
    assert full.optim.warmup_epochs == 0.5 and tenth.optim.warmup_epochs == pytest.approx(5.0)
    assert tenth.data.train_fraction == 0.1 and tenth.epochs == 20
    # never longer than the run itself
    assert cell_config(Cell("vit_mini_patch4_32", 0.1, 2), base, tmp_path).optim.warmup_epochs == 2.0


def test_time_study_gives_every_model_the_same_wall_clock_budget():
    steps = {1.0: 390, 0.1: 39}
    cells = study_mod.plan_time_study(["fast", "slow"], [1.0, 0.1], 60.0, {"fast": 0.5, "slow": 2.0},
                                      steps.__getitem__)
    assert [(c.model, c.fraction, c.steps, c.epochs) for c in cells] == [
        ("fast", 0.1, 120, 4), ("slow", 0.1, 30, 1), ("fast", 1.0, 120, 1), ("slow", 1.0, 30, 1)]
    assert cells[0].key == "fast-f0.1-e4-s120"
    with pytest.raises(ValueError, match="budget"):
        study_mod.plan_time_study(["fast"], [1.0], 0.0, {"fast": 1.0}, steps.__getitem__)


@pytest.mark.slow
def test_time_study_cli_stops_each_cell_at_its_step_budget(tmp_path, base_config, monkeypatch, capsys):
    """Step times measured back to back (kept for a resumed study), converted to per-model step counts;
    a T2T-ViT takes part as its own family."""
    register_model("study_tiny_t2t", vitkit.get_model_config("t2t_vit_mini_32").replace(
        embed_dim=32, depth=1, num_heads=2, token_dim=8))
    out = tmp_path / "study"
    argv = ["study", "data", "--models", "study_tiny_vit,study_tiny_t2t", "--fractions", "1",
            "--budget-seconds", "0.25", "--out", str(out), "--config", str(base_config)]
    assert cli.main(argv) == 0
    timed = __import__("json").loads((out / "step_seconds.json").read_text())["seconds"]
    rows = {r["model"]: r for r in _rows(out / "results.csv")}
    assert {r["family"] for r in rows.values()} == {"vit", "t2t"}
    for model, row in rows.items():
        budget = max(1, round(0.25 / timed[model]))
        assert int(row["steps"]) == budget and int(row["epochs"]) == -(-budget // 6)  # 300 images / 50 a batch
    capsys.readouterr()
    assert cli.main(argv) == 0  # resumed: the same step times, so the same cells, nothing trained again
    assert "2 already done, 0 to run" in capsys.readouterr().out
