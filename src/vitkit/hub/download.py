"""Fetching weights: Hugging Face Hub repos through ``huggingface_hub``, plain URLs into vitkit's cache.

Hub files use ``huggingface_hub``'s own cache, resumable downloads, tokens (``HF_TOKEN`` or
``huggingface-cli login``, for gated repos) and offline mode (``HF_HUB_OFFLINE=1``).

A URL is downloaded to ``<cache>/files/<hash of the URL>-<file name>``, where ``<cache>`` is
``$VITKIT_CACHE`` or the user cache directory (``$XDG_CACHE_HOME/vitkit``, ``~/.cache/vitkit``). Bytes
go to a ``.part`` file next to it, with a progress bar; an interrupted download resumes from the
``.part`` file with an HTTP Range request where the server allows it (``If-Range`` guards against a
file that changed meanwhile). The checksum is verified on the complete ``.part`` file, and only a
verified file is renamed into place: whatever sits at the final path has been checked, so a later
call uses it without network. A checksum mismatch deletes the ``.part`` file.

Offline (``HF_HUB_OFFLINE=1`` or ``VITKIT_OFFLINE=1``, or no network), a cached file is used without any
network call and a missing one raises :class:`OfflineError`, a one-line message that says how to fetch it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm.auto import tqdm

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]

from vitkit.errors import ChecksumError, DownloadError, OfflineError
from vitkit.hub.catalog import Checksum

CHUNK = 1 << 20
ATTEMPTS = 3
"""Tries per URL download; each retry resumes where the last one stopped."""
TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 3.0
"""How long the Hub's host may take to accept a connection before vitkit treats the machine as offline."""


