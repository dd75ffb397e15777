"""Sharded training checkpoints (``distributed.strategy: fsdp``): PyTorch's Distributed Checkpoint, written
by every process at once and readable by any number of processes.

Each save is a new directory ``checkpoints/step-NNNNNNNN.dcp`` (layout in :mod:`vitkit.runfiles`). Every
process writes its shards of the weights and optimizer state into ``.step-NNNNNNNN.dcp.tmp``; rank 0 adds
``state.pt`` (the loop state, every rank's RNG streams, the configs, the optimizer's hyper-parameters), then
renames the directory into place and re-points the ``last.dcp`` (and ``best.dcp``) link with an atomic rename.
A kill at any moment leaves ``last.dcp`` pointing at the previous whole checkpoint (the partial ``.tmp``
directory is removed on resume). The ``keep_last_k`` newest step directories are kept, and always those the
links name.

Reading reshards: :func:`restore_sharded` loads a checkpoint written by N processes into a model sharded over
M processes (or a whole model, M = 1), because DCP stores each tensor's global shape and every shard's place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from vitkit.fileio import atomic_torch_save, fsync_dir
from vitkit.runfiles import (
    CHECKPOINT_DIR,
    FORMAT,
    SHARDED_STATE,
    SHARDED_SUFFIX,
    VERSION,
    SafeFileSystemReader,
    sharded_step_checkpoints,
    single_process_dcp,
)
from vitkit.train.checkpoints import write_run_id
from vitkit.train.distributed import World, barrier, broadcast_object
from vitkit.train.rundir import RunDirectoryError

LAST_LINK, BEST_LINK = "last" + SHARDED_SUFFIX, "best" + SHARDED_SUFFIX


class ShardedCheckpointWriter:
    """Writes the sharded ``last``/``best``/step checkpoints of one run; :meth:`save` runs on every process."""

    def __init__(self, run_dir: str | Path, keep_last_k: int, world: World, run_id: str | None = None) -> None:
        self.directory = Path(run_dir) / CHECKPOINT_DIR
        self.keep_last_k = keep_last_k
        self.world = world
        self.run_id = run_id

    @property
    def last(self) -> Path:
        return self.directory / LAST_LINK

    @property
    def best(self) -> Path:
        return self.directory / BEST_LINK

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], *,
             is_best: bool = False) -> Path:
        """Write the model's and optimizer's shards (every process) and ``state`` (plain values, from rank 0)."""
        if not self.directory.parent.is_dir():
            raise RunDirectoryError(f"the run directory {self.directory.parent} was deleted or moved during the run; "
                                    "training stopped, as nothing more could be saved")
        model_state, optim_state = get_state_dict(model, optimizer)
        name = broadcast_object(self._free_name(int(state["global_step"])) if self.world.is_main else None,
                                self.world)
        tmp = self.directory / f".{name}.tmp"
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.world)
        with single_process_dcp():
            dcp.save({"model": model_state, "optim": optim_state["state"]},
                     storage_writer=FileSystemWriter(str(tmp), sync_files=True), no_dist=not self.world.distributed)
        if self.world.is_main:
            identity = {} if self.run_id is None else {"run_id": self.run_id}
            atomic_torch_save({"format": FORMAT, "version": VERSION, **state, **identity,
                               "param_groups": optim_state["param_groups"]}, tmp / SHARDED_STATE)
            fsync_dir(tmp)
            os.rename(tmp, self.directory / name)
            fsync_dir(self.directory)
            _point(self.last, name)
            if is_best:
                _point(self.best, name)
            self._prune()
        barrier(self.world)
        return self.last

    def write_run_id(self) -> None:
        write_run_id(self.directory, self.run_id)

    def retire_newer_than(self, step: int) -> list[Path]:
        """Move the step checkpoints newer than ``step`` (the branch a resumption from an older state abandons)
        to ``abandoned-at-step-N/``, out of the rotation; a ``best`` link into them goes with them."""
        newer = [p for p in sharded_step_checkpoints(self.directory.parent) if _step_of(p) > step]
        if not newer:
            return []
        aside = self.directory / f"abandoned-at-step-{step:08d}"
        aside.mkdir(exist_ok=True)
        if self.best.is_symlink() and os.readlink(self.best) in {p.name for p in newer}:
            self.best.unlink()
        for path in newer:
            os.replace(path, aside / path.name)
        return [aside / p.name for p in newer]

    def _free_name(self, step: int) -> str:
        name, k = f"step-{step:08d}{SHARDED_SUFFIX}", 0
        while (self.directory / name).exists():
            k += 1
            name = f"step-{step:08d}.{k}{SHARDED_SUFFIX}"
        return name

    def _prune(self) -> None:
        linked = {os.readlink(link) for link in (self.last, self.best) if link.is_symlink()}
        kept = sharded_step_checkpoints(self.directory.parent)
        for old in kept[:-self.keep_last_k] if self.keep_last_k else kept:
            if old.name not in linked:
                shutil.rmtree(old, ignore_errors=True)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-").split(".")[0])


def _point(link: Path, target: str) -> None:
    """Make ``link`` a relative symbolic link to ``target``, replacing any old one atomically."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def restore_sharded(saved: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> None:
    """Load the weights and optimizer state of the sharded checkpoint ``saved`` (from
    :func:`vitkit.runfiles.load_checkpoint`) into ``model`` and ``optimizer``, sharded over this world or whole."""
    model_state, optim_state = get_state_dict(model, optimizer)
    target = {"model": model_state, "optim": optim_state["state"]}
    with single_process_dcp():
        dcp.load(target, storage_reader=SafeFileSystemReader(saved["sharded"]), no_dist=not world.distributed)
    set_state_dict(model, optimizer, model_state_dict=target["model"],
                   optim_state_dict={"state": target["optim"], "param_groups": saved["param_groups"]})


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights of a (maybe sharded) model, on the CPU of rank 0 (empty on the others); every
    process must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
