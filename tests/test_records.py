"""Config records, one engine and one way (issue 25): one reader of JSON objects, one to_dict style."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitkit.checkpoint import CheckpointError, read_config
from vitkit.config import ViTConfig
from vitkit.data.sources import read_meta
from vitkit.fileio import read_json_object

SRC = Path(__file__).resolve().parents[1] / "src" / "vitkit"


def test_one_reader_of_json_objects():
    """Before: five copies of "read JSON, check it is an object", each with its own message."""
    copies = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "not valid JSON" in p.read_text()]
    assert copies == ["cli.py", "fileio.py"]  # cli.py: a flag's value (--stem '{...}'), not a file


@pytest.mark.parametrize("text, message", [("{oops", "not valid JSON"), ("[1, 2]", "expected .*, got list")])
def test_every_json_record_is_read_with_the_same_errors(tmp_path, text, message):
    directory = tmp_path / "d"
    directory.mkdir()
    for name in ("config.json", "meta.json", "record.json"):
        (directory / name).write_text(text)
    with pytest.raises(CheckpointError, match=rf"config\.json: {message}"):
        read_config(directory)
    with pytest.raises(ValueError, match=rf"meta\.json: {message}"):
        read_meta(directory)
    with pytest.raises(ValueError, match=rf"record\.json: {message}"):
        ViTConfig.from_json(directory / "record.json")
    with pytest.raises(ValueError, match=rf"record\.json: {message}"):
        read_json_object(directory / "record.json")
    (directory / "record.json").write_text(json.dumps({"a": 1}))
    assert read_json_object(directory / "record.json") == {"a": 1}
