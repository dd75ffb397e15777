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
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

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
    steps over 2 epochs, with the model it had when the values were recorded (``vit_convstem_cifar_d4_32``;
    the recipe trains ``vit_airstem_cifar_32`` with Muon and a whitened stem since issue 22, with crops padded
    by 2 and translation TTA);
    then the same run resumed from its step-3
    checkpoint. And a tiny MNIST ViT with every source of randomness in a step (dropout, drop path, mixup,
    EMA, accumulation), resumed mid-epoch."""
    root = tiny_cifar(tmp_path / "data")
    out = {}
    cfg = load_config(None, ["--model", "vit_convstem_cifar_d4_32", "--model.head_init", "zeros",
                             "--optim.name", "adamw", "--whiten_stem", "false", "--data.crop_padding", "4",
                             "--eval_translate_tta", "false",
                             "--data_dir", str(root), "--batch_size", "32", "--epochs", "2", "--log_every", "1",
                             "--ckpt_every_steps", "3", "--keep_last_k", "10", "--progress", "none",
                             "--out_dir", str(tmp_path), "--run_name", "recipe", "--device", "cpu"])
    out["recipe"] = _record(train(cfg).run_dir)
    out["recipe_resumed"] = _record(_resumed(tmp_path / "recipe", tmp_path / "recipe_resumed", 3))

    mnist = load_config(None, [
        "--model", "vit_mnist_patch4_28", "--model.patch_size", "7", "--model.embed_dim", "32", "--model.depth", "2",
        "--model.num_heads", "2", "--model.mlp_dim", "64", "--model.drop_rate", "0.1", "--model.drop_path_rate",
        "0.1", "--dataset", "mnist", "--data_dir", str(DATA), "--data.samples_per_class", "12", "--batch_size", "10",
        "--accum_steps", "2", "--data.hflip", "false", "--data.crop_padding", "4", "--data.mixup_alpha", "0.4",
        "--optim.name", "adamw", "--whiten_stem", "false",
        "--ema_decay", "0.9", "--warmup_epochs", "0.5", "--epochs", "2", "--log_every", "1", "--eval_every", "1",
        "--eval_hflip_tta", "false", "--eval_translate_tta", "false", "--ckpt_every_steps", "2", "--keep_last_k", "10",
        "--progress", "none", "--device", "cpu", "--out_dir", str(tmp_path), "--run_name", "mnist"])
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
    """The torch build, the CPU's kernel capability and its model: two AVX-512 hosts of different makes
    (Intel Xeon, AMD EPYC) round differently in the last digit, so only the same model compares exactly."""
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(), "cpu_model": _cpu_model()}


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


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


def test_the_default_recipe_repeats_itself_and_resumes_bit_for_bit(tmp_path: Path):
    """Today's recipe as it is (its model, whitened stem, Muon, its augmentation) on 160 CIFAR-10 images,
    batch 32: two runs of the same length give the same weights, and a run resumed from a mid-run checkpoint
    (Muon's momentum buffers and AdamW's moments restored) ends on them too."""
    root = tiny_cifar(tmp_path / "data")
    args = ["--data_dir", str(root), "--batch_size", "32", "--epochs", "2", "--log_every", "1",
            "--ckpt_every_steps", "3", "--keep_last_k", "10", "--progress", "none", "--out_dir", str(tmp_path),
            "--device", "cpu"]
    recipe = load_config(None)
    assert recipe.optim.name == "muon" and recipe.whiten_stem
    runs = [train(load_config(None, [*args, "--run_name", name])).run_dir for name in ("a", "b")]
    resumed = _resumed(runs[0], tmp_path / "resumed", 3)
    weights = [digest(load_checkpoint(run / "checkpoints" / "last.pt")["model"]) for run in [*runs, resumed]]
    assert weights[0] == weights[1] == weights[2]
    assert losses(runs[0]) == losses(runs[1]) == losses(resumed)
    assert losses(runs[0])[-1] < losses(runs[0])[0]


if __name__ == "__main__":  # record: python tests/test_loop.py DIR (only with the loop the values pin)
    import sys

    torch.set_num_threads(1)
    runs = recipe_runs(Path(sys.argv[1]))
    PINNED.write_text(json.dumps({"host": host(), "runs": runs}, indent=1) + "\n")
    print(json.dumps(runs, indent=1))


# ------------------------------------------------------------------------------ what a user sees
def test_the_resume_command_is_printed_the_way_vitkit_was_started(tmp_path: Path, monkeypatch):
    from vitkit.train.invocation import vitkit_command

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-X", "utf8", "-m", "vitkit", "train"])
    assert vitkit_command("train", "--resume", "runs/a b") == "python3 -m vitkit train --resume 'runs/a b'"

    script = tmp_path / "venv" / "bin" / "vitkit"  # a console script that is not the one on PATH
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "orig_argv", ["/usr/bin/python3", ".venv/bin/vitkit", "train"])
    monkeypatch.setattr(sys, "argv", [str(script), "train"])
    monkeypatch.setenv("PATH", "/nonexistent")
    assert vitkit_command("train") == f"{script} train"
    monkeypatch.setenv("PATH", str(script.parent))  # ... and one that is
    assert vitkit_command("train") == "vitkit train"

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert vitkit_command("train") == "torchrun --nproc-per-node=2 -m vitkit train"


def test_a_stopped_run_prints_a_resume_command_that_runs(tmp_path: Path):
    """SIGTERM a `python -m vitkit train`: the printed command (not a bare `vitkit`) resumes the run."""
    root = tiny_named(tmp_path / "data", "mnist", 120, 20)
    run = tmp_path / "term"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "vitkit", "train", *TINY_MNIST, "--data_dir", str(root), "--epochs", "200",
           "--out_dir", str(tmp_path), "--run_name", "term", "--ckpt_every_steps", "1000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "metrics.jsonl").is_file():
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    command = stderr.split("continue with: ")[1].strip()
    assert command == shlex.join([sys.executable, "-m", "vitkit", "train", "--resume", str(run)]), stderr
    resumed = subprocess.run([*shlex.split(command), "--epochs", "1"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert "resuming" in resumed.stdout, resumed.stderr


def test_the_bar_shows_the_numbers_from_the_first_step_and_the_runs_time_left(tmp_path: Path, capsys):
    """log_every 50 and 12 steps: the bar still shows the loss, accuracy and the run's ETA (before: blank
    until step 50, and only tqdm's time left in the epoch)."""
    root = tiny_named(tmp_path / "data", "mnist", 120, 20)
    cfg = load_config(None, [*TINY_MNIST, "--data_dir", str(root), "--epochs", "2", "--batch_size", "20",
                             "--log_every", "50", "--progress", "bar", "--out_dir", str(tmp_path)])
    train(cfg)
    err = capsys.readouterr().err
    first_epoch = err.split("epoch 2/2")[0]
    assert "loss " in first_epoch and "acc " in first_epoch and "run ETA " in first_epoch, err


