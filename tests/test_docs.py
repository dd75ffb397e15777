"""The docs stay true: every ```python block of README.md and docs/*.md runs, on CPU, in a fresh
directory, and must finish without error.

A block may be preceded by a ``<!-- doctest ... -->`` comment (invisible when the page is rendered)
holding YAML with two optional keys:

- ``setup``: Python run first in the block's namespace, to make what the prose assumes (a trained run
  on disk, a batch of ``images``, a checkpoint file in some format);
- ``replace``: ``[old, new]`` pairs applied to the block's text to shrink it to test size (fewer
  epochs, smaller models). Each ``old`` must occur in the block, so the doc cannot drift away from
  what is tested.

Nothing is skipped: a block that cannot run here has no place in the docs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VITKIT_DATA", REPO.parent / "shared" / "data"))
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

_BLOCK = re.compile(r"(?:<!--\s*doctest\s*\n(?P<meta>.*?)-->\s*\n)?```python\n(?P<code>.*?)```", re.S)


@dataclass(frozen=True)
class Snippet:
    page: Path
    line: int
    code: str
    setup: str
    replace: tuple[tuple[str, str], ...]

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def _snippets() -> list[Snippet]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in _BLOCK.finditer(text):
            meta = yaml.safe_load(match["meta"]) if match["meta"] else None
            meta = meta or {}
            unknown = set(meta) - {"setup", "replace"}
            assert not unknown, f"{page}: unknown doctest key(s) {sorted(unknown)}"
            line = text.count("\n", 0, match.start("code"))
            found.append(Snippet(page, line, match["code"], meta.get("setup", ""),
                                 tuple(tuple(pair) for pair in meta.get("replace", []))))
    return found


SNIPPETS = _snippets()


def test_the_docs_have_python_examples():
    assert len(SNIPPETS) >= 10
    assert {s.page.name for s in SNIPPETS} >= {"README.md", "convert.md", "training.md"}


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda s: s.id)
def test_python_example_runs(snippet: Snippet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    code = snippet.code
    for old, new in snippet.replace:
        assert old in code, f"{snippet.id}: doctest replacement {old!r} no longer matches the example"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VITKIT_DATA", str(DATA))
    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "__doctest__"}
    try:
        exec(compile(snippet.setup, f"{snippet.id} (setup)", "exec"), namespace)
        exec(compile(code, snippet.id, "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
