"""Numbers that are not numbers, full disks, shared directories, stale files and hostile images (issue 26,
items 7-12 and the smaller ones; docs/failures.md). Downloads and caches are in test_hub_faults.py.

Tiny models on real MNIST and Imagenette files, a few steps each; disk-full on a small tmpfs when the test
can mount one (root), else by making the lowest-level write fail with ENOSPC.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path

import pytest
import torch

from vitkit.cli import main as cli_main
from vitkit.config import ViTConfig
from vitkit.config_engine import ConfigError, field_types
from vitkit.data.config import DataConfig
from vitkit.train import TrainingDiverged, load_config, train
from vitkit.train.checkpoints import load_checkpoint
from vitkit.train.config import OptimConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VITKIT_DATA", REPO.parent / "shared" / "data"))
IMAGENETTE = DATA / "imagenette_subset"

TINY_MNIST = ["--model", "vit_mnist_patch4_28", "--model.patch_size", "7", "--model.embed_dim", "32",
              "--model.depth", "2", "--model.num_heads", "2", "--model.mlp_dim", "64", "--dataset", "mnist",
              "--data_dir", str(DATA), "--log_every", "1", "--data.hflip", "false", "--eval_hflip_tta", "false",
              "--warmup_epochs", "0.5", "--data.samples_per_class", "10", "--batch_size", "20", "--epochs", "1"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this module runs torch on one thread (see conftest)."""


def _cfg(tmp_path: Path, *extra: str) -> TrainConfig:
    return load_config(None, [*TINY_MNIST, "--out_dir", str(tmp_path), "--progress", "none", *extra])


def _mnist_image(tmp_path: Path) -> Path:
    import numpy as np
    from PIL import Image

    with np.load(DATA / "mnist" / "test.npz") as f:
        pixels = f["images"][0, :, :, 0]
    path = tmp_path / "digit.png"
    Image.fromarray(pixels).save(path)
    return path


def _one_line(err: str) -> str:
    err = err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- 7: NaN weights and logits
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        return train(load_config(None, [*TINY_MNIST, "--out_dir", str(out), "--progress", "none",
                                        "--ckpt_every_steps", "2", "--run_name", "r"])).run_dir


def test_nan_weights_are_an_error_naming_the_file_in_predict_eval_and_resume(trained_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "nan-run"
    shutil.copytree(trained_run, run)
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["model"]["head.weight"][0, 0] = float("nan")
    torch.save(state, last)
    image = _mnist_image(tmp_path)

    assert cli_main(["predict", str(run), str(image), "--checkpoint", "last", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no half-JSON, no "nan%"
    err = _one_line(captured.err)
    assert str(last) in err and "NaN or infinite" in err and "head.weight" in err

    assert cli_main(["eval", str(run), "--checkpoint", "last", "--dataset", "mnist", "--data-dir", str(DATA),
                     "--out", str(tmp_path / "eval")]) == 2
    err = _one_line(capsys.readouterr().err)
    assert str(last) in err and "NaN or infinite" in err
    assert not (tmp_path / "eval" / "eval.json").exists()

    assert cli_main(["train", "--resume", str(run)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert str(last) in err and "not a good state to resume" in err and "step-" in err  # names the alternatives


def test_non_finite_logits_from_finite_weights_are_an_error_naming_the_image(trained_run, tmp_path, capsys,
                                                                            monkeypatch):
    import vitkit.resolver as resolver

    load = resolver.load_source

    def overflowing(*args, **kwargs):  # what fp16 overflow gives: finite weights, infinite logits
        resolved = load(*args, **kwargs)
        forward = resolved.model.forward
        resolved.model.forward = lambda x: forward(x) * float("inf")
        return resolved

    monkeypatch.setattr("vitkit.resolver.load_source", overflowing)  # the CLI imports it when it runs
    image = _mnist_image(tmp_path)
    assert cli_main(["predict", str(trained_run), str(image), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "logits are NaN or infinite" in captured.err and str(image) in captured.err


def test_weights_that_turn_non_finite_are_never_saved_as_the_last_good_state(tmp_path, monkeypatch):
    """Step 4's update makes a weight NaN while its loss and gradient are finite: the checkpoint due at step 4
    is not written, and last.pt stays step 2's finite state, as the message says."""
    import vitkit.train.task as task

    build = task.build_run_model

    def build_poisoned(cfg, data):
        model = build(cfg, data)
        forward, calls = model.forward, []

        def poisoned(x):
            if model.training and len(x) > 2:  # not the memory estimate's probes of 1 and 2 images
                calls.append(1)
            out = forward(x)
            if len(calls) == 4:  # after this forward: the loss is finite, the weights are not
                with torch.no_grad():
                    model.head.bias[0] = float("nan")
            return out

        model.forward = poisoned
        return model

    monkeypatch.setattr(task, "build_run_model", build_poisoned)
    with pytest.raises(TrainingDiverged, match=r"NaN or infinite values .*head.bias.* step 4 .*last good "
                                               r"checkpoint is .*last\.pt"):
        train(_cfg(tmp_path, "--ckpt_every_steps", "2", "--log_every", "5", "--run_name", "poisoned"))
    state = load_checkpoint(tmp_path / "poisoned" / "checkpoints" / "last.pt")
    assert state["global_step"] == 2
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------------- 8: NaN and infinite config values
def _float_keys() -> list[str]:
    """Every float key of the training config, the model section included, dotted as on the command line."""
    def floats(cls, prefix):
        for name, hint in field_types(cls).items():
            args = typing.get_args(hint)
            if hint is float or (float in args and type(None) in args and len(args) == 2):
                yield prefix + name
            elif dataclasses.is_dataclass(hint) and prefix == "" and name != "model":
                yield from floats(hint, f"{name}.")

    keys = list(floats(TrainConfig, ""))
    keys += [f"model.{k}" for k in floats(ViTConfig, "")]
    assert {"optim.lr", "optim.weight_decay", "optim.warmup_epochs", "data.mixup_alpha", "ema_decay",
            "model.drop_path_rate"} <= set(keys), keys
    assert {k.split(".")[0] for k in keys} >= {"optim", "data", "model"}
    return keys


FLOAT_KEYS = _float_keys()


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-inf", ".inf", "1e999"])
def test_every_float_config_key_refuses_nan_and_infinity_by_name(value):
    for key in FLOAT_KEYS:
        with pytest.raises(ConfigError) as info:
            load_config(None, [*TINY_MNIST, f"--{key}", value])
        message = str(info.value)
        assert f"{key} must be a finite number" in message, (key, message)


def test_nan_learning_rate_blames_lr_and_the_command_line_says_so_in_one_line(capsys):
    assert cli_main(["train", *TINY_MNIST, "--optim.lr", "nan", "--print-config"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "optim.lr must be a finite number" in err and "min_lr" not in err
    assert cli_main(["train", *TINY_MNIST, "--optim.warmup_epochs", ".inf", "--print-config"]) == 2
    assert "optim.warmup_epochs must be a finite number" in _one_line(capsys.readouterr().err)
    # the config classes built in Python refuse it too
    for cls, key in ((OptimConfig, "weight_decay"), (DataConfig, "mixup_alpha")):
        with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
            cls(**{key: float("nan")})
