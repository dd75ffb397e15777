"""The training loop's behaviour, pinned: the default recipe's first steps and a resumed run's weights,
recorded from the loop before its rewrite into named helpers (issue 25), must come out the same after it.

The recorded values are exact on the host and torch build that recorded them (the digest of every weight
must match bit for bit); elsewhere the kernels may round differently, so the losses and a weight checksum are
compared to 1e-4 instead, which still catches any change of behaviour (an extra random draw, a learning rate
one step off, a batch in another order all move them by far more).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vitkit.train import load_config, resume, train
from vitkit.train.checkpoints import load_checkpoint
from vitkit.train.monitor import read_metrics

DATA = Path(os.environ.get("VITKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
PINNED = Path(__file__).with_name("loop_pinned.json")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One thread: the recorded digests are of single-threaded kernels."""


def tiny_cifar(root: Path, train: int = 160, test: int = 100) -> Path:
    """The first ``train`` and ``test`` images of the real CIFAR-10 copy, as a data root of its own, so the
    default recipe runs unchanged on a few batches and evaluates in a second."""
    (root / "cifar10").mkdir(parents=True)
    for split, n in (("train", train), ("test", test)):
        with np.load(DATA / "cifar10" / f"{split}.npz") as npz:
            np.savez(root / "cifar10" / f"{split}.npz", images=npz["images"][:n], labels=npz["labels"][:n])
    shutil.copy(DATA / "cifar10" / "meta.json", root / "cifar10" / "meta.json")
    return root


def digest(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(weights):
        h.update(key.encode())
        h.update(weights[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def checksum(weights: dict[str, torch.Tensor]) -> float:
    return float(sum(v.double().abs().sum() for v in weights.values() if v.is_floating_point()))


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def recipe_runs(tmp_path: Path) -> dict[str, dict]:
    """The default recipe (``vitkit train`` with no config) on 160 CIFAR-10 images, batch 32: 10 optimizer
    steps over 2 epochs; then the same run resumed from its step-3 checkpoint. And a tiny MNIST ViT with
    every source of randomness in a step (dropout, drop path, mixup, EMA, accumulation), resumed mid-epoch."""
    root = tiny_cifar(tmp_path / "data")
    out = {}
    cfg = load_config(None, ["--data_dir", str(root), "--batch_size", "32", "--epochs", "2", "--log_every", "1",
                             "--ckpt_every_steps", "3", "--keep_last_k", "10", "--progress", "none",
                             "--out_dir", str(tmp_path), "--run_name", "recipe", "--device", "cpu"])
    out["recipe"] = _record(train(cfg).run_dir)
    out["recipe_resumed"] = _record(_resumed(tmp_path / "recipe", tmp_path / "recipe_resumed", 3))

    mnist = load_config(None, [
        "--model", "vit_mnist_patch4_28", "--model.patch_size", "7", "--model.embed_dim", "32", "--model.depth", "2",
        "--model.num_heads", "2", "--model.mlp_dim", "64", "--model.drop_rate", "0.1", "--model.drop_path_rate",
        "0.1", "--dataset", "mnist", "--data_dir", str(DATA), "--data.samples_per_class", "12", "--batch_size", "10",
        "--accum_steps", "2", "--data.hflip", "false", "--data.mixup_alpha", "0.4", "--ema_decay", "0.9",
        "--warmup_epochs", "0.5", "--epochs", "2", "--log_every", "1", "--eval_every", "1",
        "--eval_hflip_tta", "false", "--ckpt_every_steps", "2", "--keep_last_k", "10", "--progress", "none",
        "--device", "cpu", "--out_dir", str(tmp_path), "--run_name", "mnist"])
    out["mnist"] = _record(train(mnist).run_dir)  # 120 images / 10 / 2 = 6 optimizer steps per epoch
    out["mnist_resumed"] = _record(_resumed(tmp_path / "mnist", tmp_path / "mnist_resumed", 4))
    return out


def _resumed(run: Path, copy: Path, step: int) -> Path:
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "model")
    resume(copy / "checkpoints" / f"step-{step:08d}.pt")
    return copy


def _record(run_dir: Path) -> dict:
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    weights = dict(state["model"])
    if state.get("ema"):
        weights |= {f"ema.{k}": v for k, v in state["ema"]["module"].items()}
    for index, moments in state["optimizer"]["state"].items():
        weights |= {f"optim.{index}.{k}": v for k, v in moments.items() if isinstance(v, torch.Tensor)}
    epochs = [r for r in read_metrics(run_dir) if r["kind"] == "epoch"]
    return {"losses": losses(run_dir), "digest": digest(weights), "checksum": checksum(weights),
            "val_loss": epochs[-1]["val_loss"], "steps": state["global_step"]}


def host() -> dict:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def test_the_loop_trains_the_default_recipe_and_resumes_as_it_did_before_its_rewrite(tmp_path: Path):
    """Golden values of the loop as it was at 251633c (150-line ``_train``): the rewrite must reproduce
    them, and a resumed run must end on the straight run's weights."""
    got = recipe_runs(tmp_path)
    pinned = json.loads(PINNED.read_text())
    same_host = pinned["host"] == host()
    for name, record in pinned["runs"].items():
        assert got[name]["steps"] == record["steps"], name
        if same_host:
            assert got[name]["losses"] == record["losses"], name
            assert got[name]["digest"] == record["digest"], f"{name}: weights differ from the recorded loop's"
        else:
            assert got[name]["losses"] == pytest.approx(record["losses"], rel=1e-4), name
            assert got[name]["checksum"] == pytest.approx(record["checksum"], rel=1e-4), name
        assert got[name]["val_loss"] == pytest.approx(record["val_loss"], rel=1e-4), name
    for name in ("recipe", "mnist"):  # host-independent: a resumed run is its straight run, bit for bit
        assert got[f"{name}_resumed"]["digest"] == got[name]["digest"], name
        assert got[f"{name}_resumed"]["losses"] == got[name]["losses"], name


if __name__ == "__main__":  # record: python tests/test_loop.py DIR (only with the loop the values pin)
    import sys

    torch.set_num_threads(1)
    runs = recipe_runs(Path(sys.argv[1]))
    PINNED.write_text(json.dumps({"host": host(), "runs": runs}, indent=1) + "\n")
    print(json.dumps(runs, indent=1))
