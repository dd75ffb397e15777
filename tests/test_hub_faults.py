"""Hostile servers and damaged caches (issue 26, items 1-6; docs/failures.md "Downloads and caches").

Every server here is a small threaded ``http.server`` on 127.0.0.1 that can leave out ETag and
Content-Length, break off mid-file, trickle one byte at a time, ignore ``If-Range`` and change the file
between requests. Stall deadlines are set to fractions of a second so each test runs in seconds. The
weights are a tiny model with a known answer (its own logits).
"""

from __future__ import annotations

import fcntl
import hashlib
import http.server
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

import vitkit
from hub_layout import write_hf_cache
from vitkit.cli import main as cli_main
from vitkit.convert import save_as
from vitkit.hub import ChecksumError, DownloadError, cache_dir, download_url, url_cache_path
from vitkit.models.registry import build_registered as create_registered


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Refuse every connection except to 127.0.0.1 (the test's own server)."""
    real_connect = socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"network call to {address} during a test")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture
def caches(tmp_path, monkeypatch):
    vitkit_cache, hf_cache = tmp_path / "vitkit-cache", tmp_path / "hf-cache"
    monkeypatch.setenv("VITKIT_CACHE", str(vitkit_cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    for name in ("HF_HUB_OFFLINE", "VITKIT_OFFLINE", "TRANSFORMERS_OFFLINE", "VITKIT_DOWNLOAD_STALL_S",
                 "VITKIT_DOWNLOAD_DEADLINE_S"):
        monkeypatch.delenv(name, raising=False)
    return vitkit_cache, hf_cache


class Hostile:
    """One file per path over HTTP on 127.0.0.1, misbehaving on request.

    ``etag``: send a strong ETag (the file's hash), else no validator at all; ``length``: send
    Content-Length; ``cut``: how many responses break off halfway; ``trickle_s``: seconds between single
    bytes; ``silent_s``: seconds of silence after the headers; ``if_range``: honour If-Range (a stale
    validator gets the whole new file with 200), else answer every Range with 206 regardless.
    """

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.etag, self.length, self.if_range = True, True, True
        self.cut, self.trickle_s, self.silent_s = 0, 0.0, 0.0
        self.requests: list[dict[str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                tag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
                rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
                outer.requests.append({"Range": rng, "If-Range": if_range})
                start = 0
                if rng and (not outer.if_range or not if_range or (outer.etag and if_range == tag)):
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                if outer.length:
                    self.send_header("Content-Length", str(len(data) - start))
                if outer.etag:
                    self.send_header("ETag", tag)
                self.end_headers()
                body = data[start:]
                if outer.cut > 0:
                    outer.cut -= 1
                    body = body[: len(body) // 2]
                try:
                    if outer.silent_s:
                        time.sleep(outer.silent_s)
                    if outer.trickle_s:
                        for i in range(len(body)):
                            self.wfile.write(body[i:i + 1])
                            self.wfile.flush()
                            time.sleep(outer.trickle_s)
                    else:
                        self.wfile.write(body)
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:  # the client gave up
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.trickle_s = self.silent_s = 0.0
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def _mini(seed: int) -> tuple[bytes, torch.nn.Module, Path]:
    torch.manual_seed(seed)
    model = create_registered("vit_mini_patch4_32").eval()
    import tempfile

    path = save_as(model, Path(tempfile.mkdtemp()) / "mini.safetensors", "timm")
    return path.read_bytes(), model, path


@pytest.fixture(scope="module")
def two_files():
    """Two different tiny models saved as timm safetensors files of the same size."""
    a, b = _mini(0), _mini(1)
    assert len(a[0]) == len(b[0]) and a[0] != b[0]
    return a, b


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


# ------------------------------------------------------------- 1: a pinned checksum on every use
def test_pinned_checksum_is_checked_on_every_use_of_a_cached_file(two_files, caches, tmp_path, capsys):
    (data, _, _), _ = two_files
    sha = hashlib.sha256(data).hexdigest()
    with Hostile({"/mini.safetensors": data}) as server:
        url = server.url("/mini.safetensors")
        path = download_url(url, progress=False)  # cached without a pin
        # the same URL pinned to another digest: refused, naming the cached file to delete
        with pytest.raises(ChecksumError) as info:
            download_url(url + "#sha256=" + "ab" * 32, progress=False)
        message = str(info.value)
        assert "\n" not in message and str(path) in message and "delete" in message
        assert download_url(url + "#sha256=" + sha, progress=False) == path  # the right pin passes
        # the cached file changed after it was verified: the pin catches it
        damaged = bytearray(data)
        damaged[-1] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with pytest.raises(ChecksumError, match="does not match the pinned checksum"):
            download_url(url + "#sha256=" + sha, progress=False)
        # through predict: exit 2, one line
        image = tmp_path / "x.png"
        from PIL import Image

        Image.new("RGB", (32, 32), (10, 20, 30)).save(image)
        assert cli_main(["predict", url + "#sha256=" + sha, str(image)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "does not match the pinned checksum" in err and str(path) in err
    assert len(server.requests) == 1  # the checks read the cache, never the network


# ------------------------------------------------------------------- 2: resume proves the object
def test_resume_without_a_validator_starts_over_instead_of_splicing_two_files(two_files, caches):
    (old, _, _), (new, new_model, _) = two_files
    with Hostile({"/m.safetensors": old}) as server:
        server.etag, server.cut = False, 1  # no ETag, no Last-Modified: nothing proves a later file is the same
        url = server.url("/m.safetensors")
        with pytest.raises(DownloadError):
            download_url(url, progress=False, attempts=1)
        server.files["/m.safetensors"] = new  # the file changes on the server
        server.requests.clear()
        path = download_url(url, progress=False)
        assert path.read_bytes() == new
        assert server.requests == [{"Range": None, "If-Range": None}]  # no Range without a validator
    x = torch.randn(2, 3, 32, 32)
    loaded = vitkit.from_pretrained(str(path), num_heads=2)
    torch.testing.assert_close(_logits(loaded, x), _logits(new_model, x), atol=0, rtol=0)


def test_a_part_file_of_unrelated_bytes_is_not_appended_to(two_files, caches):
    (data, _, _), _ = two_files
    with Hostile({"/m.safetensors": data}) as server:
        url = server.url("/m.safetensors")
        part = url_cache_path(url).with_name(url_cache_path(url).name + ".part")
        part.parent.mkdir(parents=True)
        part.write_bytes(b"unrelated bytes from some other download")
        assert download_url(url, progress=False).read_bytes() == data
        assert server.requests == [{"Range": None, "If-Range": None}]


def test_resume_with_an_etag_continues_the_same_file_and_restarts_a_changed_one(two_files, caches):
    (old, _, _), (new, _, _) = two_files
    with Hostile({"/m.safetensors": old}) as server:
        url = server.url("/m.safetensors")
        server.cut = 1
        with pytest.raises(DownloadError, match="run the same command again to resume"):
            download_url(url, progress=False, attempts=1)
        server.requests.clear()
        assert download_url(url, progress=False).read_bytes() == old  # the same file: resumed
        assert server.requests[0]["Range"] == f"bytes={len(old) // 2}-" and server.requests[0]["If-Range"]
        url_cache_path(url).unlink()
        # cut again, then the file changes and the server ignores If-Range (answers 206 with the new ETag)
        server.cut = 1
        with pytest.raises(DownloadError):
            download_url(url, progress=False, attempts=1)
        server.files["/m.safetensors"], server.if_range = new, False
        server.requests.clear()
        assert download_url(url, progress=False).read_bytes() == new
        assert [r["Range"] for r in server.requests] == [f"bytes={len(old) // 2}-", None]


# ----------------------------------------------------------- 3: a cut download without a length
def test_a_cut_download_without_content_length_is_not_cached(two_files, caches, tmp_path, capsys):
    (data, model, _), _ = two_files
    with Hostile({"/m.safetensors": data}) as server:
        server.length, server.etag, server.cut = False, False, 5  # HTTP/1.0, the end is the connection closing
        url = server.url("/m.safetensors")
        with pytest.raises(DownloadError, match="connection closed before the end of the file") as info:
            download_url(url, progress=False, attempts=2)
        assert "\n" not in str(info.value)
        dest = url_cache_path(url)
        assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()
        server.cut = 1  # one cut, then a whole answer: the retry gets it right
        assert download_url(url, progress=False, attempts=2).read_bytes() == data
    # a cut file that an older vitkit cached: every use says which file to delete
    dest.write_bytes(data[: len(data) // 2])
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    assert cli_main(["predict", url, str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is incomplete" in err and "delete it" in err and str(dest) in err


# ---------------------------------------------------------------------- 4: stalls and the lock
def test_a_trickling_server_stops_at_the_stall_deadline(two_files, caches, monkeypatch, capsys):
    (data, _, _), _ = two_files
    with Hostile({"/m.safetensors": data}) as server:
        url = server.url("/m.safetensors")
        server.trickle_s = 0.02  # 50 bytes a second: every read returns something, none times out
        start = time.monotonic()
        with pytest.raises(DownloadError, match="stalled") as info:
            download_url(url, progress=False, stall_s=0.5)
        assert time.monotonic() - start < 5
        assert "\n" not in str(info.value) and "VITKIT_DOWNLOAD_STALL_S" in str(info.value)
        # the total deadline, with the stall check off
        start = time.monotonic()
        with pytest.raises(DownloadError, match="deadline"):
            download_url(url, progress=False, stall_s=0, deadline_s=0.5)
        assert time.monotonic() - start < 5
        # silence after the headers: the same deadline, through the command line and its variable
        server.trickle_s, server.silent_s = 0.0, 3.0
        monkeypatch.setenv("VITKIT_DOWNLOAD_STALL_S", "0.3")
        start = time.monotonic()
        assert cli_main(["download", "--quiet", url]) == 1
        assert time.monotonic() - start < 3
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "stalled: nothing arrived for 0.3 s" in err


def test_waiting_for_another_process_download_is_said(two_files, caches, capsys):
    (data, _, _), _ = two_files
    with Hostile({"/m.safetensors": data}) as server:
        url = server.url("/m.safetensors")
        lock = cache_dir() / ".locks" / (url_cache_path(url).name + ".lock")
        lock.parent.mkdir(parents=True)
        with open(lock, "a+") as held:  # another process's download holds the lock
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
            result: list[Path] = []
            worker = threading.Thread(target=lambda: result.append(download_url(url, progress=False)))
            worker.start()
            deadline = time.monotonic() + 10
            said = ""
            while time.monotonic() < deadline and "waiting" not in said:
                time.sleep(0.05)
                said += capsys.readouterr().err
            assert worker.is_alive() and not result
            fcntl.flock(held.fileno(), fcntl.LOCK_UN)
        worker.join(timeout=20)
    assert "waiting for another process that is downloading it" in said and str(lock) in said
    assert result and result[0].read_bytes() == data


# ------------------------------------------------------------------------ 6: a truncated hub blob
def test_a_truncated_hub_blob_is_not_verified_and_names_the_file_to_delete(tmp_path, caches, monkeypatch, capsys):
    _, hf_cache = caches
    model = vitkit.create_model("vit_mini_patch4_32", num_classes=3)
    weights = save_as(model, tmp_path / "model.safetensors", "timm")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architecture": "vit_mini_patch4_32", "num_classes": 3,
                                  "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
                                                     "num_classes": 3, "tag": "t"}}))
    snapshot = write_hf_cache(hf_cache, "acme/mini", {"config.json": config, "model.safetensors": weights})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli_main(["download", "acme/mini"]) == 0  # whole: verified
    capsys.readouterr()
    blob = (snapshot / "model.safetensors").resolve()
    with open(blob, "r+b") as f:
        f.truncate(blob.stat().st_size // 2)
    assert cli_main(["download", "acme/mini"]) == 2  # a damaged file, as for predict below (issue 25)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"delete {blob}" in err and "'vitkit download acme/mini' again" in err
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    assert cli_main(["predict", "acme/mini", str(image)]) == 2  # and every later use says the same
    assert f"delete {blob}" in capsys.readouterr().err


# -------------------------------------------------------- 5: a config.json that disagrees with the head
def test_a_hub_config_that_disagrees_with_the_weights_head_is_an_error(tmp_path, caches, monkeypatch, capsys):
    _, hf_cache = caches
    model = vitkit.create_model("vit_mini_patch4_32", num_classes=1000)
    with torch.no_grad():
        model.head.bias[7] += 50.0  # a known answer: class 7 for every image
    weights = save_as(model, tmp_path / "model.safetensors", "timm")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architecture": "vit_mini_patch4_32", "num_classes": 10,  # the head has 1000
                                  "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
                                                     "num_classes": 10, "tag": "t"}}))
    write_hf_cache(hf_cache, "acme/liar", {"config.json": config, "model.safetensors": weights})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(vitkit.checkpoint.CheckpointError) as info:
        vitkit.from_pretrained("acme/liar")
    message = str(info.value)
    assert "\n" not in message and "num_classes=10" in message and "1000 outputs" in message
    assert "config.json" in message
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    assert cli_main(["predict", "acme/liar", str(image)]) == 2
    assert "1000 outputs" in capsys.readouterr().err
    # a new head asked for on purpose: allowed, zero-initialised
    fresh = vitkit.from_pretrained("acme/liar", num_classes=10)
    assert fresh.config.num_classes == 10 and float(fresh.head.weight.detach().abs().sum()) == 0.0
    # a repo whose files agree: its head and its answer
    config.write_text(config.read_text().replace('"num_classes": 10', '"num_classes": 1000'))
    write_hf_cache(hf_cache, "acme/honest", {"config.json": config, "model.safetensors": weights})
    honest = vitkit.from_pretrained("acme/honest").eval()
    assert _logits(honest, torch.randn(2, 3, 32, 32)).argmax(-1).tolist() == [7, 7]
