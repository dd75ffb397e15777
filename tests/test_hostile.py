"""Numbers that are not numbers, full disks, shared directories, stale files and hostile images (issue 26,
items 7-12 and the smaller ones; docs/failures.md). Downloads and caches are in test_hub_faults.py.

Tiny models on real MNIST and Imagenette files, a few steps each; disk-full on a small tmpfs when the test
can mount one (root), else by making the lowest-level write fail with ENOSPC.
"""

from __future__ import annotations

import dataclasses
import json
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
              "--eval_translate_tta", "false",
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


# ------------------------------------------------------------------------------------- 9: a full disk
class SmallDisk:
    """A directory on a filesystem of a given size: a real tmpfs when the test may mount one (root), else the
    same failures simulated where vitkit's writers meet them (torch.save's and safetensors' own errors, a
    write of text that raises ENOSPC, and statvfs reporting no free space), which this says in ``kind``."""

    def __init__(self, path: Path, monkeypatch):
        self.path, self.monkeypatch = path, monkeypatch
        path.mkdir()
        simulate = os.environ.get("VITKIT_TEST_SIMULATE_DISK_FULL") == "1"
        self.kind = "tmpfs" if not simulate and self._mount("size=64m") else "simulated"
        self.full = False

    def _mount(self, options: str, remount: bool = False) -> bool:
        import subprocess

        if os.geteuid() != 0:
            return False
        opts = f"remount,{options}" if remount else options
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(self.path)], capture_output=True)
        return done.returncode == 0

    def fill(self, leave: int) -> None:
        """Leave about ``leave`` bytes free for what comes next."""
        if self.kind == "tmpfs":
            used = sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
            pages = (used + leave) // 4096 + 64
            assert self._mount(f"size={pages * 4096}", remount=True)
            ballast = self.path / ".ballast"
            free = os.statvfs(self.path).f_bavail * os.statvfs(self.path).f_frsize
            if free > leave:
                ballast.write_bytes(b"\0" * (free - leave))
            return
        self._simulate()

    def _simulate(self) -> None:
        import errno

        import safetensors.torch

        inside = str(self.path)
        real_save, real_save_file, real_write_text = torch.save, safetensors.torch.save_file, Path.write_text

        def save(obj, f, *args, **kwargs):
            if inside in str(f):
                Path(f).write_bytes(b"PK\x03\x04 half")
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
            return real_save(obj, f, *args, **kwargs)

        def save_file(tensors, filename, *args, **kwargs):
            if inside in str(filename):
                raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real_save_file(tensors, filename, *args, **kwargs)

        def write_text(self_, data, *args, **kwargs):
            if inside in str(self_):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write_text(self_, data, *args, **kwargs)

        self.monkeypatch.setattr(torch, "save", save)
        self.monkeypatch.setattr(safetensors.torch, "save_file", save_file)
        self.monkeypatch.setattr("vitkit.fileio.save_file", save_file)
        self.monkeypatch.setattr("vitkit.convert.huggingface.save_file", save_file)
        self.monkeypatch.setattr(Path, "write_text", write_text)
        self.monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((4096, 4096, 16, 0, 0, 0, 0, 0, 0, 255)))

    def close(self) -> None:
        if self.kind == "tmpfs":
            import subprocess

            done = subprocess.run(["umount", str(self.path)], capture_output=True, text=True)
            if done.returncode != 0:  # a file still open on it (a failed run's log): detach it now, free later
                subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    disk = SmallDisk(tmp_path / "disk", monkeypatch)
    yield disk
    disk.close()


def _leftovers(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".part")]


