"""Scale (issue 24): activation checkpointing per block, FSDP2 with sharded checkpoints (Distributed Checkpoint)
that resume on another number of processes, and exports of them. Multi-process runs use gloo on the CPU
under ``torchrun``, a 2-block 32-wide ViT on 160 MNIST images, one thread per process.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitkit import create_model
from vitkit.cli import main as cli_main
from vitkit.train.grad_checkpointing import enable_grad_checkpointing, transformer_blocks
from vitkit.train.memory import estimate_step_memory
from vitkit.train.monitor import read_metrics

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VITKIT_DATA", REPO.parent / "shared" / "data"))

# No dropout or drop-path and no flips: every random choice is a function of (seed, epoch, step, position),
# so the same global batch gives the same step on any number of processes.
TINY = ["--config", "mnist_vit", "--model.embed_dim", "32", "--model.depth", "2", "--model.num_heads", "2",
        "--model.mlp_dim", "64", "--model.drop_path_rate", "0", "--data.samples_per_class", "16", "--data_dir",
        str(DATA), "--eval_batch_size", "500", "--device", "cpu", "--epochs", "2", "--progress", "none",
        "--log_every", "1", "--ckpt_every_steps", "5", "--keep_last_k", "10", "--optim.warmup_epochs", "0",
        "--data.hflip", "false", "--eval_hflip_tta", "false",
        "--eval_translate_tta", "false", "--distributed.strategy", "fsdp"]
GLOBAL_BATCH = 16  # 160 images: 10 steps per epoch, 20 in all


def _grads(model, images):
    model.zero_grad()
    out = model(images)
    (out[0] if isinstance(out, tuple) else out).float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name, shape, extra, saving", [
    ("vit_cifar_patch4_32", (3, 32, 32), dict(embed_dim=32, depth=4, num_heads=2, mlp_dim=64, drop_rate=0.1), 0.5),
    # most of a small T2T's activations are its token-to-token stage's unfolds, outside the blocks
    ("t2t_vit_7", (3, 32, 32), dict(img_size=32, embed_dim=32, depth=2, num_heads=2), 0.9),
    ("mae_vit_mini_patch4_32", (3, 32, 32), dict(embed_dim=32, depth=2, num_heads=2, mlp_dim=64), 0.8),
])
def test_grad_checkpointing_gives_the_same_gradients_keeps_the_names_and_is_estimated_smaller(name, shape, extra,
                                                                                              saving):
    torch.manual_seed(0)
    model = create_model(name, **extra)
    images = torch.randn(4, *shape)
    names = list(model.state_dict())
    estimate = lambda ckpt: estimate_step_memory(model, torch.optim.AdamW(model.parameters()), shape,  # noqa: E731
                                                 device=torch.device("cpu"), grad_checkpointing=ckpt,
                                                 loss_fn=lambda m, x: _first(m(x)).float().mean())
    plain, checkpointed = estimate(False), estimate(True)
    torch.manual_seed(1)
    reference = _grads(model, images)
    blocks = enable_grad_checkpointing(model)
    assert blocks == len(transformer_blocks(model)) >= 2
    torch.manual_seed(1)  # dropout masks are replayed in the recomputation
    again = _grads(model, images)
    assert list(model.state_dict()) == names  # hooks, not wrappers: checkpoints and PEFT see the same keys
    assert again.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(again[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
    # a checkpointed block keeps its input, not its activations
    assert checkpointed.per_image < saving * plain.per_image, (checkpointed, plain)
    assert checkpointed.gradients == plain.gradients and checkpointed.optimizer_state == plain.optimizer_state


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def test_the_estimate_divides_weights_gradients_and_optimizer_state_over_fsdp_processes():
    model = create_model("vit_cifar_patch4_32", embed_dim=64, depth=4, num_heads=2, mlp_dim=128)
    optimizer = torch.optim.AdamW(model.parameters())
    one = estimate_step_memory(model, optimizer, (3, 32, 32), device=torch.device("cpu"))
    eight = estimate_step_memory(model, optimizer, (3, 32, 32), device=torch.device("cpu"), shards=8)
    weights = sum(p.numel() * 4 for p in model.parameters())
    block = sum(p.numel() * 4 for p in model.blocks[0].parameters())
    assert one.weights == one.gradients == weights and one.optimizer_state == 2 * weights and one.gathered == 0
    assert eight.weights == eight.gradients == -(-weights // 8) and eight.optimizer_state == -(-2 * weights // 8)
    assert eight.gathered == 2 * block and eight.per_image == one.per_image


def test_grad_checkpointing_is_a_model_key_that_trains_and_is_not_exported(tmp_path, capsys):
    args = [*TINY, "--model.grad_checkpointing", "true", "--distributed.strategy", "ddp", "--epochs", "1",
            "--batch_size", "16", "--out_dir", str(tmp_path), "--run_name", "gc"]
    assert cli_main(["train", *args]) == 0
    config = json.loads((tmp_path / "gc" / "model" / "config.json").read_text())
    assert "grad_checkpointing" not in config and config["depth"] == 2
    assert cli_main(["train", *TINY, "--model.grad_checkpointing", "maybe", "--out_dir", str(tmp_path)]) == 2
    assert cli_main(["train", *TINY, "--distributed.cpu_offload", "true", "--out_dir", str(tmp_path)]) == 2
    assert "distributed.cpu_offload moves GPU memory to the CPU; this run is on cpu" in capsys.readouterr().err
    assert cli_main(["train", *TINY, "--ema_decay", "0.99", "--out_dir", str(tmp_path)]) == 2
    assert "ema_decay is not supported with distributed.strategy fsdp" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ FSDP runs
def _launch(nproc: int, args: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    if nproc == 1:
        command = [sys.executable, "-m", "vitkit", "train", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                   "-m", "vitkit", "train", *args]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train"}


def _memory(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if r["kind"] == "memory"]


def _rewind(run: Path, copy: Path, checkpoint: str) -> Path:
    """A copy of ``run`` whose ``last`` checkpoint is ``checkpoint``: a run that stopped there."""
    shutil.copytree(run, copy, symlinks=True)
    for link in ("last.dcp", "best.dcp"):
        (copy / "checkpoints" / link).unlink()
        os.symlink(checkpoint, copy / "checkpoints" / link)
    shutil.rmtree(copy / "model")
    return copy


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """The same 20 steps (global batch 16) under FSDP on 2 processes, with activation checkpointing, and on 1."""
    out = tmp_path_factory.mktemp("fsdp")
    _launch(2, [*TINY, "--batch_size", str(GLOBAL_BATCH // 2), "--model.grad_checkpointing", "true", "--out_dir",
                str(out), "--run_name", "two"])
    _launch(1, [*TINY, "--batch_size", str(GLOBAL_BATCH), "--out_dir", str(out), "--run_name", "one"])
    return out


# Logged losses carry 6 decimals. Two processes reduce the loss and gradients in another order than one
# (mean of two 8-image means vs one 16-image mean): equal to ~1e-7 relative per step, so 2e-6 absolute.
LOSS_TOLERANCE = 2e-6


@pytest.mark.slow
def test_two_fsdp_processes_match_one_process_and_each_holds_about_half(fsdp_runs):
    two, one = _losses(fsdp_runs / "two"), _losses(fsdp_runs / "one")
    assert sorted(two) == sorted(one) == list(range(1, 21))
    worst = max(abs(two[s] - one[s]) for s in one)
    assert worst <= LOSS_TOLERANCE, (worst, two, one)
    (sharded,), (whole,) = _memory(fsdp_runs / "two"), _memory(fsdp_runs / "one")
    total = {k: whole[k][0] for k in ("params", "grads", "optimizer")}
    for key, size in total.items():
        ranks = sharded[key]
        assert sum(ranks) == size, (key, ranks, size)  # the shards partition the model exactly
        assert all(0.35 * size < r < 0.65 * size for r in ranks), (
            f"{key}: per-rank bytes {ranks} of {size} unsharded ({[round(r / size, 3) for r in ranks]})")


@pytest.mark.slow
def test_sharded_checkpoints_resume_on_one_two_and_four_processes(fsdp_runs, tmp_path):
    """Stopped mid-epoch 2 (step 15), resumed on another number of processes with the same global batch: the
    same losses as the run that never stopped (to the logged precision); the gathered weights are the exported
    ones bit for bit."""
    from safetensors.torch import load_file

    from vitkit.runfiles import read_sharded_tensors

    two, one = _losses(fsdp_runs / "two"), _losses(fsdp_runs / "one")
    cases = [("2->1", fsdp_runs / "two", 1, two), ("2->4", fsdp_runs / "two", 4, two),
             ("1->2", fsdp_runs / "one", 2, one)]
    for label, run, nproc, reference in cases:
        copy = _rewind(run, tmp_path / label.replace("->", "to"), "step-00000015.dcp")
        _launch(nproc, ["--resume", str(copy)])
        resumed = _losses(copy)
        assert sorted(resumed) == list(range(1, 21)), label
        worst = max(abs(resumed[s] - reference[s]) for s in range(16, 21))
        assert worst <= LOSS_TOLERANCE, (label, worst)
        memory = _memory(copy)[-1]
        assert memory["step"] == 16 and len(memory["params"]) == nproc, (label, memory)
        assert (copy / "config.yaml").read_text().count(f"batch_size: {GLOBAL_BATCH // nproc}\n") == 1, label
    whole = read_sharded_tensors(fsdp_runs / "two" / "checkpoints" / "last.dcp", "model")
    exported = load_file(fsdp_runs / "two" / "model" / "model.safetensors")
    assert whole.keys() == exported.keys() and all(torch.equal(whole[k], exported[k]) for k in whole)


# ------------------------------------------------------------------------------ sharded checkpoint files
@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    from vitkit.train import load_config, train

    out = tmp_path_factory.mktemp("sharded")
    train(load_config(TINY[1], [*TINY[2:], "--batch_size", "16", "--epochs", "1", "--keep_last_k", "1",
                             "--out_dir", str(out), "--run_name", "run"]))
    return out / "run"


def test_a_sharded_checkpoint_is_a_directory_with_links_and_every_command_reads_it(one_process_run, tmp_path):
    from vitkit import load_model
    from vitkit.runfiles import available_states, load_checkpoint, state_path

    checkpoints = one_process_run / "checkpoints"
    assert os.readlink(checkpoints / "last.dcp") == "step-00000010.1.dcp"  # the epoch end, after step 10's
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.dcp", "last.dcp", "run-id", "step-00000010.1.dcp"]
    assert available_states(one_process_run) == ["best", "last", "step-00000010.1", "model"]
    assert state_path(one_process_run, "step-00000010.1") == state_path(one_process_run, "step-10") == \
        checkpoints / "step-00000010.1.dcp"
    state = load_checkpoint(checkpoints / "last.dcp")
    assert state["global_step"] == 10 and state["world_size"] == 1 and len(state["rng"]) == 1
    assert state["run_id"] == (checkpoints / "run-id").read_text().strip()  # the run's identity, as .pt files
    assert state["param_groups"] and set(state["model"]) == set(load_model(one_process_run / "model").state_dict())
    assert cli_main(["export", str(one_process_run), "--checkpoint", "last", "--out", str(tmp_path / "exp")]) == 0
    exported, final = load_model(tmp_path / "exp"), load_model(one_process_run / "model")
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), final.state_dict().values()))
    assert cli_main(["eval", str(one_process_run), "--checkpoint", "last", "--dataset", "mnist", "--data-dir",
                     str(DATA), "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0


def test_a_kill_mid_write_leaves_the_last_checkpoint_whole_and_resume_cleans_up(one_process_run, tmp_path):
    from vitkit.train import resume

    run = tmp_path / "run"
    shutil.copytree(one_process_run, run, symlinks=True)
    partial = run / "checkpoints" / ".step-00000011.dcp.tmp"  # what a kill during the next save leaves
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half a shard")
    result = resume(run, ["--epochs", "2"])
    assert result.steps == 20 and not partial.exists()
    assert os.readlink(run / "checkpoints" / "last.dcp") == "step-00000020.1.dcp"


def test_sharded_metadata_that_names_code_is_refused(one_process_run, tmp_path):
    from vitkit.checkpoint import CheckpointError
    from vitkit.runfiles import load_checkpoint

    bad = tmp_path / "bad.dcp"
    shutil.copytree(one_process_run / "checkpoints" / "last.dcp", bad)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (bad / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="refused for safety.*system"):
        load_checkpoint(bad)
