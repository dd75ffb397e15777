"""What happens when things go wrong (docs/failures.md): signals to the whole process group, damaged and
partial checkpoint files, vanished or unwritable run directories, class folders under other names, stops
during the final evaluation, and a step that would not fit in memory. Tiny models, a few steps each.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import vitkit
from vitkit.cli import main as cli_main
from vitkit.train import TrainingInterrupted, load_config, resume, train
from vitkit.train.checkpoints import load_checkpoint
from vitkit.train.evaluate import evaluate_trained
from vitkit.train.monitor import read_metrics

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VITKIT_DATA", REPO.parent / "shared" / "data"))
IMAGENETTE = DATA / "imagenette_subset"

TINY_MODEL = ["--model", "vit_mnist_patch4_28", "--model.patch_size", "7", "--model.embed_dim", "32",
              "--model.depth", "2", "--model.num_heads", "2", "--model.mlp_dim", "64"]
TINY_MNIST = TINY_MODEL + ["--dataset", "mnist", "--data_dir", str(DATA), "--progress", "plain", "--log_every", "1",
                           "--data.hflip", "false", "--eval_hflip_tta", "false",
                           "--eval_translate_tta", "false", "--warmup_epochs", "0.5"]
# 32 px RGB crops of the real Imagenette JPEGs, decoded by DataLoader workers.
TINY_FOLDER = ["--model", "vit_mnist_patch4_28", "--model.patch_size", "8", "--model.embed_dim", "32",
               "--model.depth", "2", "--model.num_heads", "2", "--model.mlp_dim", "64", "--model.in_chans", "3",
               "--dataset", f"folder:{IMAGENETTE}", "--data.img_size", "32", "--progress", "plain",
               "--log_every", "1", "--eval_hflip_tta", "false", "--eval_translate_tta", "false"]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "VITKIT_MEMORY_LIMIT"):
        env.pop(name, None)
    return env


def _train_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"kind": "train"' in line)


def _start(args: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vitkit", "train", *args], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **popen)


def _wait_for_steps(proc: subprocess.Popen, run_dir: Path, steps: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and _train_steps(run_dir) < steps:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before step {steps}: {proc.stderr.read()}"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this module runs torch on one thread (see conftest)."""


def _cfg(tmp_path: Path, *extra: str):
    return load_config(None, [*TINY_MNIST, "--data.samples_per_class", "10", "--batch_size", "20", "--epochs", "1",
                              "--out_dir", str(tmp_path), "--progress", "none", *extra])