def test_a_full_disk_during_training_is_one_line_and_the_last_checkpoint_stays_whole(trained_run, small_disk,
                                                                                     tmp_path, capsys):
    import shutil

    run = small_disk.path / "run"
    shutil.copytree(trained_run, run)
    before = load_checkpoint(run / "checkpoints" / "last.pt")
    small_disk.fill(leave=(run / "checkpoints" / "last.pt").stat().st_size // 3)
    code = cli_main(["train", "--resume", str(run), "--epochs", "3"])
    err = _one_line(capsys.readouterr().err.strip().splitlines()[-1])
    assert code == 1, (small_disk.kind, err)
    assert "No space left on device" in err and str(run) in err, (small_disk.kind, err)
    assert not _leftovers(run), _leftovers(run)
    after = load_checkpoint(run / "checkpoints" / "last.pt")  # the earlier checkpoint: whole, unchanged
    assert after["global_step"] == before["global_step"]
    assert all(torch.equal(after["model"][k], before["model"][k]) for k in before["model"])


def test_a_new_run_on_a_disk_with_2_kb_free_names_the_file_it_could_not_write(small_disk, capsys):
    small_disk.fill(leave=2048)
    code = cli_main(["train", *TINY_MNIST, "--out_dir", str(small_disk.path), "--run_name", "r", "--progress", "none"])
    err = _one_line(capsys.readouterr().err)
    assert code == 1, (small_disk.kind, err)
    assert "No space left on device: " + str(small_disk.path / "r") in err, (small_disk.kind, err)


def test_a_full_disk_in_export_and_convert_is_one_line_and_leaves_nothing(trained_run, small_disk, capsys):
    small_disk.fill(leave=2048)
    out = small_disk.path
    cases = [(["export", str(trained_run), "--out", str(out / "exported")], out / "exported", "model.safetensors"),
             (["convert", str(trained_run), str(out / "hf"), "--to", "hf"], out / "hf", "model.safetensors"),
             (["convert", str(trained_run), str(out / "w.safetensors"), "--to", "timm"], out / "w.safetensors",
              "w.safetensors"),
             (["convert", str(trained_run), str(out / "w.pth"), "--to", "timm"], out / "w.pth", "w.pth")]
    for argv, target, named in cases:
        code = cli_main(argv)
        err = _one_line(capsys.readouterr().err)
        assert code == 1, (small_disk.kind, argv, err)
        assert "No space left on device" in err and named in err and str(out) in err, (small_disk.kind, err)
        assert not target.exists(), f"{target} left behind ({small_disk.kind})"
        assert not _leftovers(out)


# --------------------------------------------------------------------- 11: stale files of a format
def test_writing_hf_into_a_sharded_directory_removes_that_formats_stale_files_only(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    import vitkit

    torch.manual_seed(0)
    old = vitkit.create_model("vit_mini_patch4_32", num_classes=4)
    torch.manual_seed(1)
    new = vitkit.create_model("vit_mini_patch4_32", num_classes=4).eval()
    directory = tmp_path / "hf"
    vitkit.convert.save_as(old, directory, "hf")
    sharded = transformers.ViTForImageClassification.from_pretrained(directory)
    shutil_dir = tmp_path / "sharded"
    sharded.save_pretrained(shutil_dir, max_shard_size="100KB", safe_serialization=True)
    index = json.loads((shutil_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for p in directory.iterdir():
        p.unlink()
    for p in shutil_dir.iterdir():
        (directory / p.name).write_bytes(p.read_bytes())
    (directory / "README.md").write_text("my notes\n")
    mine = {**json.loads((directory / "config.json").read_text()), "mine": 1}  # a key the user added
    (directory / "config.json").write_text(json.dumps(mine))
    new.save_pretrained(tmp_path / "new")
    capsys.readouterr()
    assert cli_main(["convert", str(tmp_path / "new"), str(directory), "--to", "hf"]) == 0
    err = capsys.readouterr().err
    assert f"replaced the existing {directory / 'config.json'} (it held keys the new one does not: " in err
    assert "mine" in err.split("replaced the existing", 1)[1].splitlines()[0]
    assert f"removed {directory / 'model.safetensors.index.json'}" in err
    names = sorted(p.name for p in directory.iterdir())
    assert "model.safetensors.index.json" not in names and not set(shards) & set(names)
    assert "README.md" in names and (directory / "README.md").read_text() == "my notes\n"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = new(x)
        ours = vitkit.from_pretrained(str(directory)).eval()(x)
        theirs = transformers.ViTForImageClassification.from_pretrained(directory).eval()(pixel_values=x).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-4)
    # writing the same format again over vitkit's own files: nothing to say
    assert cli_main(["convert", str(tmp_path / "new"), str(directory), "--to", "hf"]) == 0
    assert "vitkit: " not in capsys.readouterr().err


# ---------------------------------------------------------- 10: a study directory and a run in use
def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "VITKIT_MEMORY_LIMIT"):
        env.pop(name, None)
    return env


def _train_lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count('"kind": "train"') if path.is_file() else 0


def _wait(proc, done, timeout: float = 120) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not done():
        time.sleep(0.05)
    assert proc.poll() is None and done(), f"the first process ended or stalled: {proc.stderr.read()}"


@pytest.mark.slow
def test_a_second_study_with_the_same_out_says_so_and_leaves_the_first_alone(tmp_path, capsys):
    import signal
    import subprocess
    import sys

    base = tmp_path / "base.yaml"
    base.write_text(f"data: {{dataset: mnist, data_dir: {DATA}, samples_per_class: 50, batch_size: 10, "
                    "hflip: false}\noptim: {warmup_epochs: 0}\nlog_every: 1\nckpt_every_steps: 0\n"
                    "eval_hflip_tta: false\neval_translate_tta: false\nprogress: plain\n")
    out = tmp_path / "study"
    argv = ["study", "data", "--models", "vit_mnist_patch4_28", "--fractions", "1", "--epochs", "30",
            "--out", str(out), "--config", str(base)]
    first = subprocess.Popen([sys.executable, "-m", "vitkit", *argv], env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        runs = out / "runs"
        _wait(first, lambda: runs.is_dir() and any(_train_lines(r) >= 2 for r in runs.iterdir()))
        cell = next(runs.iterdir())
        assert not (cell / "checkpoints" / "last.pt").exists()  # what the second study took for a crashed cell
        assert cli_main(argv) == 1
        err = _one_line(capsys.readouterr().err)
        assert "another vitkit study is running in this --out directory" in err and str(out) in err
        assert f"vitkit process {first.pid}" in err
        lines = _train_lines(cell)
        _wait(first, lambda: _train_lines(cell) > lines)  # the first goes on, its cell untouched
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    # the lock died with its process: the study can be taken over
    from vitkit.fileio import lock_directory, unlock_directory

    lock_directory(out, "test", "busy")
    unlock_directory(out)


@pytest.mark.slow
def test_resume_of_a_run_that_is_still_going_says_so_instead_of_racing_it(tmp_path, capsys):
    import signal
    import subprocess
    import sys
    import tempfile

    run = tmp_path / "live"
    live = subprocess.Popen([sys.executable, "-m", "vitkit", "train", *TINY_MNIST, "--epochs", "50",
                             "--data.samples_per_class", "50", "--batch_size", "10", "--ckpt_every_steps", "2",
                             "--out_dir", str(tmp_path), "--run_name", "live", "--progress", "plain"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait(live, lambda: (run / "checkpoints" / "last.pt").is_file() and _train_lines(run) >= 3)
        fd, tmp = tempfile.mkstemp(prefix=".last.pt.", suffix=".tmp", dir=run / "checkpoints")  # a write in flight
        os.close(fd)
        assert cli_main(["train", "--resume", str(run)]) == 1
        err = _one_line(capsys.readouterr().err)
        assert f"the run {run} is still going in another process" in err and f"vitkit process {live.pid}" in err
        assert Path(tmp).exists()  # its partial writes were not taken for a dead run's
        lines = _train_lines(run)
        _wait(live, lambda: _train_lines(run) > lines)
        live.send_signal(signal.SIGTERM)
        _, stderr = live.communicate(timeout=60)
    finally:
        if live.poll() is None:
            live.kill()
    assert live.returncode == 128 + signal.SIGTERM, stderr
    assert "deleted or moved" not in stderr and "stopped by SIGTERM" in stderr


# ------------------------------------------------------------- smaller: a half-written figure
def test_resume_removes_a_half_written_figure(trained_run, tmp_path, capsys):
    import shutil
    import tempfile

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "figures").mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".curves-epoch002.png.", suffix=".tmp", dir=run / "figures")
    os.write(fd, b"\x89PNG half")
    os.close(fd)
    assert cli_main(["train", "--resume", str(run), "--epochs", "2", "--progress", "plain"]) == 0
    assert not Path(tmp).exists()
    assert "removed 1 partial file(s) of an interrupted write" in capsys.readouterr().out


# --------------------------------------------------------------------- 12: a decompression bomb
def _bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid grayscale PNG of side x side black pixels: 390 KB on disk, 400 MB decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer, row = zlib.compressobj(9), b"\0" * (side + 1)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb_folder(tmp_path_factory) -> tuple[Path, Path]:
    """Four real Imagenette images per class and split, plus a decompression bomb among the training images."""
    import shutil

    root = tmp_path_factory.mktemp("bomb") / "set"
    for split in ("train", "val"):
        for cls in sorted(p.name for p in (IMAGENETTE / split).iterdir()):
            (root / split / cls).mkdir(parents=True)
            for image in sorted((IMAGENETTE / split / cls).iterdir())[:4]:
                shutil.copy(image, root / split / cls / image.name)
    bomb = _bomb_png(root / "train" / sorted(p.name for p in (root / "train").iterdir())[0] / "huge.png")
    assert bomb.stat().st_size < 500_000
    return root, bomb


def test_a_decompression_bomb_in_a_class_folder_is_one_line_and_skipped_under_skip_corrupt(bomb_folder, tmp_path,
                                                                                           capsys):
    root, bomb = bomb_folder
    args = ["train", "--model", "vit_mnist_patch4_28", "--model.patch_size", "8", "--model.embed_dim", "32",
            "--model.depth", "1", "--model.num_heads", "2", "--model.mlp_dim", "64", "--model.in_chans", "3",
            "--dataset", f"folder:{root}", "--data.img_size", "32", "--batch_size", "4", "--epochs", "1",
            "--eval_hflip_tta", "false",
            "--eval_translate_tta", "false", "--progress", "none", "--out_dir", str(tmp_path)]
    assert cli_main(args) == 2
    err = _one_line(capsys.readouterr().err)
    assert str(bomb) in err and "decompression-bomb" in err and "PIL.Image.MAX_IMAGE_PIXELS is 89478485" in err
    assert "VITKIT_MAX_IMAGE_PIXELS" in err and "skip_corrupt" in err
    assert cli_main([*args, "--data.skip_corrupt", "true", "--run_name", "skipped"]) == 0
    import vitkit

    report = vitkit.load_model(tmp_path / "skipped" / "model").config.extra["training"]
    assert report["skipped_files"] == [str(bomb)]


def test_the_pixel_limit_can_be_raised_from_the_environment(bomb_folder, monkeypatch):
    from PIL import Image

    from vitkit.data.folder import apply_pixel_limit, header_problem

    _, bomb = bomb_folder
    assert "decompression-bomb" in header_problem(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    monkeypatch.setenv("VITKIT_MAX_IMAGE_PIXELS", "500000000")
    apply_pixel_limit()
    assert Image.MAX_IMAGE_PIXELS == 500_000_000 and header_problem(bomb) is None
    monkeypatch.setenv("VITKIT_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="VITKIT_MAX_IMAGE_PIXELS='lots'"):
        apply_pixel_limit()


# ---------------------------------------------------------------------- smaller: EXIF orientation
def test_exif_orientation_is_applied_alike_in_training_crops_eval_and_predict(tmp_path):
    """A photo stored sideways with orientation 6 (what phones write) is seen upright everywhere, exactly as
    the same photo stored upright."""
    import numpy as np
    from PIL import Image

    from vitkit.data.folder import FolderImages, FolderSplit, read_image
    from vitkit.data.transforms import EvalTransform
    from vitkit.preprocessing import Preprocessing

    rng = np.random.default_rng(0)
    upright = Image.fromarray(rng.integers(0, 256, (60, 40, 3), dtype=np.uint8))  # 40 wide, 60 high
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as the sensor wrote it: 60 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    tagged, plain = tmp_path / "tagged.png", tmp_path / "plain.png"
    stored.save(tagged, exif=exif)
    upright.save(plain)
    assert torch.equal(read_image(tagged), read_image(plain)) and read_image(tagged).shape == (3, 60, 40)

    split = FolderSplit(tmp_path, [tagged, plain], np.zeros(2, dtype=np.int64), ["a"])
    for mode in ("random_resized_crop", "resize_center"):
        images = FolderImages(split, 16, mode, seed=3)
        assert torch.equal(images[(0, 1, 5)][0], images[(1, 1, 5)][0]), mode  # same box, same pixels
    transform = EvalTransform(Preprocessing(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875), 3)
    assert torch.equal(transform.load(tagged), transform.load(plain))


# ------------------------------------------------------------------------- smaller: YAML tags
def test_a_python_yaml_tag_is_refused_in_one_line(tmp_path, capsys):
    config = tmp_path / "evil.yaml"
    config.write_text("optim: !!python/object/apply:os.system ['touch pwned']\n")
    assert cli_main(["train", "--config", str(config), "--print-config"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert str(config) in err and "!!python/object/apply:os.system" in err and "refused" in err
    assert "line 1, column 8" in err
    assert cli_main(["train", "--optim.lr", "!!python/name:os.system", "--print-config"]) == 2
    assert "--optim.lr: the YAML tag !!python/name:os.system" in _one_line(capsys.readouterr().err)
    assert not Path("pwned").exists()
