"""``vitkit serve``: an HTTP server (aiohttp) in front of one model, with dynamic batching and a page to try it.

Why aiohttp: one well-kept package gives the asyncio server, request-size limits, multipart parsing and the
HTTP client the load test uses, with no ASGI server and multipart package to add next to it (starlette needs
uvicorn and python-multipart for the same).

Routes: ``POST /predict`` (an image: raw bytes with an ``image/*`` content type, or a multipart form file) ->
top-k JSON; ``POST /rollout`` -> the attention rollout over the image as the model sees it; ``GET /health``;
``GET /metadata`` (model, preprocessing, classes); ``GET /`` the page. Every bad request gets a 4xx with a
one-line JSON reason (``{"error": ...}``); decoding runs in worker threads, the model in one thread of its own,
so a bad or huge request neither stops the server nor waits in a batch.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from aiohttp import web

from vitkit.serve.batching import DynamicBatcher
from vitkit.serve.engine import Engine
from vitkit.serve.images import BadImage
from vitkit.serve.page import PAGE

MAX_BODY_BYTES = 20 * 1024 * 1024
IMAGE_TYPES = ("image/", "application/octet-stream")

_ENGINE = web.AppKey("engine", Engine)
_BATCHER = web.AppKey("batcher", DynamicBatcher)
_SETTINGS = web.AppKey("settings", dict)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _read_image(request: web.Request) -> bytes:
    limit = request.app[_SETTINGS]["max_body_bytes"]
    too_big = BadImage(f"body too large: more than {limit:,} bytes", 413)
    if request.content_length is not None and request.content_length > limit:
        raise too_big
    ctype = request.content_type
    if ctype.startswith(IMAGE_TYPES):
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_big from None
    if ctype == "multipart/form-data":
        reader = await request.multipart()
        async for part in reader:
            if part.filename is None and part.name not in ("image", "file"):
                continue
            data = bytearray()
            while chunk := await part.read_chunk(1 << 16):
                data += chunk
                if len(data) > limit:
                    raise too_big
            return bytes(data)
        raise BadImage("multipart form without a file: send the image as a file field named 'image'")
    raise BadImage(f"wrong content type {ctype or 'none'!r}: send the image bytes as image/* (e.g. image/jpeg) "
                   "or a multipart/form-data file", 415)


async def _prepared(request: web.Request, prepare: Callable[[bytes], Any]) -> Any:
    data = await _read_image(request)
    decode_pool = request.app[_SETTINGS]["decode_pool"]
    return await asyncio.get_running_loop().run_in_executor(decode_pool, prepare, data)


async def predict(request: web.Request) -> web.Response:
    engine = request.app[_ENGINE]
    try:
        k = int(request.query.get("top_k", request.app[_SETTINGS]["top_k"]))
        if k < 1:
            raise ValueError
    except ValueError:
        return _error(400, f"top_k must be a positive integer, got {request.query.get('top_k')!r}")
    try:
        item = await _prepared(request, engine.prepare)
    except BadImage as e:
        return _error(e.status, str(e))
    probabilities = await request.app[_BATCHER].submit(item)
    return web.json_response({"top_k": engine.top_k(probabilities, k)})


async def rollout(request: web.Request) -> web.Response:
    engine = request.app[_ENGINE]
    if not engine.has_rollout:
        return _error(404, "attention rollout needs an eager ViT; this server runs " + engine.metadata()["runtime"])
    try:
        pixels = await _prepared(request, engine.decode)
    except BadImage as e:
        return _error(e.status, str(e))
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(request.app[_SETTINGS]["model_pool"], engine.rollout, pixels)
    return web.json_response(result)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "batching": request.app[_BATCHER].stats.to_dict()})


async def metadata(request: web.Request) -> web.Response:
    settings = request.app[_SETTINGS]
    return web.json_response({**request.app[_ENGINE].metadata(), "max_batch": settings["max_batch"],
                              "max_wait_ms": settings["max_wait_ms"], "max_body_bytes": settings["max_body_bytes"]})


async def page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")


def build_app(engine: Engine, *, max_batch: int = 32, max_wait_ms: float = 5.0, top_k: int = 5,
              max_body_bytes: int = MAX_BODY_BYTES, decode_threads: int = 2) -> web.Application:
    """The aiohttp application: routes, the batcher (started with the app) and its thread pools."""
    model_pool = ThreadPoolExecutor(1, thread_name_prefix="vitkit-model")
    decode_pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="vitkit-decode")
    app = web.Application(client_max_size=max_body_bytes)
    app[_ENGINE] = engine
    app[_BATCHER] = DynamicBatcher(engine.probabilities, model_pool, max_batch=max_batch, max_wait_ms=max_wait_ms)
    app[_SETTINGS] = {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "top_k": top_k,
                      "max_body_bytes": max_body_bytes, "model_pool": model_pool, "decode_pool": decode_pool}

    async def lifecycle(app: web.Application):
        app[_BATCHER].start()
        yield
        await app[_BATCHER].stop()
        model_pool.shutdown(wait=False, cancel_futures=True)
        decode_pool.shutdown(wait=False, cancel_futures=True)

    app.cleanup_ctx.append(lifecycle)
    app.add_routes([web.get("/", page), web.post("/predict", predict), web.post("/rollout", rollout),
                    web.get("/health", health), web.get("/metadata", metadata)])
    return app


async def _serve(app: web.Application, host: str, port: int, announce: Callable[[str], None]) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1] if port == 0 else port
    announce(f"serving on http://{host}:{bound}/ (Ctrl-C stops)")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run_server(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
               announce: Callable[[str], None] = print, **options: Any) -> None:
    """Serve until SIGINT or SIGTERM (``port=0``: a free port, announced); ``threads``: torch's intra-op threads."""
    if threads:
        torch.set_num_threads(threads)
    asyncio.run(_serve(build_app(engine, **options), host, port, announce))