# ------------------------------------------------------------------------------ the time budget
TINY_MNIST = ["--model", "vit_mnist_patch4_28", "--model.patch_size", "7", "--model.embed_dim", "32",
              "--model.depth", "2", "--model.num_heads", "2", "--model.mlp_dim", "64", "--dataset", "mnist",
              "--data.hflip", "false", "--eval_hflip_tta", "false",
              "--eval_translate_tta", "false", "--eval_every", "1", "--batch_size", "5",
              "--warmup_epochs", "1", "--progress", "plain", "--device", "cpu", "--log_every", "1000"]


def tiny_named(root: Path, name: str, train: int, test: int) -> Path:
    (root / name).mkdir(parents=True)
    for split, n in (("train", train), ("test", test)):
        with np.load(DATA / name / f"{split}.npz") as npz:
            np.savez(root / name / f"{split}.npz", images=npz["images"][:n], labels=npz["labels"][:n])
    shutil.copy(DATA / name / "meta.json", root / name / "meta.json")
    return root


class Host:
    """A host of known speed: the run's clock moves only when the model computes, ``step(n)`` seconds for
    the n-th training forward and ``eval_seconds`` for an evaluation forward."""

    def __init__(self, step: Callable[[int], float], eval_seconds: float) -> None:
        self.now, self.forwards, self.step, self.eval_seconds = 0.0, 0, step, eval_seconds

    def __call__(self) -> float:
        return self.now