# ----------------------------------------------------------------------------------- settings
def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def is_offline() -> bool:
    """Whether vitkit must not touch the network (``HF_HUB_OFFLINE``/``VITKIT_OFFLINE``, read at call time)."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or _env_true("VITKIT_OFFLINE") \
        or bool(constants.HF_HUB_OFFLINE)


_REACHABLE: dict[tuple[str, int], bool] = {}


def hub_offline_reason() -> str | None:
    """Why the Hub may not be used, or None. Besides the offline switches, one TCP connection to the Hub's host
    (``PROBE_TIMEOUT_S``, once per process): without a network ``huggingface_hub`` retries each request with
    back-off (ten "Retrying in 8s" lines and 24-48 s before an error), where a cached file or one clear line
    is all there is to give."""
    if is_offline():
        return "offline mode is on (HF_HUB_OFFLINE/VITKIT_OFFLINE)"
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    proxy = None if urllib.request.proxy_bypass(host) else urllib.request.getproxies().get(endpoint.scheme)
    first_hop = urllib.parse.urlsplit(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else endpoint
    address = (first_hop.hostname or host, first_hop.port or (443 if first_hop.scheme == "https" else 80))
    if address not in _REACHABLE:
        try:
            with socket.create_connection(address, timeout=PROBE_TIMEOUT_S):
                _REACHABLE[address] = True
        except OSError:
            _REACHABLE[address] = False
    if _REACHABLE[address]:
        return None
    return f"the Hugging Face Hub ({host}{f', through the proxy {proxy}' if proxy else ''}) cannot be reached"


def cache_dir() -> Path:
    """vitkit's download cache: ``$VITKIT_CACHE``, else the user cache directory."""
    if os.environ.get("VITKIT_CACHE"):
        return Path(os.environ["VITKIT_CACHE"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "vitkit"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "vitkit" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitkit"


def hf_cache_dir() -> Path:
    """Where ``huggingface_hub`` keeps its files (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def url_cache_path(url: str) -> Path:
    """The cache path of ``url``'s file (the same URL always maps to the same path)."""
    bare = url.split("#", 1)[0]
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", bare.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]) or "download"
    return cache_dir() / "files" / f"{hashlib.sha256(bare.encode()).hexdigest()[:16]}-{name}"


def fetch_hint(what: str, cache: Path) -> str:
    """How to get ``what`` onto an offline machine."""
    return (f"run 'vitkit download {what}' on a machine with internet and copy {cache} here "
            "(or pass a local file instead)")


# ------------------------------------------------------------------------------------ URLs
def download_url(url: str, *, checksum: Checksum | None = None, name: str | None = None,
                 progress: bool = True, attempts: int = ATTEMPTS) -> Path:
    """The cached, verified file for ``url``, downloading it first if needed (see the module docstring).

    ``checksum`` is the publisher's; a URL ending in ``#sha256=<hex>`` carries its own.
    ``name`` is what the user asked for, used in messages.
    """
    url, checksum = _split_fragment(url, checksum)
    what = name or url
    dest = url_cache_path(url)
    if dest.is_file():
        return dest
    if is_offline():
        raise OfflineError(what, "not in vitkit's cache and offline mode is on (HF_HUB_OFFLINE/VITKIT_OFFLINE)",
                           fetch_hint(what, cache_dir()))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(dest):
        if dest.is_file():  # another process finished it while we waited
            return dest
        part = dest.with_name(dest.name + ".part")
        for attempt in range(1, attempts + 1):
            try:
                complete = _fetch_into(url, part, what, progress)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                reason = getattr(e, "reason", None) or e
                if isinstance(e, urllib.error.HTTPError):
                    part.unlink(missing_ok=True)
                    _meta_path(part).unlink(missing_ok=True)
                    raise DownloadError(f"{what}: {url} answered HTTP {e.code} {e.reason}") from None
                if attempt == attempts:
                    have = part.stat().st_size if part.exists() else 0
                    hint = (f"{have} bytes kept in {part}; run the same command again to resume"
                            if have else fetch_hint(what, cache_dir()))
                    if not have and isinstance(e, urllib.error.URLError):
                        raise OfflineError(what, f"download of {url} failed ({reason})", hint) from None
                    raise DownloadError(f"{what}: download of {url} failed ({reason}); {hint}") from None
                time.sleep(min(2.0 ** attempt, 10.0) * 0.1)
                continue
            if complete:
                break
        _verify(part, checksum, what, url)
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(part, dest)
        _meta_path(part).unlink(missing_ok=True)
    return dest


def _split_fragment(url: str, checksum: Checksum | None) -> tuple[str, Checksum | None]:
    base, _, fragment = url.partition("#")
    match = re.fullmatch(r"(sha256|md5)=([0-9a-fA-F]{6,64})", fragment)
    if match and checksum is None:
        checksum = Checksum(match.group(1), match.group(2).lower())  # type: ignore[arg-type]
    return base, checksum


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _fetch_into(url: str, part: Path, what: str, progress: bool) -> bool:
    """Append the rest of ``url`` to ``part``; True once ``part`` holds the whole file."""
    offset = part.stat().st_size if part.exists() else 0
    meta = _read_meta(part) if offset else {}
    headers = {"User-Agent": "vitkit"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if meta.get("validator"):
            headers["If-Range"] = meta["validator"]
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # our partial file is no prefix the server knows: start over
            part.unlink()
            return False
        raise
    with response:
        if offset and response.status == 206 and _range_start(response) == offset:
            mode, total = "ab", _total_from_range(response)
        else:  # 200: the server ignored the Range (or the file changed): start from the beginning
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        _write_meta(part, {"url": url, "validator": validator, "total": total})
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=what,
                   disable=not progress, leave=False)
        with bar, open(part, mode) as f:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size < total:
        raise http.client.IncompleteRead(b"", total - size)
    if total is not None and size > total:
        part.unlink()
        return False
    return True


def _range_start(response) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _total_from_range(response) -> int | None:
    match = re.match(r"bytes \d+-\d+/(\d+)", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _read_meta(part: Path) -> dict:
    try:
        return json.loads(_meta_path(part).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_meta(part: Path, meta: dict) -> None:
    _meta_path(part).write_text(json.dumps(meta))


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(part: Path, checksum: Checksum | None, what: str, url: str) -> None:
    if checksum is None:
        return
    digest = file_digest(part, checksum.algorithm)
    if not checksum.matches(digest):
        part.unlink(missing_ok=True)
        _meta_path(part).unlink(missing_ok=True)
        raise ChecksumError(f"{what}: checksum mismatch for {url}: expected {checksum}, got {checksum.algorithm} "
                            f"{digest}; the download was deleted (a proxy or a changed file?)")


@contextmanager
def _lock(dest: Path) -> Iterator[None]:
    """An exclusive lock per destination, so that two processes do not write one ``.part`` file."""
    lock_path = cache_dir() / ".locks" / (dest.name + ".lock")  # kept apart: files/ holds verified files only
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        if fcntl is None:  # concurrent downloads of one file are then the user's risk
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------- Hugging Face
WEIGHT_CANDIDATES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
"""What a Hub repo's weights may be called, in order of preference (safetensors first)."""
METADATA_FILES = ("config.json", "preprocessor_config.json")


def download_hub_file(repo_id: str, filename: str, *, revision: str | None = None, name: str | None = None,
                      required: bool = True) -> Path | None:
    """One file of a Hub repo through ``huggingface_hub`` (its cache, resume, token, offline mode).

    Returns None for a file the repo does not have when ``required`` is False.
    """
    what = name or f"hf-hub:{repo_id}"
    offline = hub_offline_reason()
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=hf_cache_dir(),
                                    local_files_only=offline is not None, library_name="vitkit"))
    except LocalEntryNotFoundError:
        if not required:
            return None
        why = offline or "the Hub cannot be reached"
        raise OfflineError(what, f"{repo_id}/{filename} is not in the Hugging Face cache and {why}",
                           fetch_hint(what, hf_cache_dir())) from None
    except GatedRepoError:
        raise DownloadError(f"{what}: {repo_id} is gated: accept its terms on huggingface.co and log in "
                            "(huggingface-cli login, or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise DownloadError(f"{what}: no Hugging Face repo {repo_id!r} (or it is private: log in with "
                            "huggingface-cli login, or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise DownloadError(f"{what}: {repo_id} has no revision {revision!r}") from None
    except EntryNotFoundError:
        if required:
            raise DownloadError(f"{what}: {repo_id} has no file {filename}") from None
        return None
    except HfHubHTTPError as e:
        raise DownloadError(f"{what}: downloading {filename} from {repo_id} failed ({e})") from None


def download_hub_repo(repo_id: str, *, revision: str | None = None, name: str | None = None) -> Path:
    """The local snapshot directory of a model repo: its ``config.json``, ``preprocessor_config.json`` if any,
    and its weights (safetensors if the repo has them, else ``pytorch_model.bin``, read without unpickling code)."""
    what = name or f"hf-hub:{repo_id}"
    config = download_hub_file(repo_id, "config.json", revision=revision, name=what)
    assert config is not None
    download_hub_file(repo_id, "preprocessor_config.json", revision=revision, name=what, required=False)
    for candidate in WEIGHT_CANDIDATES:
        found = download_hub_file(repo_id, candidate, revision=revision, name=what, required=False)
        if found is None:
            continue
        if candidate.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(found.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise DownloadError(f"{what}: {candidate} of {repo_id} is not a sharding index ({e})") from None
            for shard in shards:
                download_hub_file(repo_id, shard, revision=revision, name=what)
        return config.parent
    tried = ", ".join(WEIGHT_CANDIDATES)
    offline = hub_offline_reason()
    if offline is not None:
        raise OfflineError(what, f"the weights of {repo_id} ({tried}) are not in the Hugging Face cache and {offline}",
                           fetch_hint(what, hf_cache_dir()))
    raise DownloadError(f"{what}: {repo_id} has none of {tried}")
