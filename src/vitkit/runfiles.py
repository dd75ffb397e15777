"""What a training run directory holds, and how its training checkpoints are read.

The training loop writes a run (``vitkit.train``); everything else only reads one, through this module:

    RUN/config.yaml                   the training config
    RUN/checkpoints/last.pt           the newest state (every N steps and at each epoch end)
    RUN/checkpoints/best.pt           the state with the best validation accuracy so far
    RUN/checkpoints/step-NNNNNNNN.pt  the newest kept step states
    RUN/model/                        the final model in vitkit's format (only once the run has finished)

A training checkpoint is a ``torch.save`` dict of tensors and plain values marked with :data:`FORMAT`,
read with ``weights_only=True``; it holds the model's config, so it can be turned into a model alone.

A run trained with ``distributed.strategy: fsdp`` writes sharded checkpoints instead, one directory each::

    RUN/checkpoints/step-NNNNNNNN.dcp/   a Distributed Checkpoint: each process's shards of the weights and
                                         optimizer state (``__R_0.distcp``, ``.metadata``) + ``state.pt``
                                         (everything else: loop state, every rank's RNG, configs)
    RUN/checkpoints/last.dcp -> step-...dcp   links, each replaced atomically
    RUN/checkpoints/best.dcp -> step-...dcp

:func:`load_checkpoint` reads one into the same dict as a ``.pt`` file, its weights gathered whole on one
process. Nothing in it is unpickled beyond plain values and DCP's own metadata records (an allowlist).
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

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
SHARDED_SUFFIX = ".dcp"
SHARDED_STATE = "state.pt"
"""Inside a sharded checkpoint: everything but the sharded tensors, as a ``torch.save`` dict."""
SHARDED_STEP_PATTERN = re.compile(r"step-(\d+)(?:\.(\d+))?\.dcp")
"""``step-N.dcp``; a second checkpoint of the same step (the end of an epoch that a step checkpoint just saved)
is ``step-N.K.dcp``."""
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
    return (name in (LAST, BEST, "last" + SHARDED_SUFFIX, "best" + SHARDED_SUFFIX)
            or STEP_PATTERN.fullmatch(name) is not None or SHARDED_STEP_PATTERN.fullmatch(name) is not None)


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a sharded (Distributed Checkpoint) training checkpoint directory."""
    path = Path(path)
    return path.is_dir() and (path / SHARDED_STATE).is_file() and (path / ".metadata").is_file()