def play(monkeypatch, host: Host) -> None:
    from vitkit.train import loop, task

    build = task.build_run_model

    def build_timed(cfg, data):
        model = build(cfg, data)
        forward = model.forward

        def timed(x):
            if model.training and len(x) > 2:  # not the memory estimate's probes of 1 and 2 images
                host.now += host.step(host.forwards)
                host.forwards += 1
            elif not model.training:
                host.now += host.eval_seconds
            return forward(x)

        model.forward = timed
        return model

    monkeypatch.setattr(task, "build_run_model", build_timed)
    monkeypatch.setattr(loop, "_now", host)


def fitting_steps(budget: float, start: int, clock: float, per_step: float, per_eval: float, steps_per_epoch: int,
                  first_epoch: int) -> int:
    """By brute force: the most steps whose rest (steps, then an evaluation after every epoch from
    ``first_epoch`` to the last) ends by 99% of the budget."""
    best = start
    for total in range(start + 1, start + 10_000):
        evaluations = math.ceil(total / steps_per_epoch) - first_epoch
        if clock + (total - start) * per_step + evaluations * per_eval <= 0.99 * budget:
            best = total
    return best


def test_a_budget_times_the_first_steps_fixes_the_length_and_a_rerun_of_that_length_is_the_same_run(
        tmp_path: Path, monkeypatch, capsys):
    """0.25 s a step, evaluations as long as estimated: after 21 steps the run fixes max_steps so that steps
    and evaluations end inside 60 s, says so, records it, and ends there; `--max_steps N` repeats it exactly."""
    root = tiny_named(tmp_path / "data", "mnist", 120, 50)  # batch 5: 24 steps an epoch; 50 test images
    host = Host(lambda n: 0.25, eval_seconds=50 / 5 * 0.25 / 3)  # an evaluated image a third of a trained one
    play(monkeypatch, host)
    args = [*TINY_MNIST, "--data_dir", str(root), "--out_dir", str(tmp_path)]
    result = train(load_config(None, [*args, "--time_budget", "1m", "--run_name", "budget"]))

    expected = fitting_steps(60, 21, 21 * 0.25, 0.25, host.eval_seconds, 24, 0)
    out = capsys.readouterr().out
    assert "budget 1m: timing the first 21 steps" in out
    assert f"budget 1m: {expected:,} steps = {expected / 24:.1f} epochs at 0.25 s/step measured" in out
    assert "re-planned" not in out
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert (saved["max_steps"], saved["epochs"], saved["budget_replans"]) == (expected, math.ceil(expected / 24), [])
    assert saved["time_budget"] == "1m"
    assert result.steps == expected
    assert 0.95 * 60 <= result.train_seconds <= 60  # on the host's clock: the run fills its budget
    assert load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["config"]["max_steps"] == expected

    monkeypatch.undo()
    again = train(load_config(None, [*args, "--max_steps", str(expected), "--epochs", "100", "--run_name", "again"]))
    assert again.steps == expected
    a, b = (load_checkpoint(r.run_dir / "checkpoints" / "last.pt") for r in (result, again))
    assert digest(a["model"]) == digest(b["model"])
    assert losses(result.run_dir) == losses(again.run_dir)


