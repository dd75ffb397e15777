"""A bounded load test of ``vitkit serve``: for each batch limit, start the server on a free 127.0.0.1 port,
run N concurrent clients for T seconds (each posts a real image, waits for the answer, posts the next), stop
the server, and print requests/s, p50/p99 latency, errors and the mean batch the server formed::

    PYTHONPATH=src python benchmarks/serve_load.py SOURCE [--clients 16] [--seconds 15] [--max-batch 1,8,32]

Only 127.0.0.1 is ever contacted. The clients run in this process (aiohttp), on the same CPU as the server:
on a small machine they take part of it, so the numbers are a lower bound of what the server alone does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def start_server(source: str, max_batch: int, max_wait_ms: float, threads: int) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "vitkit", "serve", source, "--port", "0", "--host", "127.0.0.1",
                             "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
                             "--threads", str(threads)], env=env, stderr=subprocess.PIPE, text=True)
    while True:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise SystemExit(f"the server did not start (exit {proc.returncode})")
        found = re.search(r"serving on http://127\.0\.0\.1:(\d+)/", line)
        if found:
            return proc, int(found[1])


async def load(port: int, images: list[bytes], clients: int, seconds: float) -> dict:
    url = f"http://127.0.0.1:{port}"
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        nonlocal errors
        i = index
        while time.monotonic() < stop_at:
            body = images[i % len(images)]
            i += clients
            start = time.monotonic()
            try:
                async with session.post(f"{url}/predict", data=body, headers={"Content-Type": "image/jpeg"}) as r:
                    await r.read()
                    ok = r.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                latencies.append(time.monotonic() - start)
            else:
                errors += 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        begin = time.monotonic()
        await asyncio.gather(*(client(session, i) for i in range(clients)))
        elapsed = time.monotonic() - begin
        async with session.get(f"{url}/health") as r:
            health = await r.json()
    lat = np.array(latencies) * 1000
    return {"requests_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None, "ok": len(latencies), "errors": errors,
            "mean_batch": health["batching"]["mean_batch"], "largest_batch": health["batching"]["largest_batch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a model SOURCE vitkit serve takes (run, model directory, .onnx)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--seconds", type=float, default=15.0, help="load duration per batch limit (default 15)")
    parser.add_argument("--max-batch", default="1,8,32", help="batch limits to compare (default 1,8,32)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1, help="the model's intra-op threads (default 1)")
    data = Path(os.environ.get("VITKIT_DATA", REPO.parent / "shared" / "data"))
    parser.add_argument("--images", default=str(data / "imagenette_subset" / "val"),
                        help="folder of JPEG files posted in turn (default: the Imagenette subset's val split)")
    args = parser.parse_args()
    images = [p.read_bytes() for p in sorted(Path(args.images).rglob("*.JPEG"))[:200]]
    if not images:
        raise SystemExit(f"{args.images}: no .JPEG files")
    print(f"# {args.source}: {args.clients} clients x {args.seconds:g} s per row, --max-wait-ms {args.max_wait_ms:g}, "
          f"model threads {args.threads}, {len(images)} distinct JPEGs; load average before: "
          f"{os.getloadavg()[0]:.2f}")
    print(f"{'max-batch':>9s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'ok':>6s} {'errors':>6s} "
          f"{'mean batch':>10s} {'largest':>7s} {'load':>5s}")
    for max_batch in [int(b) for b in args.max_batch.split(",")]:
        proc, port = start_server(args.source, max_batch, args.max_wait_ms, args.threads)
        try:
            r = asyncio.run(load(port, images, args.clients, args.seconds))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        print(f"{max_batch:9d} {r['requests_per_s']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['ok']:6d} "
              f"{r['errors']:6d} {r['mean_batch']:10.2f} {r['largest_batch']:7d} {os.getloadavg()[0]:5.2f}",
              flush=True)


if __name__ == "__main__":
    main()
