"""The docs stay true: every ```python block of README.md and docs/*.md runs, on CPU, in a fresh
directory, and must finish without error; and every result its comments state is what the code gives.

A comment that states a result follows the statement it describes (``logits = model(images)  # (2, 10)``)
and starts with one of: a shape ``(2, 10)`` (names such as ``B`` or ``heads`` stand for any size, the same
within one claim; ``1 + 196`` is computed), optionally ``per block:``/``list of`` (every tensor of a list) or
``.components`` (an attribute), or ``NAME:`` (another variable the statement assigned); a literal (``'tabby,
tabby cat'``, ``21545550``, a list with ``...`` for the elided middle or end); ``torch.Size([8, 10])`` or a
``Preprocessing(...)`` repr (what ``print``, or the value's repr, shows). Words after the claim are prose.

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

import ast
import contextlib
import io
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


def _is_slow(snippet: Snippet) -> bool:
    """Examples that load published weights (offline stand-ins of ViT-B size) or train: 15-45 s each under load."""
    text = snippet.setup + snippet.code
    return any(key in text for key in ("from_pretrained(", "pretrained=True", "train(", "resume("))


@pytest.mark.parametrize("snippet", [pytest.param(s, marks=[pytest.mark.slow] if _is_slow(s) else [])
                                     for s in SNIPPETS], ids=lambda s: s.id)
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
        run_and_check_claims(code, snippet.id, namespace)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ stated results
_CLAIM = re.compile(r"""^(?P<prefix>per\ block:\s*|list\ of\s*|\.components\s*|(?P<name>[A-Za-z_]\w*):\s*)?
                        (?P<claim>torch\.Size\(\[[^\]]*\]\)|Preprocessing\(.*|\(.*?\)|\[.*\]|'[^']*'|"[^"]*"|-?\d+)
                        (?=$|[\s,:;])  # a claim ends there: "24x24 tokens" is prose""",
                    re.X)


@dataclass(frozen=True)
class Claim:
    line: int
    prefix: str
    name: str | None
    text: str


def find_claims(code: str) -> dict[int, Claim]:
    """The result comments of ``code``, by line (1-based); a ``Preprocessing(`` repr may go on over the next
    comment-only lines."""
    lines = code.splitlines()
    claims = {}
    for number, line in enumerate(lines, 1):
        if "  #" not in line or line.lstrip().startswith("#"):
            continue
        comment = line.split("  #", 1)[1].strip()
        match = _CLAIM.match(comment)
        if match is None:
            continue
        text = match["claim"]
        if text.startswith("Preprocessing("):
            following = number
            while text.count("(") > text.count(")") and following < len(lines):
                text += " " + lines[following].strip().lstrip("#").strip()
                following += 1
        claims[number] = Claim(number, (match["prefix"] or "").strip(), match["name"], text)
    return claims


def run_and_check_claims(code: str, where: str, namespace: dict) -> int:
    """Run ``code`` statement by statement and check each stated result right after its statement; returns how
    many were checked. A claim inside a compound statement cannot be checked and is an error."""
    tree = ast.parse(code)
    claims = find_claims(code)
    checked = 0
    for stmt in tree.body:
        inside = [c for n, c in claims.items() if stmt.lineno <= n <= stmt.end_lineno]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed) if inside else contextlib.nullcontext():
            exec(compile(ast.Module([stmt], type_ignores=[]), where, "exec"), namespace)
        for claim in inside:
            assert not isinstance(stmt, (ast.For, ast.While, ast.With, ast.If, ast.FunctionDef, ast.Try)), (
                f"{where}:{claim.line}: a stated result inside a block cannot be checked")
            _check(claim, _value_of(stmt, claim, namespace, printed.getvalue()), f"{where}:{claim.line}")
            checked += 1
    return checked


_PRINTED = object()