@pytest.mark.parametrize("images", [120, 1200])
def test_a_host_that_slows_down_mid_run_still_ends_near_its_budget(tmp_path: Path, monkeypatch, capsys,
                                                                   images: int):
    """After step 60 each step takes twice as long: the plan made at step 21 would overrun by a third or more;
    re-planned after each evaluation and at every tenth of the run (decay spread over fewer steps), the run ends
    within 5% of its budget, also when it is all one epoch (1,200 images: no evaluation before the last), and
    the re-plans are in its config, so the run's schedule can be replayed."""
    root = tiny_named(tmp_path / "data", "mnist", images, 50)
    host = Host(lambda n: 0.25 if n < 60 else 0.5, eval_seconds=50 / 5 * 0.25 / 3)
    play(monkeypatch, host)
    result = train(load_config(None, [*TINY_MNIST, "--data_dir", str(root), "--out_dir", str(tmp_path),
                                      "--time_budget", "60s", "--run_name", "slow"]))
    per_epoch = images // 5
    planned = fitting_steps(60, 21, 21 * 0.25, 0.25, host.eval_seconds, per_epoch, 0)
    unplanned_seconds = 60 * 0.25 + (planned - 60) * 0.5 + math.ceil(planned / per_epoch) * host.eval_seconds
    assert unplanned_seconds > 1.3 * 60  # what the first plan alone would have cost on this host
    out = capsys.readouterr().out
    assert "re-planned" in out
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["max_steps"] == planned and saved["budget_replans"]
    assert result.steps == saved["budget_replans"][-1][1] < planned
    assert 0.95 * 60 <= result.train_seconds <= 60.5, result.train_seconds

    monkeypatch.undo()  # the recorded plan replays on any host: same schedule, same weights
    replay = train(load_config(result.run_dir / "config.yaml", ["--time_budget", "null", "--run_name", "replay"]))
    a, b = (load_checkpoint(r.run_dir / "checkpoints" / "last.pt") for r in (result, replay))
    assert replay.steps == result.steps and digest(a["model"]) == digest(b["model"])


def test_a_fixed_length_wins_over_the_budget_and_durations_are_checked():
    from vitkit.train.budget import parse_duration

    assert load_config(None).time_budget == "60m"  # the default recipe fits an hour
    assert load_config("mnist_convstem").time_budget is None  # the MNIST quick recipe keeps its epochs
    assert load_config(None, ["--epochs", "3"]).time_budget is None
    assert load_config(None, ["--max_steps", "30"]).time_budget is None
    assert load_config(None, ["--epochs", "3", "--time_budget", "10m"]).time_budget == "10m"
    from vitkit.train.config import merge_configs

    planned = {"epochs": 36, "max_steps": 14030, "time_budget": "60m", "budget_replans": [[5000, 13000]]}
    assert merge_configs(planned, {"epochs": 50}) == {  # `--resume RUN --epochs 50` of a budget run: 50 epochs
        "epochs": 50, "max_steps": None, "time_budget": None, "budget_replans": []}
    assert merge_configs(planned, {"max_steps": 20000})["max_steps"] == 20000
    assert merge_configs({"epochs": 3, "max_steps": 10}, {"epochs": 5})["max_steps"] == 10  # no budget: as before
    assert [parse_duration(t) for t in ("60m", "1h30m", "1.5h", "90s", "3600", " 2m 30s")] == [
        3600, 5400, 5400, 90, 3600, 150]
    for bad in ("60x", "-5m", "m", "0", "nan"):
        with pytest.raises(ValueError, match="time_budget"):
            load_config(None, ["--time_budget", bad])


