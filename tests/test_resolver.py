"""One road from a SOURCE to a model: every command on a training run that was stopped before its end
(no ``model/`` yet), on the run directory and on each of its checkpoint files; ``vitkit export``; and the
errors of unsafe, damaged or mismatching checkpoints.

The run is real: a tiny ViT on 100 MNIST images, 23 epochs asked for, SIGTERM after the second evaluation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vitkit
from vitkit.checkpoint import CheckpointError
from vitkit.cli import main as cli_main
from vitkit.resolver import (
    ModelSource,
    hub_source,
    load_source,
    register_source_hook,
    resolve_source,
    unregister_source_hook,
)
from vitkit.runfiles import load_checkpoint
from vitkit.train.monitor import read_metrics

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VITKIT_DATA", REPO.parent / "shared" / "data"))
EPOCHS = 23
TINY = ["--model", "vit_mnist_patch4_28", "--model.patch_size", "7", "--model.embed_dim", "32", "--model.depth", "2",
        "--model.num_heads", "2", "--model.mlp_dim", "64", "--dataset", "mnist", "--data_dir", str(DATA),
        "--data.samples_per_class", "10", "--batch_size", "20", "--data.hflip", "false", "--lr", "3e-3",
        "--warmup_epochs", "0.5", "--eval_every", "1", "--eval_hflip_tta", "false",
        "--eval_translate_tta", "false", "--progress", "plain",
        "--log_every", "1", "--ckpt_every_steps", "3", "--keep_last_k", "2", "--ema_decay", "0.9"]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _epochs(run: Path) -> list[dict]:
    if not (run / "metrics.jsonl").is_file():
        return []
    return [r for r in read_metrics(run) if r["kind"] == "epoch"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this module runs torch on one thread (see conftest)."""


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A run of 23 epochs stopped by SIGTERM after its second evaluation, as a user's Ctrl-C would."""
    out = tmp_path_factory.mktemp("runs")
    run = out / "stopped"
    cmd = [sys.executable, "-m", "vitkit", "train", *TINY, "--epochs", str(EPOCHS), "--out_dir", str(out),
           "--run_name", "stopped"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and len(_epochs(run)) < 2:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert 2 <= len(_epochs(run)) < EPOCHS
    return run


def _state(run: Path, name: str) -> dict:
    return load_checkpoint(run / "checkpoints" / name)


def _assert_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert own.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(own[key], value), key


def _best_epoch(run: Path) -> dict:
    epochs = _epochs(run)
    best = max(r["best_acc"] for r in epochs)
    return next(r for r in epochs if r["best_acc"] == best)


# ------------------------------------------------------------------------------------- the run
def test_a_stopped_run_has_curves_and_checkpoints_but_no_model(stopped_run: Path):
    assert not (stopped_run / "model").exists()
    assert (stopped_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn at each evaluation
    assert not list(stopped_run.glob(".curves.png.*"))
    names = {p.name for p in (stopped_run / "checkpoints").glob("*.pt")}
    assert {"best.pt", "last.pt"} <= names and any(n.startswith("step-") for n in names)


def test_the_run_directory_resolves_to_its_best_state_and_says_so(stopped_run: Path):
    source = resolve_source(stopped_run)
    assert (source.kind, source.state, source.run_dir) == ("training", "best", stopped_run)
    assert source.path == stopped_run / "checkpoints" / "best.pt"
    resolved = load_source(stopped_run)
    best = _state(stopped_run, "best.pt")
    _assert_weights(resolved.model, best["ema"]["module"])  # EMA weights, as a finished run exports
    epoch = best["epoch"]
    assert "best checkpoint" in resolved.description and f"epoch {epoch} of {EPOCHS} done" in resolved.description
    assert "EMA weights" in resolved.description and f"step {best['global_step']}" in resolved.description
    assert resolved.training_config["epochs"] == EPOCHS
    raw = load_source(stopped_run, use_ema=False).model
    _assert_weights(raw, best["model"])


def test_load_model_reads_every_state_of_a_run(stopped_run: Path):
    last = _state(stopped_run, "last.pt")
    _assert_weights(vitkit.load_model(stopped_run, checkpoint="last"), last["ema"]["module"])
    _assert_weights(vitkit.load_model(stopped_run / "checkpoints" / "last.pt"), last["ema"]["module"])
    _assert_weights(vitkit.load_model(stopped_run), _state(stopped_run, "best.pt")["ema"]["module"])
    step_file = sorted((stopped_run / "checkpoints").glob("step-*.pt"))[0]
    step = int(step_file.stem.split("-")[1])
    expected = load_checkpoint(step_file)["ema"]["module"]
    _assert_weights(vitkit.load_model(stopped_run, checkpoint=f"step-{step}"), expected)  # no zero padding needed
    _assert_weights(vitkit.from_pretrained(step_file), expected)
    bigger = vitkit.load_model(stopped_run, img_size=56)  # resolution change, as for any source
    assert bigger.pos_embed.shape == (1, 1 + 64, 32)
    with pytest.raises(CheckpointError, match=r"no model state .* it has: best, last, step-"):
        vitkit.load_model(stopped_run, checkpoint="model")
    with pytest.raises(ValueError, match="unknown run state 'newest'"):
        vitkit.load_model(stopped_run, checkpoint="newest")


# ------------------------------------------------------------------------------------ commands
@pytest.mark.parametrize("which", ["run", "best.pt", "last.pt"])
def test_eval_on_the_run_and_its_checkpoints(stopped_run: Path, which: str, tmp_path: Path, capsys):
    source = stopped_run if which == "run" else stopped_run / "checkpoints" / which
    assert cli_main(["eval", str(source), "--out", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["num_samples"] == 10_000
    if which == "last.pt":
        assert "last checkpoint" in out
        return
    assert "loaded: " in out and "best checkpoint" in out and report["loaded"].endswith(")")
    # the best state's accuracy is the one the run measured for it (EMA weights, same test set)
    assert report["top1"] == pytest.approx(_best_epoch(stopped_run)["val_acc_ema"], abs=2e-4)


def test_predict_on_the_run_and_on_last_pt(stopped_run: Path, tmp_path: Path, capsys):
    with np.load(DATA / "mnist" / "test.npz") as npz:
        images = npz["images"][:2]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.asarray(image).squeeze().astype(np.uint8)).save(paths[-1])
    for source in (stopped_run, stopped_run / "checkpoints" / "last.pt"):
        assert cli_main(["predict", str(source), *map(str, paths), "--json", "--top-k", "3"]) == 0
        captured = capsys.readouterr()
        results = json.loads(captured.out)
        assert len(results) == 2 and all(len(r["top_k"]) == 3 for r in results)
        assert "loaded: " in captured.err


def test_analyze_run_as_in_the_docs(stopped_run: Path, tmp_path: Path, capsys):
    # docs/analysis.md: vitkit analyze RUN --dataset ... --out DIR
    assert cli_main(["analyze", str(stopped_run), "--dataset", "mnist", "--data-dir", str(DATA), "--out",
                     str(tmp_path / "report"), "--images", "4", "--show", "2"]) == 0
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert "best checkpoint" in json.dumps(summary)
    assert (tmp_path / "report" / "index.html").is_file()
    assert cli_main(["analyze", str(stopped_run / "checkpoints" / "best.pt"), "--dataset", "mnist", "--data-dir",
                     str(DATA), "--out", str(tmp_path / "pt"), "--images", "4", "--show", "2"]) == 0
    assert cli_main(["analyze", "vit_mnist_patch4_28", "--dataset", "mnist", "--data-dir", str(DATA),
                     "--out", str(tmp_path / "bare")]) == 2
    assert "--random-init" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["run", "best.pt"])
def test_fewshot_on_the_run_and_best_pt(stopped_run: Path, which: str, tmp_path: Path, capsys):
    source = stopped_run if which == "run" else stopped_run / "checkpoints" / which
    assert cli_main(["fewshot", str(source), "--dataset", "mnist", "--data-dir", str(DATA), "--shots", "2",
                     "--seeds", "1", "--max-train", "200", "--max-test", "200", "--json",
                     str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert "best checkpoint" in result["loaded"]
    assert "best checkpoint" in capsys.readouterr().err


def test_finetune_from_the_stopped_run(stopped_run: Path, tmp_path: Path, capsys):
    assert cli_main(["finetune", "--init", str(stopped_run / "checkpoints" / "last.pt"), "--dataset", "mnist",
                     "--data_dir", str(DATA), "--print-config"]) == 0
    printed = capsys.readouterr()
    assert "vit_mnist_patch4_28" in printed.out and "0.1307" in printed.out  # its name and its normalisation
    assert "last checkpoint" in printed.err
    assert cli_main(["finetune", "--init", str(stopped_run), "--dataset", "mnist", "--data_dir", str(DATA),
                     "--data.samples_per_class", "5", "--batch_size", "25", "--epochs", "1", "--progress", "none",
                     "--out_dir", str(tmp_path), "--run_name", "ft", "--data.crop_padding", "2"]) == 0
    finetuned = vitkit.load_model(tmp_path / "ft" / "model")
    best = _state(stopped_run, "best.pt")["ema"]["module"]
    assert finetuned.config.embed_dim == 32 and finetuned.config.extra["finetuned_from"] == str(stopped_run)
    assert not torch.equal(finetuned.blocks[0].attn.qkv.weight, best["blocks.0.attn.qkv.weight"])  # it trained
    assert "best checkpoint" in capsys.readouterr().err


def test_convert_the_run_and_best_pt(stopped_run: Path, tmp_path: Path, capsys):
    best = _state(stopped_run, "best.pt")["ema"]["module"]
    assert cli_main(["convert", str(stopped_run), str(tmp_path / "vk")]) == 0
    assert "best checkpoint" in capsys.readouterr().out
    _assert_weights(vitkit.load_model(tmp_path / "vk"), best)
    # before: "pass num_heads= (CLI: --num-heads)", then "unexpected keys" with it
    assert cli_main(["convert", str(stopped_run / "checkpoints" / "best.pt"), str(tmp_path / "t.safetensors"),
                     "--to", "timm"]) == 0
    timm_weights = load_file(str(tmp_path / "t.safetensors"))
    assert torch.equal(timm_weights["patch_embed.proj.weight"], best["patch_embed.proj.weight"])
    assert cli_main(["convert", str(stopped_run), str(tmp_path / "last"), "--checkpoint", "last"]) == 0
    _assert_weights(vitkit.load_model(tmp_path / "last"), _state(stopped_run, "last.pt")["ema"]["module"])


def test_bench_a_run(stopped_run: Path, tmp_path: Path, capsys):
    assert cli_main(["bench", str(stopped_run), "--batch-size", "2", "--modes", "infer", "--warmup", "0",
                     "--repeats", "1", "--no-reference", "--threads", "1", "--matmul-size", "64", "--out",
                     str(tmp_path / "b.json")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["model"]["params"] == sum(v.numel() for v in _state(stopped_run, "best.pt")["model"].values())
    assert "best checkpoint" in capsys.readouterr().err


def test_export_any_state_of_an_unfinished_run(stopped_run: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(stopped_run, run)
    assert cli_main(["export", str(run)]) == 0
    assert "best checkpoint" in capsys.readouterr().out
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    exported = run / "export-best"
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((exported / "config.json").read_text())
    assert config["extra"]["training"] == {"run": str(run), "state": "best", "epochs_done": best["epoch"],
                                           "global_step": best["global_step"],
                                           "best_val_acc": pytest.approx(best["best_score"]), "ema": True}
    _assert_weights(vitkit.load_model(exported), best["ema"]["module"])

    step_file = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    assert cli_main(["export", str(run), "--checkpoint", step_file.stem, "--out", str(tmp_path / "s")]) == 0
    _assert_weights(vitkit.load_model(tmp_path / "s"), load_checkpoint(step_file)["ema"]["module"])
    assert cli_main(["export", str(run), "--checkpoint", "last"]) == 0
    assert (run / "export-last" / "model.safetensors").is_file()
    assert cli_main(["export", str(run), "--checkpoint", "step-999999"]) == 2
    assert "it has: best, last" in capsys.readouterr().err


# --------------------------------------------------------------------------------- the hub hook
def test_a_source_hook_maps_a_name_to_a_local_checkpoint(stopped_run: Path, tmp_path: Path):
    vitkit.load_model(stopped_run).save_pretrained(tmp_path / "cache" / "tiny")
    seen = []

    def hub(spec: str):
        seen.append(spec)
        return tmp_path / "cache" / "tiny" if spec == "hf-hub:someone/tiny" else None

    unregister_source_hook("hub")  # vitkit.hub's own hook would claim these names first (tests/test_hub.py tests it)
    register_source_hook("test-hub", hub)
    try:
        resolved = load_source("hf-hub:someone/tiny")
        assert resolved.source.origin == "hf-hub:someone/tiny" and resolved.source.kind == "vitkit"
        assert resolved.description.startswith("hf-hub:someone/tiny -> ")
        _assert_weights(resolved.model, _state(stopped_run, "best.pt")["ema"]["module"])
        with pytest.raises(ValueError, match="someone/else: no such file or directory"):
            load_source("someone/else")
        with pytest.raises(ValueError, match="neither a file or directory nor a model name.*did you mean"):
            load_source("vit_tiny_patch4_23")
        assert seen == ["hf-hub:someone/tiny", "someone/else", "vit_tiny_patch4_23"]
        register_source_hook("test-hub", lambda s: ModelSource(s, "registry") if s == "vit_tiny_patch4_32" else None)
        assert load_source("vit_tiny_patch4_32").model.config.embed_dim == 192  # a hook may claim a bare name

        def build(**options):  # a hook that builds its model itself, e.g. to add the publisher's class names
            net = vitkit.load_model(tmp_path / "cache" / "tiny", **options)
            net.config = net.config.replace(class_names=[f"digit {i}" for i in range(10)])
            return net

        register_source_hook("test-hub", lambda s: ModelSource(s, "pretrained", tmp_path / "cache" / "tiny",
                                                               origin=s, build=build) if s == "tiny.mnist" else None)
        built = load_source("tiny.mnist", img_size=56)
        assert built.model.config.class_names[3] == "digit 3" and built.model.pos_embed.shape == (1, 65, 32)
        assert built.description.startswith("tiny.mnist: pretrained weights (")
        assert vitkit.resolver.source_config("tiny.mnist").class_names[0] == "digit 0"
    finally:
        unregister_source_hook("test-hub")
        register_source_hook("hub", hub_source)
    with pytest.raises(ValueError, match="registered architecture, not trained weights.*--random-init"):
        load_source("vit_tiny_patch4_32")


# ------------------------------------------------------------------------------------- errors
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_an_unsafe_pickle_is_refused_as_unsafe_not_corrupt(tmp_path: Path, command: str, capsys):
    """Issue 16, item 11: it was "truncated or corrupt", relayed torch's weights_only=False advice and listed
    unrelated .pt files of the folder as "other checkpoints of this run"."""
    marker = tmp_path / "marker"
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Payload(marker)}, downloads / "evil.pt")
    torch.save({"w": torch.zeros(1)}, downloads / "unrelated.pt")
    args = [command, str(downloads / "evil.pt")] + (["img.png"] if command == "predict" else [])
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "evil.pt: refused for safety" in err and "pickle data that imports code (posix.system)" in err
    assert "safetensors" in err  # how to convert a trusted file
    for wrong in ("weights_only", "truncated", "corrupt", "other checkpoints", "unrelated.pt", "Traceback"):
        assert wrong not in err, wrong
    assert not marker.exists()


def test_a_damaged_run_checkpoint_lists_only_that_runs_checkpoints(stopped_run: Path, tmp_path: Path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    (run / "checkpoints" / "notes.pt").write_bytes(b"not a checkpoint")  # not one of the run's states
    last = run / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.unlink()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"last\.pt: truncated or corrupt.*other checkpoints of this run") as e:
        vitkit.load_model(run, checkpoint="last")
    assert "best.pt" in str(e.value) and "notes.pt" not in str(e.value)
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "a.pt").write_bytes(data[: len(data) // 2])
    shutil.copy(run / "checkpoints" / "best.pt", lone / "b.pt")
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        vitkit.load_model(lone / "a.pt")
    assert "other checkpoints" not in str(e.value)


def test_a_named_model_that_does_not_fit_lists_the_differing_fields(tmp_path: Path):
    """Issue 16, item 12: this said "embed_dim 128 is not divisible by num_heads 12"."""
    model = vitkit.create_model("vit_mini_patch4_32")  # D 128, depth 6, 2 heads
    model.save_pretrained(tmp_path / "mini")
    vitkit.convert.export.save_state_dict_file(vitkit.convert.to_timm(model), tmp_path / "mini.safetensors")
    for source in (tmp_path / "mini", tmp_path / "mini.safetensors"):
        with pytest.raises(CheckpointError) as e:
            vitkit.from_pretrained(source, model="vit_base_patch16_224")
        message = str(e.value)
        assert "does not fit vit_base_patch16_224" in message and "divisible" not in message
        for difference in ("embed_dim: checkpoint 128, model 768", "depth: checkpoint 6, model 12",
                           "patch_size: checkpoint 4, model 16", "mlp_dim: checkpoint 256, model 3072"):
            assert difference in message
    with pytest.raises(CheckpointError, match="num_heads: checkpoint 2, model 4"):
        vitkit.from_pretrained(tmp_path / "mini", model=model.config.replace(num_heads=4))
    fits = vitkit.from_pretrained(tmp_path / "mini.safetensors", model="vit_mini_patch4_32")
    _assert_weights(fits, model.state_dict())


def test_random_bytes_are_always_a_checkpoint_error(tmp_path: Path):
    """Garbage fails anywhere inside torch's unpickler (EOFError, IndexError, KeyError, ...): every failure is
    one CheckpointError naming the file (an IndexError escaped before)."""
    from vitkit.checkpoint import torch_load_safely

    rng = np.random.default_rng(0)
    path = tmp_path / "garbage.pt"
    for i in range(200):
        head = b"\x80\x02" if i % 2 else b""  # half of them start like a pickle, to get deeper into the parser
        path.write_bytes(head + rng.integers(0, 256, size=int(rng.integers(1, 600)), dtype=np.uint8).tobytes())
        with pytest.raises(CheckpointError, match="garbage.pt"):
            torch_load_safely(path)


def test_folder_path_in_analyze_and_fewshot_with_a_run(stopped_run: Path, tmp_path: Path):
    """``folder:PATH`` (a class-folder tree) reaches analyze and fewshot through the data layer, with a run
    directory as the model. (``vitkit eval`` of this 1-channel model on a folder set is refused by the data
    layer: folder sets are read as RGB.)"""
    with np.load(DATA / "mnist" / "test.npz") as npz:
        images, labels = npz["images"], npz["labels"]
    root = tmp_path / "digits"
    for split, offset in (("train", 0), ("val", 100)):
        for digit in range(10):
            folder = root / split / str(digit)
            folder.mkdir(parents=True)
            for k, index in enumerate(np.flatnonzero(labels == digit)[offset:offset + 3]):
                path = folder / f"{k}.png"
                Image.fromarray(images[index].squeeze()).save(path)
    dataset = f"folder:{root}"

    assert cli_main(["analyze", str(stopped_run), "--dataset", dataset, "--out", str(tmp_path / "report"),
                     "--images", "4", "--show", "2"]) == 0
    assert str(root) in json.loads((tmp_path / "report" / "summary.json").read_text())["data_source"]
    assert cli_main(["fewshot", str(stopped_run), "--dataset", dataset, "--shots", "1", "--seeds", "1", "--json",
                     str(tmp_path / "fs.json")]) == 0
    assert json.loads((tmp_path / "fs.json").read_text())["source"] == str(stopped_run)


def test_a_saved_model_folder_in_the_working_directory_does_not_make_it_a_run(tmp_path: Path, monkeypatch, capsys):
    """Before: ``model/config.json`` in the working directory made ``.`` a run ("loaded: .: exported final model").
    A run is told by what only runs have: a training checkpoint, or a config.yaml with a training config."""
    from vitkit.runfiles import is_run_dir

    vitkit.create_model("vit_mini_patch4_32", depth=1, num_classes=3).save_pretrained(tmp_path / "model")
    (tmp_path / "checkpoints").mkdir()  # an empty folder of that name, and another tool's config.yaml
    (tmp_path / "config.yaml").write_text("learning_rate: 0.1\nbatch: 8\n")
    monkeypatch.chdir(tmp_path)
    assert not is_run_dir(".")
    with pytest.raises(CheckpointError, match="not a model"):
        resolve_source(".")
    source = resolve_source("model")
    assert (source.kind, source.run_dir) == ("vitkit", None)
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    assert cli_main(["predict", "model", str(image), "--top-k", "1"]) == 0
    assert "loaded: model: vitkit model directory" in capsys.readouterr().err
    # what a run has: a training config's sections (before its first checkpoint), or a training checkpoint
    (tmp_path / "config.yaml").write_text("model: {name: vit_mini_patch4_32}\ndata: {dataset: cifar10}\noptim: {}\n")
    assert is_run_dir(".")


def test_a_run_is_still_recognised_by_its_checkpoints_alone(stopped_run: Path, tmp_path: Path):
    from vitkit.runfiles import is_run_dir

    copy = tmp_path / "copy"
    (copy / "checkpoints").mkdir(parents=True)
    (copy / "checkpoints" / "last.pt").symlink_to(stopped_run / "checkpoints" / "last.pt")
    assert is_run_dir(copy) and is_run_dir(stopped_run)
    assert resolve_source(copy).state == "last"
