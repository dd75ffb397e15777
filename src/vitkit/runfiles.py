"""What a training run directory holds, and how its training checkpoints are read.

The training loop writes a run (``vitkit.train``); everything else only reads one, through this module:

    RUN/config.yaml                   the training config
    RUN/checkpoints/last.pt           the newest state (every N steps and at each epoch end)
    RUN/checkpoints/best.pt           the state with the best validation accuracy so far
    RUN/checkpoints/step-NNNNNNNN.pt  the newest kept step states
    RUN/model/                        the final model in vitkit's format (only once the run has finished)

A training checkpoint is a ``torch.save`` dict of tensors and plain values marked with :data:`FORMAT`,
read with ``weights_only=True``; it holds the model's config, so it can be turned into a model alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml

from vitkit.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    describe_nonfinite,
    nonfinite_keys,
    torch_load_safely,
)
from vitkit.config_engine import describe_yaml_error
from vitkit.models.registry import get_architecture

FORMAT = "vitkit-train-checkpoint"
VERSION = 1
RUN_CONFIG_NAME = "config.yaml"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
LAST, BEST = "last.pt", "best.pt"
STEP_PATTERN = re.compile(r"step-(\d+)\.pt")
RUN_STATES = ("best", "last", "step-N", "model")
"""Names of a run's states: its best and last checkpoints, a kept step checkpoint, its exported final model."""


def step_name(step: int) -> str:
    return f"step-{step:08d}.pt"


RUN_CONFIG_SECTIONS = frozenset({"model", "data", "optim"})
"""Sections every training config has (``vitkit train --print-config``), which another tool's YAML seldom does."""


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a training run directory, told by what only runs have: a training checkpoint in
    ``checkpoints/`` (``last.pt``, ``best.pt``, ``step-N.pt``), or a ``config.yaml`` with a training config's
    sections (a run stopped before its first checkpoint). A ``model/`` folder, a ``checkpoints/`` folder or a
    ``config.yaml`` alone are common in other folders (a saved model in the working directory) and do not make
    a run."""
    path = Path(path)
    if not path.is_dir():
        return False
    checkpoints = path / CHECKPOINT_DIR
    if checkpoints.is_dir() and any(is_run_checkpoint_name(p.name) for p in checkpoints.iterdir()):
        return True
    config = path / RUN_CONFIG_NAME
    if not config.is_file():
        return False
    try:
        record = yaml.safe_load(config.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return False
    return isinstance(record, dict) and RUN_CONFIG_SECTIONS <= record.keys()


def run_of_checkpoint(path: str | Path) -> Path | None:
    """The run directory a checkpoint file sits in (``RUN/checkpoints/x.pt``), else None."""
    path = Path(path)
    parent = path.parent
    return parent.parent if parent.name == CHECKPOINT_DIR and is_run_dir(parent.parent) else None


def is_run_checkpoint_name(name: str) -> bool:
    return name in (LAST, BEST) or STEP_PATTERN.fullmatch(name) is not None


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """The kept step checkpoints of a run, oldest first."""
    return sorted((Path(run_dir) / CHECKPOINT_DIR).glob("step-*.pt"))


def state_path(run_dir: str | Path, state: str) -> Path:
    """The file (or, for ``model``, the directory) of a named state of a run: ``best``, ``last``,
    ``step-N`` (N with or without leading zeros) or ``model``. A state the run does not have is an error
    that lists those it has."""
    run_dir = Path(run_dir)
    name = state.strip().lower().removesuffix(".pt")
    if name in ("best", "last"):
        path = run_dir / CHECKPOINT_DIR / f"{name}.pt"
    elif name in ("model", "final"):
        path = run_dir / MODEL_DIR
    elif (m := re.fullmatch(r"step-?(\d+)", name)) is not None:
        path = run_dir / CHECKPOINT_DIR / step_name(int(m.group(1)))
    else:
        raise ValueError(f"unknown run state {state!r}: choose best, last, step-N or model")
    if not path.exists():
        raise CheckpointError(f"{run_dir} has no {state} state ({path} does not exist); it has: "
                              f"{', '.join(available_states(run_dir)) or 'nothing loadable yet'}")
    return path


def available_states(run_dir: str | Path) -> list[str]:
    """The states of a run that exist on disk, e.g. ``['best', 'last', 'step-00000120', 'model']``."""
    run_dir = Path(run_dir)
    states = [name for name in ("best", "last") if (run_dir / CHECKPOINT_DIR / f"{name}.pt").is_file()]
    states += [p.stem for p in step_checkpoints(run_dir)]
    if (run_dir / MODEL_DIR).is_dir():
        states.append("model")
    return states


def default_state(run_dir: str | Path) -> str:
    """The state a run directory stands for when no state is named: its best checkpoint, else its last,
    else its exported model (a run whose checkpoints were deleted)."""
    for state in ("best", "last", "model"):
        if state in available_states(run_dir):
            return state
    raise CheckpointError(f"{run_dir}: a run directory without any state to load: no {CHECKPOINT_DIR}/{BEST}, "
                          f"{CHECKPOINT_DIR}/{LAST} or {MODEL_DIR}/ (was it stopped before its first checkpoint?)")


def read_run_config(run_dir: str | Path | None) -> dict[str, Any] | None:
    """A run's ``config.yaml`` as a dict, or None."""
    if run_dir is None or not (Path(run_dir) / RUN_CONFIG_NAME).is_file():
        return None
    path = Path(run_dir) / RUN_CONFIG_NAME
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: {describe_yaml_error(e)}") from None


