"""``vitkit serve``: a real server process on a free 127.0.0.1 port, started and stopped here; its answers
equal ``vitkit predict``'s, requests are batched, and bad requests get a 4xx without hurting the others."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitkit.cli import main
from vitkit.models.registry import build_registered

REPO = Path(__file__).resolve().parents[1]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = build_registered("vit_cifar_patch4_32", embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                             head_init="xavier", class_names=CIFAR10)
    return model.save_pretrained(tmp_path_factory.mktemp("serve") / "tiny")


class Server:
    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "vitkit", "serve", *args, "--port", "0"], env=env,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        self.port = None
        while self.port is None:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server did not start: {line}")
            found = re.search(r"serving on http://127\.0\.0\.1:(\d+)/", line)
            self.port = int(found[1]) if found else None
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                timeout: float = 60) -> tuple[int, dict | str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": content_type} if content_type else {})
            response = conn.getresponse()
            data = response.read().decode()
            is_json = response.getheader("Content-Type", "").startswith("application/json")
            return response.status, json.loads(data) if is_json else data
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(str(model_dir), "--max-batch", "8", "--max-wait-ms", "200", "--threads", "1")
    yield s
    s.stop()
    assert s.proc.returncode == 0  # SIGTERM: a clean stop


def _jpegs(data_root: Path, n: int) -> list[Path]:
    return sorted((data_root / "imagenette_subset" / "val").glob("*/*.JPEG"))[:n]


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose header says ``width`` x ``height`` (a decompression bomb's header, a few bytes)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_predict_equals_vitkit_predict_and_metadata(server, model_dir, data_root, capsys):
    images = _jpegs(data_root, 3)
    assert main(["predict", str(model_dir), *map(str, images), "--json", "--device", "cpu"]) == 0
    expected = json.loads(capsys.readouterr().out)
    for path, want in zip(images, expected):
        status, got = server.request("POST", "/predict", path.read_bytes(), "image/jpeg")
        assert status == 200, got
        assert [p["label"] for p in got["top_k"]] == [p["label"] for p in want["top_k"]]
        assert [p["probability"] for p in got["top_k"]] == pytest.approx(
            [p["probability"] for p in want["top_k"]], abs=1e-5)
    status, meta = server.request("GET", "/metadata")
    assert status == 200 and meta["classes"] == CIFAR10 and meta["input_size"] == [32, 32]
    assert meta["preprocessing"]["size"] == [32, 32] and meta["max_batch"] == 8 and meta["rollout"] is True
    status, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok"


def test_multipart_upload_top_k_and_the_page(server, data_root):
    image = _jpegs(data_root, 1)[0].read_bytes()
    boundary = "vitkitboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    status, got = server.request("POST", "/predict?top_k=2", body, f"multipart/form-data; boundary={boundary}")
    assert status == 200 and len(got["top_k"]) == 2
    status, page = server.request("GET", "/")
    assert status == 200 and "Drop an image" in page and "rollout" in page
    status, rollout = server.request("POST", "/rollout", image, "image/jpeg")
    assert status == 200 and len(rollout["grid"]) == 8 and len(rollout["grid"][0]) == 8  # 32 px / patch 4
    assert max(max(row) for row in rollout["grid"]) == pytest.approx(1.0)
    assert rollout["image"].startswith("data:image/png;base64,")


def test_concurrent_requests_are_batched(server, data_root):
    images = [p.read_bytes() for p in _jpegs(data_root, 16)]
    _, before = server.request("GET", "/health")
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda b: server.request("POST", "/predict", b, "image/jpeg"), images))
    assert all(status == 200 for status, _ in answers)
    _, after = server.request("GET", "/health")
    batches = after["batching"]["batches"] - before["batching"]["batches"]
    assert after["batching"]["images"] - before["batching"]["images"] == 16
    assert batches < 16 and after["batching"]["largest_batch"] <= 8  # shared passes, never above --max-batch
    singles = [server.request("POST", "/predict", b, "image/jpeg")[1] for b in images[:4]]
    assert [a["top_k"] for _, a in answers[:4]] == [s["top_k"] for s in singles]  # batching changes no answer


@pytest.mark.parametrize("body, content_type, status, reason", [
    (b"hello, not an image", "image/jpeg", 400, "not an image"),
    ("TRUNCATED", "image/jpeg", 400, "truncated or corrupt image"),
    (_png_claiming(20000, 20000), "image/png", 413, "image too large"),
    ("JPEG", "text/plain", 415, "wrong content type 'text/plain'"),
    ("JPEG", "application/json", 415, "wrong content type"),
    (b"", "image/jpeg", 400, "empty body"),
])
def test_bad_requests_get_a_4xx_with_one_line(server, data_root, body, content_type, status, reason):
    jpeg = _jpegs(data_root, 1)[0].read_bytes()
    body = {"TRUNCATED": jpeg[: len(jpeg) // 3], "JPEG": jpeg}.get(body, body) if isinstance(body, str) else body
    got_status, got = server.request("POST", "/predict", body, content_type)
    assert got_status == status and reason in got["error"] and "\n" not in got["error"]


def test_a_100_mb_body_is_refused_and_delays_no_one(server, data_root):
    image = _jpegs(data_root, 1)[0].read_bytes()
    results = {}

    def huge() -> None:
        try:
            results["huge"] = server.request("POST", "/predict", b"\0" * (100 * 2 ** 20), "image/jpeg")
        except (BrokenPipeError, ConnectionResetError) as e:  # refused before the client finished sending
            results["huge"] = (413, {"error": f"connection closed: {e}"})

    thread = threading.Thread(target=huge)
    thread.start()
    start = time.monotonic()
    status, got = server.request("POST", "/predict", image, "image/jpeg")
    elapsed = time.monotonic() - start
    thread.join(60)
    assert status == 200 and got["top_k"]
    assert elapsed < 10
    assert results["huge"][0] == 413
    status, health = server.request("GET", "/health")
    assert status == 200 and server.proc.poll() is None  # still serving


def test_serve_errors_are_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "vitkit serve: error:" in capsys.readouterr().err


def test_serving_an_int8_onnx_file(model_dir, tmp_path, data_root, capsys):
    path = tmp_path / "m.int8.onnx"
    assert main(["export", str(model_dir), "--format", "onnx", "--int8", "--out", str(path), "--validate-data",
                 "cifar10", "--validate-images", "16", "--min-agreement", "0.9"]) == 0
    capsys.readouterr()
    s = Server(str(path), "--threads", "1")
    try:
        status, meta = s.request("GET", "/metadata")
        assert status == 200 and meta["runtime"] == "onnxruntime (int8-dynamic)" and meta["classes"] == CIFAR10
        image = _jpegs(data_root, 1)[0].read_bytes()
        status, got = s.request("POST", "/predict", image, "image/jpeg")
        assert status == 200 and len(got["top_k"]) == 5
        status, got = s.request("POST", "/rollout", image, "image/jpeg")
        assert status == 404 and "eager ViT" in got["error"]
    finally:
        s.stop()
