"""Everything that reads or writes weights on disk, in one place.

- vitkit's own format: a directory with ``model.safetensors`` and ``config.json``.
- Safe reading of foreign files: safetensors, or ``torch.load(weights_only=True)`` which refuses
  pickles that would run code; ``.npz`` is read with ``allow_pickle=False``.
- Atomic writes (temporary file, fsync, rename), so a crash never leaves a half-written file.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, unsafe, or does not fit the model."""


# ------------------------------------------------------------------------------ atomic writing
@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_state_dict(state_dict: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# ------------------------------------------------------------------------------- safe reading
def load_state_dict(path: str | Path, *, prefer_ema: bool = False) -> dict[str, Tensor]:
    """Read a flat tensor dict from .safetensors, .pth/.pt/.bin/.ckpt (weights only) or .npz.

    Never executes code from the file. Nested ``{'state_dict': ...}`` / ``{'model': ...}`` wrappers
    are unwrapped (a training checkpoint's raw weights before its ``state_dict_ema``, unless
    ``prefer_ema``), and DataParallel's ``module.`` prefix is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
        # timm's training checkpoints (T2T-ViT's releases among them) keep their argparse.Namespace: a plain
        # record of strings and numbers, safe to rebuild
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # truncated zip, bad header, forbidden pickle global, ...
        raise CheckpointError(f"{path}: cannot read checkpoint safely ({type(e).__name__}: {e})") from e
    return _unwrap_state_dict(obj, path, prefer_ema)


def _unwrap_state_dict(obj: Any, path: Path, prefer_ema: bool = False) -> dict[str, Tensor]:
    keys = ("state_dict", "state_dict_ema", "model", "model_state", "module")
    if prefer_ema:
        keys = ("state_dict_ema", *keys)
    for key in keys:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


# ----------------------------------------------------------------------------- vitkit's format
def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """Save ``model`` (anything built from a registered config) as safetensors + config.json."""
    from vitkit.models.registry import architecture_of

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    payload = {"architecture": architecture_of(config), **config.to_dict(), "vitkit_version": _version()}
    save_state_dict(model.state_dict(), directory / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_text(json.dumps(payload, indent=2) + "\n", directory / CONFIG_NAME)
    return directory


def read_config(directory: str | Path) -> Any:
    """The model config stored in a vitkit directory's ``config.json``."""
    from vitkit.models.registry import get_architecture

    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (a vitkit model directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    data.pop("vitkit_version", None)
    arch = get_architecture(data.pop("architecture", "vit"))
    try:
        return arch.config_class.from_dict(data, source=str(path))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def load_model(directory: str | Path, *, img_size: int | tuple[int, int] | None = None,
               map_location: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """Load a directory written by :func:`save_pretrained`.

    ``img_size`` builds the model for another resolution and resamples the position embeddings in
    2-D; other ``overrides`` replace config fields (e.g. ``drop_path_rate``).
    """
    from vitkit.models.registry import build_model

    directory = Path(directory)
    config = read_config(directory)
    state_dict = load_state_dict(directory / WEIGHTS_NAME)
    if img_size is not None:
        overrides["img_size"] = img_size
    model = build_model(config.replace(**overrides) if overrides else config)
    load_weights(model, state_dict, source=str(directory / WEIGHTS_NAME))
    return model.to(map_location)


def load_weights(model: nn.Module, state_dict: dict[str, Tensor], *, source: str = "state dict") -> None:
    """Load a timm-keyed state dict into ``model`` strictly, resampling position embeddings if the grid
    differs, and naming every missing, unexpected or mis-shaped key in the error."""
    state_dict = dict(state_dict)
    own = model.state_dict()
    if "pos_embed" in state_dict and "pos_embed" in own and state_dict["pos_embed"].shape != own["pos_embed"].shape:
        if getattr(model, "pos_embed_is_fixed", False):  # a fixed table (T2T's sinusoid): the model's own
            state_dict["pos_embed"] = own["pos_embed"]
        else:
            state_dict["pos_embed"] = _resample_for(model, state_dict["pos_embed"], source)
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + " | ".join(problems))
    model.load_state_dict(state_dict)


def _resample_for(model: nn.Module, pos_embed: Tensor, source: str) -> Tensor:
    from vitkit.models.pos_embed import grid_of, resample_pos_embed

    prefix = getattr(model, "num_prefix_tokens", 1)
    try:
        old_grid = grid_of(pos_embed.shape[1] - prefix)
    except ValueError as e:
        raise CheckpointError(f"{source}: pos_embed {tuple(pos_embed.shape)}: {e}") from e
    return resample_pos_embed(pos_embed, model.grid_size, old_grid=old_grid, num_prefix_tokens=prefix,
                              mode=model.config.pos_embed_interpolation)


def _version() -> str:
    from vitkit import __version__

    return __version__