def _value_of(stmt: ast.stmt, claim: Claim, namespace: dict, printed: str):
    if claim.name is not None:
        return namespace[claim.name]
    if isinstance(stmt, ast.Expr) and getattr(getattr(stmt.value, "func", None), "id", "") == "print":
        return (_PRINTED, printed.strip())
    if isinstance(stmt, ast.Expr):  # evaluated again: the docs' expressions are pure look-ups
        return eval(compile(ast.Expression(stmt.value), "<claim>", "eval"), namespace)
    if isinstance(stmt, ast.Assign):
        target = stmt.targets[0]
        if isinstance(target, ast.Tuple):
            target = target.elts[0]
        return namespace[target.id]
    raise AssertionError(f"cannot tell which value the comment describes: {ast.dump(stmt)[:80]}")


def _check(claim: Claim, value, where: str) -> None:
    text = claim.text
    if isinstance(value, tuple) and value and value[0] is _PRINTED:
        assert value[1] == text, f"{where}: prints {value[1]!r}, the docs say {text!r}"
        return
    if claim.prefix == ".components":
        value = value.components
    if text.startswith(("torch.Size(", "Preprocessing(")):
        assert " ".join(repr(value).split()) == " ".join(text.split()), f"{where}: is {value!r}, the docs say {text}"
        return
    if text.startswith("("):
        tensors = list(value) if isinstance(value, (list, tuple)) else [value]
        assert tensors, f"{where}: an empty list"
        for tensor in tensors:
            _check_shape(tuple(tensor.shape), text, where)
        return
    expected = ast.literal_eval(text)
    if isinstance(expected, list) and Ellipsis in expected:
        cut = expected.index(Ellipsis)
        head, tail = expected[:cut], expected[cut + 1:]
        assert list(value[:len(head)]) == head and (not tail or list(value[-len(tail):]) == tail), (
            f"{where}: is {value!r}, the docs say {text}")
        return
    assert value == expected, f"{where}: is {value!r}, the docs say {text}"


def _check_shape(shape: tuple[int, ...], text: str, where: str) -> None:
    parts = [p.strip() for p in text.strip("()").split(",") if p.strip()]
    assert len(parts) == len(shape), f"{where}: shape {shape}, the docs say {text}"
    bound: dict[str, int] = {}
    for part, size in zip(parts, shape):
        if re.fullmatch(r"[\d\s+*-]+", part):
            assert eval(part) == size, f"{where}: shape {shape}, the docs say {text}"  # arithmetic of literals only
        else:
            assert bound.setdefault(part, size) == size, f"{where}: shape {shape}, the docs say {text} ({part})"


def test_the_claim_checker_catches_a_wrong_result():
    """The check can fail: a wrong shape, a wrong literal, a wrong print and an inconsistent name all do."""
    namespace: dict = {}
    good = ("import torch\nx = torch.zeros(2, 10)  # (2, 10)\ny = torch.zeros(3, 5, 5)  # (B, H, H) prose\n"
            "names = ['a', 'b', 'c']\nnames  # ['a', ..., 'c']\nprint(x.shape)  # torch.Size([2, 10])\n"
            "maps = [x, x]  # per block: (2, 5 * 2)\n")
    assert run_and_check_claims(good, "good", namespace) == 5
    for wrong in ("x = torch.zeros(2, 10)  # (2, 11)", "y = torch.zeros(3, 5, 6)  # (B, H, H)",
                  "names = ['a', 'b']\nnames  # ['a', ..., 'c']", "print(7)  # 8", "s = 'cat'  # 'dog'"):
        with pytest.raises(AssertionError):
            run_and_check_claims("import torch\n" + wrong, "wrong", {})


def test_the_docs_state_results_that_are_checked():
    """The README's and the docs' stated results are found (each is then checked where its snippet runs)."""
    found = {s.id: find_claims(s.code) for s in SNIPPETS}
    total = sum(len(c) for c in found.values())
    assert total >= 15, total
    readme = [c.text for s in SNIPPETS if s.page.name == "README.md" for c in find_claims(s.code).values()]
    assert "(2, 10)" in readme and "(B, 1 + 196, 768)" in readme
