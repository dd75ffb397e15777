"""The vitkit command as the user typed it, for the commands a run prints (``continue with: ...``).

A README user runs ``.venv/bin/vitkit`` or ``python -m vitkit``; printing a bare ``vitkit`` would give them
``command not found``. The interpreter's own argument list (``sys.orig_argv``) says which it was.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path


def vitkit_command(*args: str) -> str:
    """``vitkit ARGS`` spelled as this process was started: ``python -m vitkit ...`` after ``-m vitkit``,
    the script's path as given when ``vitkit`` is not the one on PATH, ``torchrun ... -m vitkit`` under
    torchrun, and plain ``vitkit`` otherwise (vitkit used as a library)."""
    return shlex.join([*_invocation(), *args])


def _invocation() -> list[str]:
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:  # started by torchrun: resume the same way
        return ["torchrun", f"--nproc-per-node={os.environ.get('LOCAL_WORLD_SIZE', '1')}", "-m", "vitkit"]
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    for i, arg in enumerate(argv[1:-1], 1):
        if arg == "-m" and argv[i + 1] in ("vitkit", "vitkit.__main__"):
            return [argv[0], "-m", "vitkit"]
    script = sys.argv[0] if sys.argv else ""
    if Path(script).stem == "vitkit":  # the console script (vitkit, vitkit.exe, vitkit-script.py on Windows)
        on_path = shutil.which("vitkit")
        if on_path is not None and Path(on_path).resolve() == Path(script).resolve():
            return ["vitkit"]
        return [script]
    return ["vitkit"]