# ------------------------------------------------------------------------------------ reading
def load_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """Read a training checkpoint safely; a truncated, corrupt, unsafe or foreign file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch_load_safely(path, mmap=mmap)
    except UnsafeCheckpointError:
        raise
    except CheckpointError as e:
        raise CheckpointError(f"{e}{_alternatives(path)}") from None
    if not is_training_checkpoint(state):
        raise CheckpointError(f"{path}: not a vitkit training checkpoint (no '{FORMAT}' marker); "
                              "`vitkit.from_pretrained` and `vitkit convert` read model weights in other formats")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: written by a newer vitkit (checkpoint version {state['version']})")
    broken = nonfinite_keys(state["model"]) if isinstance(state.get("model"), dict) else []
    if broken:
        raise CheckpointError(f"{path}: {describe_nonfinite(broken)}: not a good state to resume, evaluate or "
                              f"export{_alternatives(path)}")
    return state


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def _alternatives(path: Path) -> str:
    """The other states of the run a damaged checkpoint belongs to (files that are the same file excluded)."""
    run_dir = run_of_checkpoint(path)
    if run_dir is None or not is_run_checkpoint_name(path.name):
        return ""

    def same_file(p: Path) -> bool:
        try:
            return p.samefile(path)
        except OSError:
            return False

    others = [p for p in sorted(path.parent.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
              if is_run_checkpoint_name(p.name) and not same_file(p)]
    if not others:
        return ""
    return ("; other checkpoints of this run: " + ", ".join(str(p) for p in others[:4])
            + " (resume from one with --resume PATH)")


def checkpoint_config(state: dict[str, Any], *, source: str = "checkpoint") -> Any:
    """The model config a training checkpoint holds."""
    config_dict = dict(state["model_config"])
    arch = get_architecture(config_dict.pop("architecture", "vit"))
    return arch.config_class.from_dict(config_dict, source=f"{source} (model_config)")


def checkpoint_weights(state: dict[str, Any], *, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The model weights of a training checkpoint: its EMA weights when it has them (what a run exports)."""
    return state["ema"]["module"] if use_ema and state.get("ema") else state["model"]


def best_score(state: dict[str, Any]) -> float | None:
    """The best validation score a training checkpoint records (``best_score``; ``best_acc`` in older ones)."""
    best = state.get("best_score", state.get("best_acc"))
    return None if best is None or float(best) == float("-inf") else float(best)


def describe_checkpoint(state: dict[str, Any], *, use_ema: bool = True) -> str:
    """Where in its run a training checkpoint was taken, e.g. ``epoch 5 of 23 done, step 120, best val acc
    41.20%, EMA weights``."""
    epochs = (state.get("config") or {}).get("epochs")
    of = f" of {epochs}" if epochs else ""
    epoch, batch = int(state.get("epoch", 0)), int(state.get("batch", 0))
    where = f"epoch {epoch}{of} done" if batch == 0 else f"during epoch {epoch + 1}{of}"
    parts = [where, f"step {int(state.get('global_step', 0))}"]
    best = best_score(state)
    if best is not None and "best_acc" in state:
        parts.append(f"best val acc {100 * best:.2f}%")
    elif best is not None:
        parts.append(f"best val score {best:.4g}")
    else:
        parts.append("not evaluated yet")
    if state.get("ema"):
        parts.append("EMA weights" if use_ema else "raw (not EMA) weights")
    return ", ".join(parts)