# ------------------------------------------------------------------ 5: SIGTERM to the process group
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_whole_process_group_saves_and_exits_like_a_signal_to_the_main_process(tmp_path, sig):
    """What docker stop, Kubernetes, Slurm and timeout do: the signal reaches the DataLoader workers too. They
    must leave it to the main process, which saves last.pt and exits 128 + signal."""
    run = tmp_path / "group"
    proc = _start([*TINY_FOLDER, "--samples_per_class", "20", "--batch_size", "4", "--data.num_workers", "2",
                   "--epochs", "50", "--ckpt_every_steps", "1000", "--out_dir", str(tmp_path), "--run_name", "group"],
                  start_new_session=True)
    try:
        _wait_for_steps(proc, run, 3)
        os.killpg(proc.pid, sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + sig, stderr
    assert f"stopped by {signal.Signals(sig).name}" in stderr and "Traceback" not in stderr, stderr
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["global_step"] >= 3
    assert state["global_step"] == max(r["step"] for r in read_metrics(run) if r["kind"] == "train")


# ---------------------------------------------------------- 7, 8: checkpoint files and partial writes
@pytest.mark.slow
def test_checkpoint_names_are_independent_files_so_one_damaged_file_spares_the_others(tmp_path):
    run = train(_cfg(tmp_path, "--epochs", "2", "--ckpt_every_steps", "3", "--keep_last_k", "2")).run_dir
    ckpt = run / "checkpoints"
    last, best, newest = ckpt / "last.pt", ckpt / "best.pt", max(ckpt.glob("step-*.pt"))
    assert load_checkpoint(last)["global_step"] == load_checkpoint(newest)["global_step"]
    for path in (last, best, newest):
        assert path.stat().st_nlink == 1, f"{path.name} shares its data with another name"
    with open(last, "r+b") as f:  # damage last.pt in place, as a failing disk or a careless tool would
        f.truncate(100)
    with pytest.raises(vitkit.checkpoint.CheckpointError):
        load_checkpoint(last)
    assert load_checkpoint(best)["global_step"] > 0
    assert load_checkpoint(newest)["global_step"] == 10  # 2 epochs x 5 steps


def test_resume_removes_partial_files_of_a_write_killed_midway(tmp_path, capsys):
    run = train(_cfg(tmp_path, "--ckpt_every_steps", "2", "--progress", "plain")).run_dir
    # What a kill -9 inside atomic_path leaves: a half-written temporary next to its target.
    leftovers = []
    for directory, name in ((run / "checkpoints", "last.pt"), (run / "checkpoints", "step-00000004.pt"),
                            (run, "metrics.jsonl"), (run / "model", "model.safetensors")):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        os.write(fd, b"\x80\x02half a checkpoint")
        os.close(fd)
        leftovers.append(Path(tmp))
    resume(run, ["--epochs", "2"])
    assert not [p for p in leftovers if p.exists()]
    assert f"removed {len(leftovers)} partial file(s) of an interrupted write" in capsys.readouterr().out
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2


# --------------------------------------------------------------------- 9: the run directory itself
@pytest.mark.slow
def test_run_directory_deleted_mid_run_is_one_line_without_a_tensorboard_traceback(tmp_path):
    import shutil

    run = tmp_path / "gone"
    proc = _start([*TINY_MNIST, "--samples_per_class", "50", "--batch_size", "10", "--epochs", "50",
                   "--ckpt_every_steps", "5", "--out_dir", str(tmp_path), "--run_name", "gone"])
    try:
        _wait_for_steps(proc, run, 2)
        for _ in range(50):  # the run may write a checkpoint into the directory while it is being removed
            shutil.rmtree(run, ignore_errors=True)
            if not run.exists():
                break
        assert not run.exists(), "could not delete the run directory under the test"
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr
    assert stderr.strip() == (f"vitkit train: error: the run directory {run} was deleted or moved during the run; "
                              "training stopped, as nothing more could be saved"), stderr
    assert not run.exists()  # not silently re-created by the next checkpoint write


def test_file_valued_or_unwritable_out_dir_is_one_line(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("")
    args = ["train", "--config", "smoke", "--data_dir", str(DATA), "--progress", "none"]
    assert cli_main([*args, "--out_dir", str(afile)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot create the run directory {afile}/" in err and "Not a directory" in err

    # read-only: what mkdir raises there (root ignores permission bits, so the error is injected)
    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert cli_main([*args, "--out_dir", str(tmp_path / "ro"), "--run_name", "r"]) == 1
    err = capsys.readouterr().err
    assert err == (f"vitkit train: error: cannot create the run directory {tmp_path / 'ro' / 'r'} (Permission denied: "
                   f"{tmp_path / 'ro' / 'r'}); choose a writable --out_dir\n")


@pytest.mark.slow
def test_disk_error_mid_run_is_one_line_and_the_resumed_metrics_are_complete(tmp_path, capsys, monkeypatch):
    from vitkit.train import checkpoints

    args = [*TINY_MNIST, "--data.samples_per_class", "10", "--batch_size", "20", "--epochs", "2",
            "--ckpt_every_steps", "2", "--deterministic", "true", "--progress", "none", "--out_dir", str(tmp_path)]
    assert cli_main(["train", *args, "--run_name", "straight"]) == 0

    save, calls = checkpoints.atomic_torch_save, []

    def full_disk(obj, path):
        calls.append(path)
        if len(calls) == 3:  # the checkpoint at step 5 (end of epoch 1)
            raise OSError(28, "No space left on device", str(path))
        save(obj, path)

    monkeypatch.setattr(checkpoints, "atomic_torch_save", full_disk)
    assert cli_main(["train", *args, "--run_name", "full"]) == 1
    err = capsys.readouterr().err
    assert err == f"vitkit train: error: No space left on device: {tmp_path / 'full' / 'checkpoints' / 'last.pt'}\n"
    monkeypatch.setattr(checkpoints, "atomic_torch_save", save)
    assert cli_main(["train", "--resume", str(tmp_path / "full")]) == 0
    timing = ("img_per_s", "epoch_time", "epoch_cpu_time")

    def clean(records: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in timing} for r in records]

    assert clean(read_metrics(tmp_path / "full")) == clean(read_metrics(tmp_path / "straight"))


# ------------------------------------------------------------------------------- 13: smaller ones
def test_sigterm_during_the_final_evaluation_is_not_a_silent_success(tmp_path, monkeypatch):
    from vitkit.train import task

    evaluate = task.evaluate

    def evaluate_then_terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the evaluation runs
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(task, "evaluate", evaluate_then_terminated)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM after epoch 1") as info:
        train(_cfg(tmp_path, "--run_name", "final"))
    assert info.value.signum == signal.SIGTERM
    run = tmp_path / "final"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1  # the evaluated epoch is saved
    assert not (run / "model").exists()
    monkeypatch.setattr(task, "evaluate", evaluate)
    resume(run)  # finishes: exports the model without training again
    assert (run / "model" / "model.safetensors").is_file()
    assert [r["epoch"] for r in read_metrics(run) if r["kind"] == "epoch"] == [1]


def test_a_second_ctrl_c_stops_at_once_with_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    from vitkit.train import task

    build = task.build_run_model

    def build_impatient(cfg, data):  # the user presses Ctrl-C twice during a training forward
        model = build(cfg, data)
        forward, calls = model.forward, []

        def impatient(x):
            calls.append(len(x))
            if len(calls) == 4:  # after the memory estimate's two probes, the 2nd training step
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            return forward(x)
        model.forward = impatient
        return model

    monkeypatch.setattr(task, "build_run_model", build_impatient)
    code = cli_main(["train", *TINY_MNIST, "--data.samples_per_class", "10", "--batch_size", "20", "--epochs", "1",
                     "--progress", "none", "--out_dir", str(tmp_path)])
    assert code == 130
    assert capsys.readouterr().err == ("vitkit train: interrupted at once by a second Ctrl-C; nothing was saved "
                                       "after the last checkpoint\n")


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_predict_rejects_a_top_k_below_one(value, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["predict", "some/model", "img.png", "--top-k", value])
    assert info.value.code == 2
    assert "argument --top-k:" in capsys.readouterr().err


# Each exit code of docs/failures.md's table, and the tests that reach it through a real run (a real
# training, download or evaluation: no mocked command), with the code they assert.
EXIT_CODE_TESTS = {
    0: ["test_train.py::test_eval_reports_top1_top5_per_class_and_confusion"],
    1: ["test_faults.py::test_file_valued_or_unwritable_out_dir_is_one_line",
        "test_faults.py::test_run_directory_deleted_mid_run_is_one_line_without_a_tensorboard_traceback",
        "test_faults.py::test_disk_error_mid_run_is_one_line_and_the_resumed_metrics_are_complete",
        "test_data_road.py::test_an_image_that_fails_at_first_read_saves_the_finished_steps_then_stops_with_one_line",
        "test_cli.py::test_a_failed_download_exits_1_fast_leaves_nothing_behind_and_predict_agrees"],
    2: ["test_faults.py::test_a_step_that_does_not_fit_fails_before_training_with_the_numbers_and_a_split_that_fits",
        "test_faults.py::test_eval_matches_class_folders_to_the_model_by_name_not_by_sorted_position"],
    3: ["test_train.py::test_cli_exit_code_of_a_diverged_run"],
    4: ["test_deploy.py::test_a_disagreeing_export_is_not_written_and_exits_4"],
    130: ["test_faults.py::test_a_second_ctrl_c_stops_at_once_with_one_line_and_exit_130",
          "test_faults.py::test_signal_to_the_whole_process_group_saves_and_exits_like_a_signal_to_the_main_process"],
    143: ["test_train.py::test_sigterm_saves_last_and_exits_cleanly",
          "test_faults.py::test_signal_to_the_whole_process_group_saves_and_exits_like_a_signal_to_the_main_process"],
    137: ["test_train.py::test_sigkill_at_a_random_step_then_resume_gives_identical_weights"],
}


def _exit_code_table(page: str) -> dict[int, str]:
    rows = re.findall(r"^\| `(\d+)` \| (.*?) \|", page, flags=re.MULTILINE)
    return {int(code): meaning for code, meaning in rows}


def _asserted_codes(source: str) -> set[int]:
    """Exit codes a test's source compares with: ``== 2``, ``returncode == 128 + sig``, ``-signal.SIGKILL``."""
    codes = {int(c) for c in re.findall(r"==\s*(\d+)\b", source)}
    if "== 128 + sig," in source:  # parametrized over SIGTERM and SIGINT
        codes |= {128 + signal.SIGTERM, 128 + signal.SIGINT}
    if "== 128 + signal.SIGTERM" in source:
        codes.add(128 + signal.SIGTERM)
    if "== -signal.SIGKILL" in source:  # what a shell reports as 128 + 9
        codes.add(128 + signal.SIGKILL)
    return codes


def test_every_exit_code_in_the_docs_is_reached_by_a_real_run_and_the_readme_links_them():
    """Before: the table's codes were checked for presence as strings. Now the table is parsed, every code in it
    has tests, each named test exists, asserts that code, and does not replace the command it runs."""
    page = (REPO / "docs" / "failures.md").read_text()
    table = _exit_code_table(page)
    assert set(table) == set(EXIT_CODE_TESTS), f"documented {sorted(table)}, tested {sorted(EXIT_CODE_TESTS)}"
    for code, names in EXIT_CODE_TESTS.items():
        assert table[code].strip() or code == 0
        for name in names:
            file, function = name.split("::")
            tree = ast.parse((REPO / "tests" / file).read_text())
            found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function]
            assert found, f"{name} does not exist"
            source = ast.get_source_segment((REPO / "tests" / file).read_text(), found[0])
            assert code in _asserted_codes(source), f"{name} does not assert exit code {code}"
            for command in ("vitkit.cli.train", "cli.train", "vitkit.cli.main"):
                assert f'setattr("{command}"' not in source, f"{name} mocks {command}"
    for topic in ("kill -9", "SIGTERM", "process group", "diverge", "corrupt", "unwritable", "--allow-class-mismatch",
                  "VITKIT_MEMORY_LIMIT"):
        assert topic in page, topic
    assert "(docs/failures.md)" in (REPO / "README.md").read_text()


# ------------------------------------------------------------- 2: eval matches class folders by name
def _class_folders(root: Path, names: dict[str, str], per_class: int = 6) -> Path:
    """``root/{train,val}/<names[wnid]>/`` with links to the first images of each real Imagenette class."""
    for split, count in (("train", 1), ("val", per_class)):
        for wnid, name in names.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for image in sorted((IMAGENETTE / split / wnid).iterdir())[:count]:
                (folder / image.name).symlink_to(image)
    return root


def test_eval_matches_class_folders_to_the_model_by_name_not_by_sorted_position(tmp_path, capsys):
    meta = json.loads((IMAGENETTE / "meta.json").read_text())
    wnids, words = meta["wnids"], meta["classes"]
    assert sorted(words) != words  # folders named by word sort into another order than the model's classes
    torch.manual_seed(0)
    for names, directory in ((wnids, "model"), (words, "model_by_word")):  # the same weights, two vocabularies
        model = vitkit.create_model("vit_mnist_patch4_28", patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                    mlp_dim=64, in_chans=3, img_size=32, num_classes=10, class_names=names)
        if names is wnids:
            weights = model.state_dict()
        model.load_state_dict(weights)
        model.save_pretrained(tmp_path / directory)

    by_id = _class_folders(tmp_path / "by_id", dict(zip(wnids, wnids)))  # sorted position == model index
    by_word = _class_folders(tmp_path / "by_word", dict(zip(wnids, words)))
    truth = evaluate_trained(tmp_path / "model", dataset=f"folder:{by_id}", out_dir=tmp_path / "e1", device="cpu")
    named = evaluate_trained(tmp_path / "model_by_word", dataset=f"folder:{by_word}", out_dir=tmp_path / "e2",
                             device="cpu")
    assert named.class_names == words
    assert torch.equal(named.result.confusion, truth.result.confusion)
    assert named.result.top1 == truth.result.top1
    assert named.result.loss == pytest.approx(truth.result.loss, rel=1e-6)  # summed in another image order
    per_class = json.loads((tmp_path / "e2" / "eval.json").read_text())["per_class_accuracy"]
    assert list(per_class.values()) == list(truth.to_dict()["per_class_accuracy"].values())

    # the WordNet-id model on the word folders: no name in common, so an error naming them
    assert cli_main(["eval", str(tmp_path / "model"), "--dataset", f"folder:{by_word}", "--device", "cpu",
                     "--out", str(tmp_path / "e3")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'English springer', 'French horn'" in err
    assert "and the data set has no 'n01440764', 'n02102040'" in err and "--allow-class-mismatch" in err
    assert not (tmp_path / "e3").exists()

    # a subset of the model's classes is matched by name too
    subset = _class_folders(tmp_path / "subset", {w: w for w, n in zip(wnids, words) if n in ("church", "tench")})
    part = evaluate_trained(tmp_path / "model", dataset=f"folder:{subset}", out_dir=tmp_path / "sub", device="cpu")
    church, tench = wnids[words.index("church")], wnids[words.index("tench")]
    full = truth.result.confusion
    keep = [wnids.index(church), wnids.index(tench)]
    assert torch.equal(part.result.confusion[keep], full[keep])
    assert part.result.confusion.sum() == 12

    # names the model does not know: an error naming them, through the CLI
    odd = _class_folders(tmp_path / "odd", {**dict(zip(wnids, wnids)), wnids[0]: "fish"})
    assert cli_main(["eval", str(tmp_path / "model"), "--dataset", f"folder:{odd}", "--device", "cpu",
                     "--out", str(tmp_path / "odd_eval")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"'fish' is not among the model's classes, and the data set has no '{wnids[0]}'" in err
    assert "--allow-class-mismatch" in err
    # ... unless the user says the classes pair by position
    assert cli_main(["eval", str(tmp_path / "model"), "--dataset", f"folder:{odd}", "--device", "cpu",
                     "--out", str(tmp_path / "odd_eval"), "--allow-class-mismatch"]) == 0
    saved = json.loads((tmp_path / "odd_eval" / "eval.json").read_text())
    assert saved["num_samples"] == 60


# ------------------------------------------------------------- 14: a step too large for the memory
def test_saved_activations_of_a_known_network_are_counted_exactly():
    from vitkit.train.memory import estimate_step_memory

    net = nn.Sequential(nn.Linear(10, 1000), nn.ReLU(), nn.Linear(1000, 10))
    weights = (10 * 1000 + 1000 + 1000 * 10 + 10) * 4
    for optimizer, state in ((torch.optim.AdamW(net.parameters()), 2 * weights),
                             (torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), weights),
                             (torch.optim.SGD(net.parameters(), lr=0.1), 0)):
        estimate = estimate_step_memory(net, optimizer, (10,), device=torch.device("cpu"),
                                        loss_fn=lambda model, x: model(x).sum())
        # per image: the first layer keeps its 10 inputs, the ReLU its 1000 outputs (which the second layer's
        # weight gradient reads too), float32; weights are not counted again
        assert estimate.per_image == (10 + 1000) * 4
        assert estimate.batch_independent == 0
        assert estimate.gradients == weights and estimate.optimizer_state == state
        assert estimate.total(64) == 64 * 4040 + weights + state


def test_the_memory_probe_leaves_weights_buffers_gradients_and_random_streams_as_they_were():
    from vitkit.train.memory import estimate_step_memory

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(4))
    net(torch.randn(2, 3, 8, 8))
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    estimate_step_memory(net, torch.optim.SGD(net.parameters(), lr=0.1), (3, 8, 8), device=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters()) and not net.training


def test_a_step_that_does_not_fit_fails_before_training_with_the_numbers_and_a_split_that_fits(
        tmp_path, capsys, monkeypatch):
    from vitkit.data import build_data
    from vitkit.train.memory import estimate_step_memory
    from vitkit.train.optim import build_optimizer
    from vitkit.train.rundir import build_run_model

    args = [*TINY_MNIST, "--data.samples_per_class", "10", "--batch_size", "20", "--epochs", "1", "--progress",
            "plain", "--out_dir", str(tmp_path)]
    cfg = load_config(None, args)
    data = build_data(cfg.data, device="cpu", seed=cfg.seed)
    model = build_run_model(cfg, data)
    estimate = estimate_step_memory(model, build_optimizer(model, cfg.optim), (1, 28, 28),
                                    device=torch.device("cpu"))
    assert estimate.per_image > 10_000  # a 2-block ViT on 16 tokens keeps tens of kB per image
    limit = estimate.total(10)  # half the batch fits, the whole one does not
    monkeypatch.setenv("VITKIT_MEMORY_LIMIT", str(limit))
    assert cli_main(["train", *args, "--run_name", "big"]) == 2
    _out, err = capsys.readouterr()
    assert err == (f"vitkit train: error: a training step needs about {estimate.total(20) / 1024**3:.2f} GiB "
                   f"(batch 20 x {estimate.per_image / 1024**2:.2f} MiB of activations per image + "
                   f"{estimate.fixed / 1024**3:.2f} GiB of gradients and optimizer state) but "
                   f"{limit / 1024**3:.2f} GiB is available (VITKIT_MEMORY_LIMIT={limit}); for the same global "
                   f"batch use --batch_size 10 --accum_steps 2 (about {limit / 1024**3:.2f} GiB), or set "
                   "VITKIT_MEMORY_LIMIT (a size, or 'off' to skip this check)\n")
    assert not (tmp_path / "big").exists()  # failed before the run started
    # the way out it names runs, with the same global batch
    assert cli_main(["train", *args, "--run_name", "split", "--batch_size", "10", "--accum_steps", "2"]) == 0
    assert "global batch 20" in capsys.readouterr().out
    monkeypatch.setenv("VITKIT_MEMORY_LIMIT", "1")
    assert cli_main(["train", *args, "--run_name", "tiny"]) == 2
    assert "even one image per step does not fit" in capsys.readouterr().err
    monkeypatch.setenv("VITKIT_MEMORY_LIMIT", "lots")
    assert cli_main(["train", *args, "--run_name", "typo"]) == 2
    assert "VITKIT_MEMORY_LIMIT='lots': expected a size" in capsys.readouterr().err


def test_ctrl_c_outside_a_training_loop_is_one_line_and_exit_130(monkeypatch, capsys):
    import vitkit.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_models", interrupted)
    assert cli_main(["models"]) == 130
    assert capsys.readouterr().err == "vitkit models: interrupted by Ctrl-C\n"
