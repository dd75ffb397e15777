"""Reading weights from disk, safely, into models.

- vitkit's own format: a directory with ``model.safetensors`` and ``config.json`` (written by a model's
  ``save_pretrained``, through :mod:`vitkit.fileio`).
- Safe reading of foreign files: safetensors, or ``torch.load(weights_only=True)`` which refuses
  pickles that would run code; ``.npz`` is read with ``allow_pickle=False``.
- Strict loading into a model that names every missing, unexpected or mis-shaped key.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vitkit.fileio import CONFIG_NAME, WEIGHTS_NAME, load_safetensors, read_json_object
from vitkit.models.pos_embed import grid_of, resample_pos_embed
from vitkit.models.registry import get_architecture


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, unsafe, or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A torch pickle that would import or call code to load; vitkit refuses it instead of running it."""


# ------------------------------------------------------------------------------- safe reading
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def torch_load_safely(path: str | Path, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that say what is wrong with the file.

    A pickle that names code (a class or function outside torch's allowlist) raises
    :class:`UnsafeCheckpointError`; a truncated or garbled file raises :class:`CheckpointError`.
    ``mmap=True`` maps the tensors instead of reading them (cheap peeks at large files).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        # timm's training checkpoints (T2T-ViT's releases among them) keep their argparse.Namespace: a plain
        # record of strings and numbers, safe to rebuild
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        refused = _REFUSED_GLOBAL.search(str(e))
        if refused is None:  # a garbled pickle stream: "Unsupported operand", "invalid load key", ...
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint, not a readable torch file "
                                  f"({_first_line(e)})") from None
        raise UnsafeCheckpointError(
            f"{path}: refused for safety: the file holds pickle data that imports code ({refused.group(1)}), "
            "and loading it could run that code. vitkit reads only tensors and plain values. If you trust "
            "the file, re-save its tensors where they were made, e.g. "
            "safetensors.torch.save_file(model.state_dict(), 'model.safetensors'), and pass that file") from None
    except RuntimeError as e:
        if mmap and "mmap" in str(e):  # the legacy (non-zip) format cannot be mapped
            return torch_load_safely(path)
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint, not a readable torch file "
                              f"({_first_line(e)})") from None
    except Exception as e:  # garbage bytes fail anywhere in the unpickler: EOFError, IndexError, KeyError, ...
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint, not a readable torch file "
                              f"({type(e).__name__}: {_first_line(e)})") from None


def _first_line(error: BaseException) -> str:
    """The first sentence of an error message (torch appends long advice to its own)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(". ")[0].rstrip(".")


def load_state_dict(path: str | Path, *, prefer_ema: bool = False) -> dict[str, Tensor]:
    """Read a flat tensor dict from .safetensors, .pth/.pt/.bin/.ckpt (weights only) or .npz.

    Never executes code from the file. Nested ``{'state_dict': ...}`` / ``{'model': ...}`` wrappers
    are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".npz"):
        return unwrap_state_dict(torch_load_safely(path), path, prefer_ema)
    try:
        if suffix == ".safetensors":
            return load_safetensors(path)
        with np.load(path, allow_pickle=False) as npz:
            return {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
    except CheckpointError:
        raise
    except Exception as e:  # truncated file, bad header, object arrays (pickles) in an .npz, ...
        raise CheckpointError(f"{path}: cannot read checkpoint safely ({type(e).__name__}: {e})") from e


def unwrap_state_dict(obj: Any, path: Path, prefer_ema: bool = False) -> dict[str, Tensor]:
    """The flat tensor dict inside a loaded checkpoint (``{'state_dict': ...}``, ``{'model': ...}``, ...): a
    training checkpoint's raw weights before its ``state_dict_ema``, unless ``prefer_ema``; DataParallel's
    ``module.`` prefix dropped."""
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
def read_config(directory: str | Path) -> Any:
    """The model config stored in a vitkit directory's ``config.json``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (a vitkit model directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    data = read_json_object(path, what="a JSON object of config fields", error=CheckpointError)
    return config_from_record(data, source=str(path))


def config_from_record(data: Any, *, source: str) -> Any:
    """The model config of a :func:`vitkit.models.registry.config_record` (what ``config.json`` holds, also
    carried in an exported ONNX file's metadata); errors name ``source`` and the field."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: expected a JSON object of config fields, got {type(data).__name__}")
    data = dict(data)
    data.pop("vitkit_version", None)
    arch = get_architecture(data.pop("architecture", "vit"))
    try:
        return arch.config_class.from_dict(data, source=source)
    except (TypeError, ValueError) as e:  # the config engine's errors already name the file and the field
        raise CheckpointError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None


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
    broken = nonfinite_keys(state_dict)
    if broken:
        raise CheckpointError(f"{source}: {describe_nonfinite(broken)}; these weights cannot give a meaningful "
                              "answer (a diverged run, or a damaged file)")
    model.load_state_dict(state_dict)


def nonfinite_keys(state_dict: dict[str, Tensor]) -> list[str]:
    """The keys of floating-point tensors holding NaN or infinity."""
    return [k for k, v in state_dict.items()
            if isinstance(v, Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def describe_nonfinite(keys: list[str]) -> str:
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return f"NaN or infinite values in {len(keys)} weight tensor(s) ({shown})"


def _resample_for(model: nn.Module, pos_embed: Tensor, source: str) -> Tensor:
    prefix = getattr(model, "num_prefix_tokens", 1)
    try:
        old_grid = grid_of(pos_embed.shape[1] - prefix)
    except ValueError as e:
        raise CheckpointError(f"{source}: pos_embed {tuple(pos_embed.shape)}: {e}") from e
    return resample_pos_embed(pos_embed, model.grid_size, old_grid=old_grid, num_prefix_tokens=prefix,
                              mode=model.config.pos_embed_interpolation)

