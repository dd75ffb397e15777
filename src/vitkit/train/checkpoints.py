"""Training checkpoints: everything needed to continue a run exactly, written so a crash cannot corrupt it.

A run directory holds ``checkpoints/last.pt`` (rewritten every N steps and at each epoch end),
``checkpoints/best.pt`` (best validation accuracy) and the ``keep_last_k`` newest ``step-NNNNNNNN.pt``.
Files are written atomically (temporary file, fsync, rename) and read with
``torch.load(weights_only=True)``, so every value in them is a tensor or a plain Python type.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from vitkit.checkpoint import CheckpointError, load_model, load_weights
from vitkit.convert.pretrained import from_hub_source
from vitkit.fileio import CONFIG_NAME, atomic_torch_save
from vitkit.hub import fetch_source
from vitkit.models.registry import build_model, get_architecture

FORMAT = "vitkit-train-checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LAST, BEST = "last.pt", "best.pt"


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
class CheckpointWriter:
    """Writes ``last``, ``best`` and the kept step checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path, keep_last_k: int) -> None:
        self.directory = Path(run_dir) / CHECKPOINT_DIR
        self.keep_last_k = keep_last_k

    @property
    def last(self) -> Path:
        return self.directory / LAST

    @property
    def best(self) -> Path:
        return self.directory / BEST

    def save(self, state: dict[str, Any], *, is_best: bool = False) -> Path:
        """Write ``state`` as ``last.pt`` and link it as the newest step checkpoint (and ``best.pt``)."""
        state = {"format": FORMAT, "version": VERSION, **state}
        atomic_torch_save(state, self.last)
        if self.keep_last_k:
            _atomic_link(self.last, self.directory / f"step-{state['global_step']:08d}.pt")
            for old in self.step_checkpoints()[:-self.keep_last_k]:
                old.unlink(missing_ok=True)
        if is_best:
            _atomic_link(self.last, self.best)
        return self.last

    def step_checkpoints(self) -> list[Path]:
        """The kept step checkpoints, oldest first."""
        return sorted(self.directory.glob("step-*.pt"))


def _atomic_link(source: Path, target: Path) -> None:
    """Make ``target`` the same file as ``source`` (a hard link; a copy where links are unsupported),
    replacing any old ``target`` atomically."""
    tmp = target.with_name(f".{target.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


# ------------------------------------------------------------------------------------ reading
def resolve_checkpoint(run_or_checkpoint: str | Path) -> Path:
    """A training checkpoint file from a run directory (its ``last.pt``) or a checkpoint path."""
    path = Path(run_or_checkpoint)
    if path.is_dir():
        candidate = path / CHECKPOINT_DIR / LAST
        if not candidate.is_file():
            raise CheckpointError(f"{path}: no checkpoint to resume from ({candidate} does not exist)")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"{path}: no such run directory or checkpoint file")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint safely; a truncated, corrupt or foreign file is a clear error."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except Exception as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint, cannot be read "
                              f"({type(e).__name__}: {e}){_alternatives(path)}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a vitkit training checkpoint (no '{FORMAT}' marker); "
                              "`vitkit eval` and `vitkit.load_model` read model weights")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: written by a newer vitkit (checkpoint version {state['version']})")
    return state


def _alternatives(path: Path) -> str:
    """Other readable-looking checkpoints of the run (hard links of the same file excluded)."""
    def same_file(p: Path) -> bool:
        return path.exists() and p.samefile(path)

    others = [p for p in sorted(path.parent.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
              if not same_file(p)]
    if not others:
        return ""
    return ("; other checkpoints of this run: " + ", ".join(str(p) for p in others[:4])
            + " (resume from one with --resume PATH)")


# ------------------------------------------------------------------------- trained models
def model_from_checkpoint(state: dict[str, Any], *, use_ema: bool = True) -> torch.nn.Module:
    """The model a training checkpoint holds: its EMA weights when it has them (what a run exports)."""

    config_dict = dict(state["model_config"])
    arch = get_architecture(config_dict.pop("architecture", "vit"))
    model = build_model(arch.config_class.from_dict(config_dict, source="checkpoint model_config"))
    weights = state["ema"]["module"] if use_ema and state.get("ema") else state["model"]
    load_weights(model, weights, source="training checkpoint")
    return model


def load_trained(source: str | Path) -> tuple[torch.nn.Module, dict[str, Any] | None, Path | None]:
    """A trained model from a run directory, a training checkpoint or a vitkit model directory, or pretrained
    weights fetched through :mod:`vitkit.hub` (a pretrained name, Hugging Face repo id or URL).

    Returns ``(model, training_config_dict_or_None, run_dir_or_None)``. A run directory gives its exported
    ``model/`` when training finished, else ``best.pt``, else ``last.pt``.
    """

    path = Path(source)
    if not path.exists():
        fetched = fetch_source(str(source))  # a pretrained name, Hugging Face repo id or URL
        if fetched is None:
            raise CheckpointError(f"{path}: no such run directory, checkpoint or model directory (nor a pretrained "
                                  "name, Hugging Face repo id or URL)")
        return from_hub_source(fetched), None, None
    if path.is_file():
        state = load_checkpoint(path)
        run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else None
        return model_from_checkpoint(state), state.get("config"), run_dir
    if (path / CONFIG_NAME).is_file():  # a vitkit model directory, maybe the model/ of a run
        run_dir = path.parent if (path.parent / "config.yaml").is_file() else None
        return load_model(path), _run_config(run_dir), run_dir
    if (path / "model" / CONFIG_NAME).is_file():
        return load_model(path / "model"), _run_config(path), path
    for name in (BEST, LAST):
        if (path / CHECKPOINT_DIR / name).is_file():
            state = load_checkpoint(path / CHECKPOINT_DIR / name)
            return model_from_checkpoint(state), state.get("config"), path
    raise CheckpointError(f"{path}: not a run directory (no model/ or {CHECKPOINT_DIR}/) and not a vitkit model "
                          f"directory (no {CONFIG_NAME})")


def _run_config(run_dir: Path | None) -> dict[str, Any] | None:
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return None
    return yaml.safe_load((run_dir / "config.yaml").read_text())