def test_a_replanned_schedule_continues_the_learning_rate_and_ends_at_the_minimum():
    from vitkit.train.loop import Schedule
    from vitkit.train.optim import lr_at

    plain = Schedule(1, 10, 100, 10, 1.0, 0.01)
    assert [plain.lr_at(s) for s in range(100)] == [
        lr_at(s, total_steps=100, warmup_steps=10, lr=1.0, min_lr=0.01) for s in range(100)]
    shorter = Schedule(1, 10, 70, 10, 1.0, 0.01, replans=((40, 80), (60, 70)), planned_steps=100)
    assert [shorter.lr_at(s) for s in range(41)] == [plain.lr_at(s) for s in range(41)]  # the past is kept
    assert shorter.lr_at(69) == pytest.approx(0.01)  # the decay ends at the new last step
    lrs = [shorter.lr_at(s) for s in range(70)]
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # still decaying, no jump up
    steps = [abs(a - b) for a, b in zip(lrs[10:], lrs[11:])]
    assert max(steps) < 0.06  # continuous: no step larger than the steepest of the compressed cosine


# ------------------------------------------------------------------------------ resume on class folders
def tiny_folders(root: Path, classes: int = 2, train: int = 12, val: int = 4) -> Path:
    """A class-folder data set of real JPEGs (the first images of the first imagenette classes)."""
    source = DATA / "imagenette_subset"
    for wnid in sorted(p.name for p in (source / "train").iterdir())[:classes]:
        for split, n in (("train", train), ("val", val)):
            (root / split / wnid).mkdir(parents=True)
            for image in sorted((source / split / wnid).iterdir())[:n]:
                shutil.copy(image, root / split / wnid / image.name)
    return root


FOLDER = ["--data.img_size", "32", "--batch_size", "4", "--data.num_workers", "2", "--epochs", "2",
          "--log_every", "1", "--ckpt_every_steps", "2", "--keep_last_k", "20", "--progress", "none",
          "--device", "cpu", "--eval_hflip_tta", "false", "--eval_translate_tta", "false", "--data.hflip", "true"]


@pytest.mark.parametrize(("task", "layout"), [("drop_path", "folder"), ("mae", "folder"), ("drop_path", "shards")])
def test_a_run_on_class_folders_that_draws_from_the_global_rng_resumes_bit_for_bit(tmp_path: Path, task: str,
                                                                                   layout: str):
    """Drop path and dropout (classification) or MAE's masks draw from the global RNG in every step; the
    DataLoader used to take its workers' seed from that RNG when a pass started, so a resumed run (a new
    pass, mid-epoch or at an epoch boundary, with 2 workers) drew other masks: weights differed by ~1e-2.
    The same for a shard set written from the folders."""
    from vitkit.data.shard_writer import write_shards
    from vitkit.train.mae import pretrain_config

    root = tiny_folders(tmp_path / "folders")  # 24 training images, batch 4: 6 steps an epoch, 12 in all
    dataset = f"folder:{root}"
    if layout == "shards":
        write_shards(dataset, tmp_path / "shards", shard_size=20_000, progress=False)
        dataset = f"shards:{tmp_path / 'shards'}"
    args = [*FOLDER, "--dataset", dataset, "--out_dir", str(tmp_path), "--run_name", "straight"]
    if task == "mae":
        cfg = pretrain_config(None, ["--model", "mae_vit_mini_patch4_32", "--model.patch_size", "8",
                                     "--model.embed_dim", "32", "--model.depth", "1", "--model.num_heads", "2",
                                     "--model.mlp_dim", "64", "--model.decoder_embed_dim", "32",
                                     "--model.decoder_depth", "1", "--model.decoder_num_heads", "2",
                                     "--model.decoder_mlp_dim", "64", "--warmup_epochs", "0.5", *args])
    else:
        cfg = load_config(None, [*TINY_MNIST[:10], "--model.in_chans", "3", "--model.patch_size", "8",
                                 "--model.drop_path_rate", "0.2", "--model.drop_rate", "0.1", "--warmup_epochs", "0.5",
                                 *args])
    straight = train(cfg)
    assert straight.steps == 12
    expected = load_checkpoint(straight.run_dir / "checkpoints" / "last.pt")
    for step in (4, 6):  # mid-epoch, and the epoch boundary
        run = _resumed(straight.run_dir, tmp_path / f"from{step}", step)
        got = load_checkpoint(run / "checkpoints" / "last.pt")
        assert digest(got["model"]) == digest(expected["model"]), f"{task}: resumed from step {step}"
        assert losses(run) == losses(straight.run_dir)


