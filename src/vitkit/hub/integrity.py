"""Whether a cached file is the whole, right file: digests remembered beside the cache, a Hugging Face blob
checked against its content-addressed name, and a completeness check for files whose length nobody stated.

A checksum that is checked only when the file is downloaded protects nothing afterwards: a file replaced,
truncated or pinned to another digest later would be used unchecked. So the digest of a cached file is
kept as a small record (size, modification time, digests) in a ``.verified/`` folder of the cache, and
each use compares the file's size and time with the record: the file is hashed again only when they
changed (or no record exists), and its digest is then compared with the pin.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

from vitkit.fileio import atomic_write_text

CHUNK = 1 << 20


def file_digest(path: Path, algorithm: str) -> str:
    """The hex digest of ``path``'s bytes (``sha256``, ``md5``, ...)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _record_path(records: Path, path: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return records / f"{key}.json"


def _stamp(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def remember(records: Path, path: Path, digests: dict[str, str]) -> None:
    """Record ``digests`` (algorithm -> hex) of ``path`` as it is now; a cache that cannot be written is no error."""
    try:
        atomic_write_text(json.dumps({**_stamp(path), "digests": digests}), _record_path(records, path))
    except OSError:
        pass


def digest(records: Path, path: Path, algorithm: str) -> str:
    """``path``'s digest: from its record when the file's size and time still match it, else hashed (and recorded)."""
    record_path = _record_path(records, path)
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        record = {}
    stamp = _stamp(path)
    known = record.get("digests", {}) if all(record.get(k) == v for k, v in stamp.items()) else {}
    if algorithm in known:
        return known[algorithm]
    value = file_digest(path, algorithm)
    remember(records, path, {**known, algorithm: value})
    return value


def blob_mismatch(path: Path, records: Path) -> str | None:
    """For a file in the Hugging Face cache, why its bytes do not match its blob's name (None: they match,
    or the name is no digest). LFS blobs are named by the sha256 of their content, git blobs by git's sha1."""
    blob = Path(path).resolve()
    name = blob.name
    if re.fullmatch(r"[0-9a-f]{64}", name):
        got = digest(records, blob, "sha256")
        return None if got == name else f"its sha256 is {got}"
    if re.fullmatch(r"[0-9a-f]{40}", name):
        size = blob.stat().st_size
        git = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
        with open(blob, "rb") as f:
            while chunk := f.read(CHUNK):
                git.update(chunk)
        return None if git.hexdigest() == name else f"its git sha1 is {git.hexdigest()}"
    return None


def incomplete_reason(path: Path) -> str | None:
    """Why ``path`` is visibly cut short (None: whole, or a format whose length cannot be told from its bytes).

    safetensors states the length of its data in its header; a zip archive (torch's ``.pt``/``.pth``, numpy's
    ``.npz``) ends with an end-of-central-directory record. A legacy pickle has no such mark.
    """
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] == b"PK\x03\x04":
            f.seek(max(0, size - (1 << 16) - 22))
            if b"PK\x05\x06" not in f.read():
                return f"{size} bytes, and the zip archive has no end record"
            return None
        if len(head) < 8:
            return f"{size} bytes" if size else "empty"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > 100_000_000 or f.read(1) != b"{":
            return None  # not safetensors
        f.seek(8)
        raw = f.read(header_len)
    if len(raw) < header_len:
        return f"{size} bytes, shorter than its safetensors header"
    try:
        header = json.loads(raw)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    expected = 8 + header_len + end
    return f"{size} of the {expected} bytes its safetensors header states" if size < expected else None
