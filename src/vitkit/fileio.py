"""Crash-safe file writing and safetensors I/O: the one leaf every writer uses (imports nothing from vitkit).

- Atomic writes (temporary file, fsync, rename), so a crash or kill never leaves a half-written file; a
  write that fails (a full disk) removes its temporary file and raises an OSError naming the target.
- Tensors on disk as safetensors, which cannot carry code.
- Several files of a directory written as one (:func:`atomic_files`): all are replaced, or none.
- vitkit's model directory: ``model.safetensors`` + ``config.json``, written as one.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent use is then the user's risk
    fcntl = None  # type: ignore[assignment]

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
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
            os.replace(tmp_path, path)
        except Exception as e:
            failure = write_failure(e, path, tmp_path)
            if failure is None:
                raise
            raise failure from None
        _fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_failure(error: BaseException, path: Path, tmp: Path | None = None) -> OSError | None:
    """``error``, raised while writing ``path`` (through the temporary ``tmp``), as an :class:`OSError` that names
    ``path``; None when it is no I/O failure.

    torch.save reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``
    and safetensors as ``SafetensorError: ... os error 28``; neither names the file nor is an OSError, so a
    caller could only print a traceback.
    """
    if isinstance(error, OSError):
        if error.filename not in (None, str(tmp), tmp):
            return None  # about another file (a copy's source, say): its own message is the right one
        return OSError(error.errno, error.strerror or str(error), str(path))
    text = str(error)
    if "os error 28" in text or "No space left" in text or "StorageFull" in text:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if (type(error).__name__ == "SafetensorError"
            or any(mark in text for mark in ("inline_container", "PytorchStreamWriter", "basic_ios", "iostream"))):
        if _free_bytes(path.parent) < (1 << 20):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        return OSError(errno.EIO, f"write failed ({first})", str(path))
    return None


def _free_bytes(directory: Path) -> int:
    try:
        stat = os.statvfs(directory)
    except (OSError, AttributeError):  # AttributeError: no statvfs on Windows
        return 1 << 62
    return stat.f_bavail * stat.f_frsize


@contextmanager
def atomic_files(directory: str | Path, *, stale: Iterable[str] = (),
                 announce: tuple[str, ...] = (CONFIG_NAME,)) -> Iterator[Callable[[str], Path]]:
    """Write several files of ``directory`` as one: yields ``stage(name)``, which gives a temporary path for the
    file ``name``; when the block succeeds every staged file is fsynced and renamed into place, and then the
    ``stale`` files (an older export's leftovers that would contradict the new files) are removed. When it
    fails, every temporary file is removed, no file of the directory has changed, a directory this call
    created is removed again, and the error is an :class:`OSError` naming the file being written.

    Replacing an existing file named in ``announce`` in a way that loses something (keys of a JSON object the
    new one lacks: a user's or another library's ``config.json``), and removing a stale file, is said on
    stderr: the directory may hold files its owner wrote. vitkit rewriting its own file is not.
    """
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    current: list[str] = []

    def stage(name: str) -> Path:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        os.close(fd)
        staged[name] = Path(tmp)
        current[:] = [name]
        return staged[name]

    try:
        try:
            yield stage
            for name, tmp in staged.items():
                current[:] = [name]
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o666 & ~_umask())
        except Exception as e:
            target = directory / current[0] if current else directory
            failure = write_failure(e, target, staged.get(current[0]) if current else None)
            if failure is None:
                raise
            raise failure from None
        replaced = [(name, lost) for name in announce if name in staged and (directory / name).is_file()
                    and (lost := _lost_keys(directory / name, staged[name])) is not None]
        for name, tmp in staged.items():
            os.replace(tmp, directory / name)
        _fsync_dir(directory)
        for name, lost in replaced:
            print(f"vitkit: replaced the existing {directory / name}{lost}", file=sys.stderr)
        for name in stale:
            path = directory / name
            if name not in staged and path.is_file():
                path.unlink()
                print(f"vitkit: removed {path}, left by an earlier export in this format", file=sys.stderr)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        if created and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


def _lost_keys(old: Path, new: Path) -> str | None:
    """What replacing ``old`` by ``new`` loses, as a note (None: nothing: the same keys, as when vitkit rewrites
    its own file). A JSON object loses the keys the new one lacks; any other file, its content."""
    try:
        before, after = json.loads(old.read_text()), json.loads(new.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "" if old.read_bytes() != new.read_bytes() else None
    if not (isinstance(before, dict) and isinstance(after, dict)):
        return "" if before != after else None
    lost = sorted(set(before) - set(after))
    if not lost:
        return None
    shown = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
    return f" (it held keys the new one does not: {shown})"


class DirectoryInUse(OSError):
    """Another live process holds the directory's lock (a study's ``--out``, a running training run)."""


LOCK_NAME = ".vitkit.lock"
_held: dict[str, int] = {}


def lock_directory(directory: str | Path, doing: str, busy: str) -> None:
    """Take this process's exclusive lock on ``directory`` (``flock`` on its ``.vitkit.lock``), or raise
    :class:`DirectoryInUse` naming the process that holds it. The kernel releases the lock when the process
    ends, however it ends (kill -9 included), so a stale lock never blocks anyone; :func:`unlock_directory`
    releases it earlier. ``doing`` says what the holder is doing (recorded in the lock file for the other
    process's message), ``busy`` what that other process is told."""
    directory = Path(directory)
    key = str(directory.resolve())
    if key in _held:
        return
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DirectoryInUse(errno.EBUSY, f"{busy} (the lock is held by {holder})", str(directory)) from None
    except BaseException:
        os.close(fd)
        raise
    try:  # who holds it, for the other process's message; the lock works without it (a full disk)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"vitkit process {os.getpid()} ({doing})\n".encode(), 0)
    except OSError:
        pass
    _held[key] = fd


def unlock_directory(directory: str | Path) -> None:
    """Release the lock :func:`lock_directory` took (nothing if this process holds none)."""
    fd = _held.pop(str(Path(directory).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


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
    """Write vitkit's model directory: ``model.safetensors`` (``state_dict``) and ``config.json`` (``config``),
    both or neither (:func:`atomic_files`)."""
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_files(directory) as stage:
        save_file(tensors, str(stage(WEIGHTS_NAME)), metadata={"format": "pt"})
        stage(CONFIG_NAME).write_text(json.dumps(dict(config), indent=2) + "\n")
    return directory


def read_json_object(path: str | Path, *, what: str = "a JSON object",
                     error: type[ValueError] = ValueError) -> dict[str, Any]:
    """The JSON object in ``path``; a file that is not valid JSON, or holds something other than an object, is
    ``error`` (a ``ValueError``; a reader passes its own, e.g. ``CheckpointError``) naming the file and
    saying what it holds instead of ``what``. The one reader of every JSON record vitkit takes as input."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise error(f"{path}: not a text file ({e})") from e
    if not isinstance(data, dict):
        raise error(f"{path}: expected {what}, got {type(data).__name__}")
    return data


def describe_os_error(e: OSError) -> str:
    """``No space left on device: /path`` rather than ``[Errno 28] No space left on device: b'/path'``."""
    name = e.filename.decode(errors="replace") if isinstance(e.filename, bytes) else e.filename
    return f"{e.strerror}: {name}" if e.strerror and name else str(e)


def fsync_dir(directory: str | Path) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where directories cannot be synced."""
    _fsync_dir(Path(directory))