# ------------------------------------------------------------------------------ which checkpoints are the run's
def _mnist_run(tmp_path: Path, name: str, *extra: str):
    root = tmp_path / "data" if (tmp_path / "data").is_dir() else tiny_named(tmp_path / "data", "mnist", 120, 20)
    return train(load_config(None, [*TINY_MNIST, "--data_dir", str(root), "--batch_size", "10", "--epochs", "1",
                                    "--ckpt_every_steps", "2", "--keep_last_k", "20", "--progress", "none",
                                    "--out_dir", str(tmp_path), "--run_name", name, *extra]))


def test_a_last_checkpoint_copied_in_from_another_run_is_refused(tmp_path: Path, capsys):
    from vitkit.checkpoint import CheckpointError
    from vitkit.cli import main as cli_main

    ours, theirs = _mnist_run(tmp_path, "ours").run_dir, _mnist_run(tmp_path, "theirs", "--seed", "1").run_dir
    assert (ours / "checkpoints" / "run-id").read_text() != (theirs / "checkpoints" / "run-id").read_text()
    shutil.copy(theirs / "checkpoints" / "last.pt", ours / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match=r"last\.pt: this checkpoint belongs to another run"):
        resume(ours)
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(ours)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "belongs to another run" in err and "Traceback" not in err

    copy = tmp_path / "copy"  # a whole run copied (a backup, a move) is the same run, and resumes
    shutil.copytree(theirs, copy)
    shutil.rmtree(copy / "model")
    assert resume(copy / "checkpoints" / "step-00000004.pt").steps == 12


def test_resuming_from_an_older_step_moves_the_abandoned_branch_out_of_the_rotation(tmp_path: Path, capsys):
    """Before: the abandoned branch's step-10 and step-12 outranked the new step-6 and step-8, which the
    rotation (keep_last_k 2) deleted as soon as they were written."""
    run = _mnist_run(tmp_path, "branch").run_dir  # 12 steps, a step checkpoint every 2
    capsys.readouterr()
    resumed = resume(run / "checkpoints" / "step-00000004.pt",
                     ["--keep_last_k", "2", "--max_steps", "8", "--progress", "plain"])
    assert resumed.steps == 8
    names = sorted(p.name for p in (run / "checkpoints").glob("step-*.pt"))
    assert names == ["step-00000006.pt", "step-00000008.pt"]
    aside = run / "checkpoints" / "abandoned-at-step-00000004"
    assert sorted(p.name for p in aside.iterdir()) == [f"step-{s:08d}.pt" for s in (6, 8, 10, 12)]
    assert "moved 4 step checkpoint(s) newer than step 4" in capsys.readouterr().out


@pytest.mark.slow
def test_a_budget_under_torchrun_plans_on_the_main_process_and_every_process_follows(tmp_path: Path):
    """Two gloo processes with a 25 s budget: each times its own steps, but the plan and every re-plan are
    the main process's (broadcast), so both stop at the same step (a disagreement would hang DDP's all-reduce
    or end the run with a timeout) and the run ends near its budget."""
    root = tiny_named(tmp_path / "data", "mnist", 400, 50)  # batch 5 x 2 processes: 40 steps an epoch
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
              "vitkit", "train", *TINY_MNIST, "--data_dir", str(root), "--time_budget", "25s", "--out_dir",
              str(tmp_path), "--run_name", "ddp", "--log_every", "1", "--ckpt_every_steps", "0"]
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("budget 25s: timing") == 1  # the main process speaks
    saved = yaml.safe_load((tmp_path / "ddp" / "config.yaml").read_text())
    state = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    total = saved["budget_replans"][-1][1] if saved["budget_replans"] else saved["max_steps"]
    assert state["global_step"] == total and state["world_size"] == 2
    assert state["elapsed"] <= 25 * 1.05, state["elapsed"]
