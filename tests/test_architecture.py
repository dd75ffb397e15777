"""The floor plan holds: layers import downward only, no import cycles, no imports hidden in functions,
and ruff is clean. The contracts live in pyproject.toml ([tool.importlinter], [tool.ruff])."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
BIN = Path(sys.executable).parent

# Imports allowed inside functions: optional or slow dependencies that most uses of vitkit never need.
LAZY_ALLOWED = ("timm", "torch.utils.tensorboard", "matplotlib", "onnx", "aiohttp")  # onnx*: the [onnx] extra
# The command line imports each command's modules when that command runs (lint-imports still sees them):
# parsing, --help and --version import no torch.
LAZY_MODULES = {"src/vitkit/cli.py": ("vitkit.",)}


def _tool(name: str) -> Path:
    path = BIN / name
    if not path.is_file():
        pytest.fail(f"{path} not found: install the test extra (pip install -e '.[test]')")
    return path


def _run(args: list[str | Path], pythonpath: Path = SRC) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    """fileio < config < models < checkpoint < data/convert < resolver < analysis/evaluation/bench < train <
    commands < cli (the full order is in pyproject.toml)."""
    result = _run([_tool("lint-imports"), "--no-cache"])
    assert result.returncode == 0, f"lint-imports failed:\n{result.stdout}\n{result.stderr}"
    assert "2 kept, 0 broken" in result.stdout


def test_import_contracts_catch_an_upward_import_and_a_cycle(tmp_path):
    """The contracts can fail: a model file that imports the checkpoint module breaks both."""
    copy = tmp_path / "src"
    shutil.copytree(SRC / "vitkit", copy / "vitkit", ignore=shutil.ignore_patterns("__pycache__"))
    vit = copy / "vitkit" / "models" / "vit.py"
    vit.write_text(vit.read_text() + "\nfrom vitkit.checkpoint import load_weights  # noqa\n")
    result = _run([_tool("lint-imports"), "--no-cache"], pythonpath=copy)
    assert result.returncode != 0
    assert "vitkit.models is not allowed to import vitkit.checkpoint" in result.stdout, result.stdout
    assert "No cycles are allowed in vitkit." in result.stdout, result.stdout


def test_no_imports_hidden_in_functions():
    """Imports sit at the top of a module; only optional or slow dependencies may be imported lazily."""
    hidden = []
    for path in sorted((SRC / "vitkit").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                allowed = LAZY_ALLOWED + LAZY_MODULES.get(str(path.relative_to(ROOT)), ())
                for name in names:
                    if not name.startswith(allowed):
                        hidden.append(f"{path.relative_to(ROOT)}:{node.lineno}: import {name} inside {func.name}()")
    assert not hidden, "imports inside functions:\n" + "\n".join(hidden)


def test_ruff_is_clean():
    result = _run([_tool("ruff"), "check", "--no-cache", "src", "tests", "benchmarks"])
    assert result.returncode == 0, f"ruff check failed:\n{result.stdout}\n{result.stderr}"
