"""Crash-safe file writing and safetensors I/O: the one leaf every writer uses (imports nothing from vitkit).

- Atomic writes (temporary file, fsync, rename), so a crash or kill never leaves a half-written file.
- Tensors on disk as safetensors, which cannot carry code.
- vitkit's model directory: ``model.safetensors`` + ``config.json``, written atomically file by file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


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


def save_state_dict(state_dict: Mapping[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Read a ``.safetensors`` file into a dict of CPU tensors."""
    return load_file(str(path))


def write_model_dir(directory: str | Path, state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> Path:
    """Write vitkit's model directory: ``model.safetensors`` (``state_dict``) and ``config.json`` (``config``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_state_dict(state_dict, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_text(json.dumps(dict(config), indent=2) + "\n", directory / CONFIG_NAME)
    return directory


def describe_os_error(e: OSError) -> str:
    """``No space left on device: /path`` rather than ``[Errno 28] No space left on device: b'/path'``."""
    name = e.filename.decode(errors="replace") if isinstance(e.filename, bytes) else e.filename
    return f"{e.strerror}: {name}" if e.strerror and name else str(e)


def fsync_dir(directory: str | Path) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where directories cannot be synced."""
    _fsync_dir(Path(directory))
