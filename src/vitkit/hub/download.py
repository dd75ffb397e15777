"""Fetching weights: Hugging Face Hub repos through ``huggingface_hub``, plain URLs into vitkit's cache.

Hub files use ``huggingface_hub``'s own cache, resumable downloads, tokens (``HF_TOKEN`` or
``huggingface-cli login``, for gated repos) and offline mode (``HF_HUB_OFFLINE=1``).

A URL is downloaded to ``<cache>/files/<hash of the URL>-<file name>``, where ``<cache>`` is
``$VITKIT_CACHE`` or the user cache directory (``$XDG_CACHE_HOME/vitkit``, ``~/.cache/vitkit``). Bytes
go to a ``.part`` file next to it, with a progress bar; an interrupted download resumes from the
``.part`` file with an HTTP Range request only when the server gave a validator (a strong ETag or
Last-Modified) that proves it still has the same file (``If-Range``, and the answer's own validator and
length are compared); without one, or for a ``.part`` nobody can vouch for, it starts over. The checksum
is verified on the complete ``.part`` file, and only a verified file is renamed into place. A checksum
mismatch deletes the ``.part`` file. A pinned checksum is compared again on every later use of the
cached file (its digest is remembered beside the cache, see :mod:`vitkit.hub.integrity`), and a file
whose server stated no length is checked for completeness (safetensors header, zip end record) before
it is cached and when it is used.

A download that receives less than 1 KiB in ``VITKIT_DOWNLOAD_STALL_S`` seconds (default 60) stops, as does
one that exceeds ``VITKIT_DOWNLOAD_DEADLINE_S`` in all (default: no limit); the partial file is kept for
the next try when it can be resumed. Two processes downloading one file take turns on a lock; the one
that waits says so.

Offline (``HF_HUB_OFFLINE=1`` or ``VITKIT_OFFLINE=1``, or no network), a cached file is used without any
network call and a missing one raises :class:`OfflineError`, a one-line message that says how to fetch it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
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
from vitkit.hub.integrity import blob_mismatch, digest, file_digest, incomplete_reason, remember

CHUNK = 1 << 20
ATTEMPTS = 3
"""Tries per URL download; each retry resumes where the last one stopped (when the server's validator allows)."""
TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 3.0
"""How long the Hub's host may take to accept a connection before vitkit treats the machine as offline."""
STALL_S = 60.0
"""Default stall deadline: a download that receives less than :data:`MIN_BYTES` in this many seconds stops."""
MIN_BYTES = 1024


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
class _Stalled(Exception):
    """The server sends too slowly (or nothing) for too long, or the total deadline passed."""


def stall_seconds() -> float:
    """How long a download may go with less than :data:`MIN_BYTES` arriving (``VITKIT_DOWNLOAD_STALL_S``)."""
    return _env_seconds("VITKIT_DOWNLOAD_STALL_S", STALL_S)


def deadline_seconds() -> float | None:
    """The most a whole download may take (``VITKIT_DOWNLOAD_DEADLINE_S``; unset or 0: no limit)."""
    value = _env_seconds("VITKIT_DOWNLOAD_DEADLINE_S", 0.0)
    return value or None


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={text!r}: expected a finite number of seconds >= 0")
    return value


def _records() -> Path:
    return cache_dir() / ".verified"


def download_url(url: str, *, checksum: Checksum | None = None, name: str | None = None,
                 progress: bool = True, attempts: int = ATTEMPTS, stall_s: float | None = None,
                 deadline_s: float | None = None) -> Path:
    """The cached, verified file for ``url``, downloading it first if needed (see the module docstring).

    ``checksum`` is the publisher's; a URL ending in ``#sha256=<hex>`` carries its own. It is compared
    with the cached file on every call, not only when downloading. ``name`` is what the user asked for,
    used in messages. ``stall_s`` (default :func:`stall_seconds`) and ``deadline_s`` (default
    :func:`deadline_seconds`) bound a slow download.
    """
    url, checksum = _split_fragment(url, checksum)
    what = name or url
    dest = url_cache_path(url)
    if dest.is_file():
        _check_cached(dest, checksum, what)
        return dest
    if is_offline():
        raise OfflineError(what, "not in vitkit's cache and offline mode is on (HF_HUB_OFFLINE/VITKIT_OFFLINE)",
                           fetch_hint(what, cache_dir()))
    stall_s = stall_seconds() if stall_s is None else stall_s
    deadline_s = deadline_seconds() if deadline_s is None else deadline_s
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(dest, what):
        if dest.is_file():  # another process finished it while we waited
            _check_cached(dest, checksum, what)
            return dest
        part = dest.with_name(dest.name + ".part")
        deadline = time.monotonic() + deadline_s if deadline_s else None
        problem = "no answer"
        for attempt in range(1, attempts + 1):
            try:
                complete = _fetch_into(url, part, what, progress, stall_s, deadline)
            except _Stalled as e:
                raise DownloadError(f"{what}: download of {url} {e}; {_resume_hint(part, what)}") from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                reason = getattr(e, "reason", None) or e
                if isinstance(e, urllib.error.HTTPError):
                    _discard(part)
                    raise DownloadError(f"{what}: {url} answered HTTP {e.code} {e.reason}") from None
                if attempt == attempts:
                    have = part.stat().st_size if part.exists() else 0
                    if not have and isinstance(e, urllib.error.URLError):
                        raise OfflineError(what, f"download of {url} failed ({reason})",
                                           _resume_hint(part, what)) from None
                    raise DownloadError(f"{what}: download of {url} failed ({reason}); {_resume_hint(part, what)}") \
                        from None
                time.sleep(min(2.0 ** attempt, 10.0) * 0.1)
                continue
            if not complete:
                problem = "the server sent more bytes than it announced"
                continue
            cut = None if checksum is not None else incomplete_reason(part)
            if cut is None:
                break
            # a server that states no length ends the file by closing the connection, whole or not
            problem = f"the connection closed before the end of the file ({cut}) and the server sent no length"
            _discard(part)
        else:
            raise DownloadError(f"{what}: download of {url} failed after {attempts} tries: {problem}; nothing was "
                                "cached")
        digests = _verify(part, checksum, what, url)
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(part, dest)
        _meta_path(part).unlink(missing_ok=True)
        remember(_records(), dest, digests)
    return dest


def _resume_hint(part: Path, what: str) -> str:
    have = part.stat().st_size if part.exists() else 0
    if have and _read_meta(part).get("validator"):
        return f"{have} bytes kept in {part}; run the same command again to resume"
    _discard(part)  # bytes that cannot be proven to belong to the same file are no use to the next try
    return f"run the same command again, or {fetch_hint(what, cache_dir())}"


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _meta_path(part).unlink(missing_ok=True)


def _check_cached(dest: Path, checksum: Checksum | None, what: str) -> None:
    """Refuse a cached file that does not match the pinned checksum, or that is visibly cut short."""
    if checksum is not None:
        got = digest(_records(), dest, checksum.algorithm)
        if not checksum.matches(got):
            raise ChecksumError(f"{what}: the cached file {dest} does not match the pinned checksum: expected "
                                f"{checksum}, got {checksum.algorithm} {got}; if the pin is right, delete {dest} "
                                f"and run 'vitkit download {what}' again")
        return
    cut = incomplete_reason(dest)
    if cut is not None:
        raise ChecksumError(f"{what}: the cached file {dest} is incomplete ({cut}): delete it and run "
                            f"'vitkit download {what}' again")


def _split_fragment(url: str, checksum: Checksum | None) -> tuple[str, Checksum | None]:
    base, _, fragment = url.partition("#")
    match = re.fullmatch(r"(sha256|md5)=([0-9a-fA-F]{6,64})", fragment)
    if match and checksum is None:
        checksum = Checksum(match.group(1), match.group(2).lower())  # type: ignore[arg-type]
    return base, checksum


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _validator(headers) -> str | None:
    """What proves a later response is the same file: a strong ETag, else Last-Modified (RFC 9110 If-Range)."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def _fetch_into(url: str, part: Path, what: str, progress: bool, stall_s: float, deadline: float | None) -> bool:
    """Append the rest of ``url`` to ``part``; True once ``part`` holds all the bytes the server sent.

    A partial file is continued only when its validator (ETag or Last-Modified, recorded when it was
    started) proves the server still has the same file: ``If-Range`` asks the server to check, and the
    206 answer's own validator and total length are compared too. Otherwise it starts over.
    """
    offset = part.stat().st_size if part.exists() else 0
    meta = _read_meta(part) if offset else {}
    if offset and not (meta.get("url") == url and meta.get("validator")):
        _discard(part)  # nothing proves these bytes are a prefix of the file the server has now
        offset, meta = 0, {}
    headers = {"User-Agent": "vitkit"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = meta["validator"]
    timeout = stall_s if stall_s > 0 else TIMEOUT_S
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # our partial file is no prefix the server knows: start over
            _discard(part)
            return _fetch_into(url, part, what, progress, stall_s, deadline)
        raise
    with response:
        validator = _validator(response.headers)
        if offset and response.status == 206:
            total = _total_from_range(response)
            if (_range_start(response) != offset or validator != meta["validator"]
                    or (meta.get("total") is not None and total != meta["total"])):
                response.close()  # a range of some other file: start over
                _discard(part)
                return _fetch_into(url, part, what, progress, stall_s, deadline)
            mode = "ab"
        else:  # 200: the server ignored the Range or the file changed (If-Range): start from the beginning
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            _write_meta(part, {"url": url, "validator": validator, "total": total})
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=what,
                   disable=not progress, leave=False)
        with bar, open(part, mode) as f:
            _copy(response, f, bar, stall_s, deadline)
    size = part.stat().st_size
    if total is not None and size < total:
        raise http.client.IncompleteRead(b"", total - size)
    if total is not None and size > total:
        _discard(part)
        return False
    return True


def _copy(response, f, bar, stall_s: float, deadline: float | None) -> None:
    """Copy the body to ``f``, giving up when less than :data:`MIN_BYTES` arrive in ``stall_s`` seconds
    (a server trickling a byte now and then never trips a per-read timeout) or the deadline passes."""
    window_start, window_bytes = time.monotonic(), 0
    while True:
        try:
            chunk = response.read1(CHUNK)
        except TimeoutError:
            raise _Stalled(f"stalled: nothing arrived for {stall_s:g} s (VITKIT_DOWNLOAD_STALL_S)") from None
        if not chunk:
            return
        f.write(chunk)
        bar.update(len(chunk))
        now = time.monotonic()
        if deadline is not None and now > deadline:
            raise _Stalled("did not finish within its deadline (VITKIT_DOWNLOAD_DEADLINE_S)")
        window_bytes += len(chunk)
        if stall_s > 0 and now - window_start >= stall_s:
            if window_bytes < MIN_BYTES:
                raise _Stalled(f"stalled: {window_bytes} bytes arrived in the last {now - window_start:.1f} s, "
                               f"under {MIN_BYTES} (VITKIT_DOWNLOAD_STALL_S={stall_s:g})")
            window_start, window_bytes = now, 0


def _range_start(response) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _total_from_range(response) -> int | None:
    match = re.match(r"bytes \d+-\d+/(\d+)", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _read_meta(part: Path) -> dict:
    try:
        meta = json.loads(_meta_path(part).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _write_meta(part: Path, meta: dict) -> None:
    _meta_path(part).write_text(json.dumps(meta))


def _verify(part: Path, checksum: Checksum | None, what: str, url: str) -> dict[str, str]:
    """Check ``part`` against ``checksum``; the digests computed, to remember beside the cached file."""
    digests = {"sha256": file_digest(part, "sha256")}
    if checksum is None:
        return digests
    got = digests.setdefault(checksum.algorithm, file_digest(part, checksum.algorithm))
    if not checksum.matches(got):
        _discard(part)
        raise ChecksumError(f"{what}: checksum mismatch for {url}: expected {checksum}, got {checksum.algorithm} "
                            f"{got}; the download was deleted (a proxy or a changed file?)")
    return digests


@contextmanager
def _lock(dest: Path, what: str) -> Iterator[None]:
    """An exclusive lock per destination, so that two processes do not write one ``.part`` file. Waiting for
    another process's download is said, not silent."""
    lock_path = cache_dir() / ".locks" / (dest.name + ".lock")  # kept apart: files/ holds verified files only
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        if fcntl is None:  # concurrent downloads of one file are then the user's risk
            yield
            return
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{what}: waiting for another process that is downloading it (lock {lock_path})", file=sys.stderr,
                  flush=True)
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
        path = Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=hf_cache_dir(),
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
    _check_hub_blob(path, what, f"{repo_id}/{filename}")
    return path


def _check_hub_blob(path: Path, what: str, label: str) -> None:
    """A Hub cache file must match its blob's name (the content's sha256, or git sha1): a truncated or damaged
    blob is refused with the file to delete, on download and on every use."""
    try:
        why = blob_mismatch(path, _records())
    except OSError as e:
        raise DownloadError(f"{what}: {label} in the Hugging Face cache cannot be read ({e})") from None
    if why is not None:
        blob = path.resolve()
        raise ChecksumError(f"{what}: {label} in the Hugging Face cache is damaged or incomplete "
                            f"({blob.stat().st_size} bytes; {why}, not its name): delete {blob} and run "
                            f"'vitkit download {what}' again")


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