def _sharded_key(path: Path) -> tuple[int, int]:
    m = SHARDED_STEP_PATTERN.fullmatch(path.name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else (-1, -1)


def sharded_step_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's sharded step checkpoints, oldest first (the links ``last``/``best`` point at some of them)."""
    found = [p for p in (Path(run_dir) / CHECKPOINT_DIR).glob("step-*" + SHARDED_SUFFIX)
             if SHARDED_STEP_PATTERN.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=_sharded_key)


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """The kept step checkpoints of a run, oldest first (``.pt`` files, then sharded directories)."""
    return sorted((Path(run_dir) / CHECKPOINT_DIR).glob("step-*.pt")) + sharded_step_checkpoints(run_dir)


def state_path(run_dir: str | Path, state: str) -> Path:
    """The file (or, for ``model``, the directory) of a named state of a run: ``best``, ``last``,
    ``step-N`` (N with or without leading zeros) or ``model``. A state the run does not have is an error
    that lists those it has."""
    run_dir = Path(run_dir)
    name = state.strip().lower().removesuffix(".pt")
    name = name.removesuffix(SHARDED_SUFFIX)
    if name in ("best", "last"):
        path = run_dir / CHECKPOINT_DIR / f"{name}.pt"
        if not path.exists() and (run_dir / CHECKPOINT_DIR / f"{name}{SHARDED_SUFFIX}").exists():
            path = run_dir / CHECKPOINT_DIR / f"{name}{SHARDED_SUFFIX}"
    elif name in ("model", "final"):
        path = run_dir / MODEL_DIR
    elif (m := re.fullmatch(r"step-?(\d+)(?:\.(\d+))?", name)) is not None:  # step-N.K: a sharded one's K-th save
        path = run_dir / CHECKPOINT_DIR / step_name(int(m.group(1)))
        sharded = [p for p in sharded_step_checkpoints(run_dir) if _sharded_key(p)[0] == int(m.group(1))
                   and (m.group(2) is None or _sharded_key(p)[1] == int(m.group(2)))]
        if (not path.exists() or m.group(2) is not None) and sharded:
            path = sharded[-1]
    else:
        raise ValueError(f"unknown run state {state!r}: choose best, last, step-N or model")
    if not path.exists():
        raise CheckpointError(f"{run_dir} has no {state} state ({path} does not exist); it has: "
                              f"{', '.join(available_states(run_dir)) or 'nothing loadable yet'}")
    return path


def available_states(run_dir: str | Path) -> list[str]:
    """The states of a run that exist on disk, e.g. ``['best', 'last', 'step-00000120', 'model']``."""
    run_dir = Path(run_dir)
    states = [name for name in ("best", "last") if (run_dir / CHECKPOINT_DIR / f"{name}.pt").is_file()
              or is_sharded_checkpoint(run_dir / CHECKPOINT_DIR / f"{name}{SHARDED_SUFFIX}")]
    states += [p.name.removesuffix(".pt").removesuffix(SHARDED_SUFFIX) for p in step_checkpoints(run_dir)]
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
def load_checkpoint(path: str | Path, *, mmap: bool = False, weights: bool = True) -> dict[str, Any]:
    """Read a training checkpoint safely; a truncated, corrupt, unsafe or foreign file is a clear error.

    A sharded checkpoint (a directory) gives the same dict, with ``sharded`` set to its path and (with
    ``weights``) ``model`` holding its weights gathered whole on this process; training resumes it with
    ``weights=False`` and reads the shards it needs itself."""
    path = Path(path)
    if path.is_dir():
        return _load_sharded(path, weights=weights)
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


def _load_sharded(path: Path, *, weights: bool) -> dict[str, Any]:
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path}: not a checkpoint (a sharded checkpoint directory holds {SHARDED_STATE} and "
                              ".metadata; an interrupted write leaves neither)")
    state = load_checkpoint(path / SHARDED_STATE)
    state["sharded"] = str(path)
    if weights:
        state["model"] = read_sharded_tensors(path, "model")
    return state


# Everything DCP's ``.metadata`` pickle may name: its own record classes, torch dtypes and sizes.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_GLOBALS.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                             torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"refused for safety: the sharded checkpoint's .metadata names {module}.{name}, "
                              "which is not a Distributed Checkpoint record")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, but its ``.metadata`` pickle may only name DCP's record types (an allowlist), so
    reading a checkpoint never runs code; the tensors themselves are read by torch, never unpickled."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except Exception as e:  # a truncated or garbled file
            raise CheckpointError(f"{path}: unreadable sharded-checkpoint metadata ({type(e).__name__}: {e})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not Distributed Checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


@contextlib.contextmanager
def single_process_dcp() -> Iterator[None]:
    """Silence DCP's warning that it runs in one process (which is what vitkit asks of it there)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled")
        yield


def read_sharded_tensors(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` (``model``) of a sharded checkpoint, each whole, on the CPU of this process
    (whatever number of processes wrote it)."""
    reader = SafeFileSystemReader(str(path))
    metadata = reader.read_metadata()
    start = prefix + "."
    target = {key[len(start):]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
              for key, meta in metadata.state_dict_metadata.items()
              if key.startswith(start) and isinstance(meta, TensorStorageMetadata)}
    if not target:
        raise CheckpointError(f"{path}: the sharded checkpoint holds no {prefix} tensors")
    wrapped = {prefix: target}
    with single_process_dcp():
        dcp.load(wrapped, storage_reader=reader, no_dist=True)
    return wrapped[prefix]


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
