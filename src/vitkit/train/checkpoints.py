"""Training checkpoints: everything needed to continue a run exactly, written so a crash cannot corrupt it.

A run directory holds ``checkpoints/last.pt`` (rewritten every N steps and at each epoch end),
``checkpoints/best.pt`` (best validation accuracy) and the ``keep_last_k`` newest ``step-NNNNNNNN.pt``,
each its own file (copies, not links), and ``checkpoints/run-id``, the run's identity, which every
checkpoint it writes carries too (a checkpoint copied in from another run is refused on resume). Files
are written atomically (temporary file, fsync, rename) and read with
``torch.load(weights_only=True)``, so every value in them is a tensor or a plain Python type.
"""

from __future__ import annotations

import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit.checkpoint import CheckpointError
from vitkit.fileio import atomic_path, atomic_torch_save, atomic_write_text
from vitkit.runfiles import (
    BEST,
    CHECKPOINT_DIR,
    FORMAT,
    LAST,
    SHARDED_SUFFIX,
    VERSION,
    is_sharded_checkpoint,
    load_checkpoint,
    step_name,
)
from vitkit.train.rundir import RunDirectoryError

__all__ = ["BEST", "CHECKPOINT_DIR", "FORMAT", "LAST", "RUN_ID_NAME", "VERSION", "CheckpointWriter", "capture_rng",
           "check_run_identity", "load_checkpoint", "new_run_id", "read_run_id", "resolve_checkpoint", "restore_rng"]

RUN_ID_NAME = "run-id"
"""``RUN/checkpoints/run-id``: the run's identity, a random hex string written when the run is created."""


# ------------------------------------------------------------------------------- RNG states
def capture_rng() -> dict[str, Any]:
    """The global RNG states (Python, NumPy, torch CPU and CUDA) as tensors and plain values."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------ writing
def write_run_id(directory: Path, run_id: str | None) -> None:
    """Record the run's identity in its checkpoint directory (once: a resumed run keeps the file it has)."""
    path = directory / RUN_ID_NAME
    if run_id is not None and not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_id + "\n", path)


class CheckpointWriter:
    """Writes ``last``, ``best`` and the kept step checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path, keep_last_k: int, run_id: str | None = None) -> None:
        self.directory = Path(run_dir) / CHECKPOINT_DIR
        self.keep_last_k = keep_last_k
        self.run_id = run_id

    @property
    def last(self) -> Path:
        return self.directory / LAST

    @property
    def best(self) -> Path:
        return self.directory / BEST

    def save(self, state: dict[str, Any], *, is_best: bool = False) -> Path:
        """Write ``state`` as ``last.pt`` and copy it to the newest step checkpoint (and ``best.pt``).

        The names are independent files, each replaced atomically (never modified in place): damage to one
        never takes the others with it."""
        gone = RunDirectoryError(f"the run directory {self.directory.parent} was deleted or moved during the run; "
                                 "training stopped, as nothing more could be saved")
        if not self.directory.parent.is_dir():
            raise gone
        state = {"format": FORMAT, "version": VERSION, **state}
        if self.run_id is not None:
            state["run_id"] = self.run_id
        try:
            atomic_torch_save(state, self.last)
            if self.keep_last_k:
                _atomic_copy(self.last, self.directory / step_name(state["global_step"]))
                for old in self.step_checkpoints()[:-self.keep_last_k]:
                    old.unlink(missing_ok=True)
            if is_best:
                _atomic_copy(self.last, self.best)
        except OSError:
            if not self.directory.parent.is_dir():  # deleted while this checkpoint was being written
                raise gone from None
            raise
        return self.last

    def step_checkpoints(self) -> list[Path]:
        """The kept step checkpoints, oldest first."""
        return sorted(self.directory.glob("step-*.pt"))

    def write_run_id(self) -> None:
        write_run_id(self.directory, self.run_id)

    def retire_newer_than(self, step: int) -> list[Path]:
        """Move the step checkpoints newer than ``step`` (a branch that resuming from an older state abandons)
        to ``abandoned-at-step-N/``, out of the rotation, where they would outrank every new checkpoint and
        have them deleted as soon as written. Returns their new paths."""
        newer = [p for p in self.step_checkpoints() if _step_of(p) > step]
        if not newer:
            return []
        aside = self.directory / f"abandoned-at-{step_name(step).removesuffix('.pt')}"
        aside.mkdir(exist_ok=True)
        for path in newer:
            os.replace(path, aside / path.name)
        return [aside / p.name for p in newer]


def _step_of(path: Path) -> int:
    return int(path.stem.removeprefix("step-"))


# ------------------------------------------------------------------------------------ identity
def new_run_id() -> str:
    return uuid.uuid4().hex


def read_run_id(run_dir: str | Path) -> str | None:
    """The identity recorded in ``run_dir``, or None (a run from before identities, or not a run)."""
    path = Path(run_dir) / CHECKPOINT_DIR / RUN_ID_NAME
    try:
        return path.read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def check_run_identity(checkpoint: Path, saved: dict[str, Any], run_dir: Path) -> str | None:
    """The identity a resumed run keeps: the run directory's (or the checkpoint's, in a directory that has
    none). A checkpoint of another run (a ``last.pt`` copied in) is an error rather than silently becoming
    this run; checkpoints written before identities existed carry none and are not checked."""
    recorded, carried = read_run_id(run_dir), saved.get("run_id")
    if recorded is not None and carried is not None and recorded != carried:
        raise CheckpointError(
            f"{checkpoint}: this checkpoint belongs to another run (run id {carried[:12]}), not to {run_dir} "
            f"(run id {recorded[:12]}, in {Path(run_dir) / CHECKPOINT_DIR / RUN_ID_NAME}); resuming would continue "
            "that run here under this run's name. Resume it in its own run directory, or start a new run")
    return recorded or carried


def _atomic_copy(source: Path, target: Path) -> None:
    """Make ``target`` a copy of ``source`` (its own file, not a link), replacing any old ``target`` atomically."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


# ------------------------------------------------------------------------------------ reading
def resolve_checkpoint(run_or_checkpoint: str | Path) -> Path:
    """A training checkpoint from a run directory (its ``last.pt``, or ``last.dcp`` when sharded) or a
    checkpoint path (a file, or a sharded checkpoint directory)."""
    path = Path(run_or_checkpoint)
    if is_sharded_checkpoint(path):
        return path
    if path.is_dir():
        candidate = path / CHECKPOINT_DIR / LAST
        sharded = path / CHECKPOINT_DIR / ("last" + SHARDED_SUFFIX)
        if not candidate.is_file() and is_sharded_checkpoint(sharded):
            return sharded
        if not candidate.is_file():
            raise CheckpointError(f"{path}: no checkpoint to resume from ({candidate} does not exist)")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"{path}: no such run directory or checkpoint file")
    return path
