"""The page of ``vitkit serve`` in a real headless browser (Chromium, Debian's package ``chromium``): start the
server on a free 127.0.0.1 port, open ``/`` in Chromium, drop a real image on the drop zone (a ``drop`` event
with the file, as a person's drag and drop gives), wait for the answer, check that the page shows the same
top-5 as ``POST /predict`` and an attention-rollout picture, and save a screenshot::

    PYTHONPATH=src python benchmarks/serve_page_check.py SOURCE [--image FILE] [--out page.png]

Exits non-zero when the page shows anything else. Driven over the Chrome DevTools protocol with aiohttp's
websocket client; only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from serve_load import start_server

REPO = Path(__file__).resolve().parents[1]

DROP = """(async () => {
  const wait = async (ok, what) => { const t0 = Date.now();
    while (!ok()) { if (Date.now() - t0 > 60000) throw new Error('timed out waiting for ' + what);
                    await new Promise(r => setTimeout(r, 50)); } };
  await wait(() => document.body.dataset.state === 'ready', 'the page');
  const bytes = Uint8Array.from(atob(%s), c => c.charCodeAt(0));
  const file = new File([bytes], %s, {type: 'image/jpeg'});
  const dt = new DataTransfer(); dt.items.add(file);
  document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true,
                                                                        cancelable: true}));
  await wait(() => ['done', 'error'].includes(document.body.dataset.state), 'the answer');
  const px = document.getElementById('view').getContext('2d').getImageData(0, 0, 320, 320).data;
  let painted = 0; for (let i = 3; i < px.length; i += 4) painted += px[i] > 0;
  return JSON.stringify({state: document.body.dataset.state, error: document.getElementById('error').textContent,
    labels: [...document.querySelectorAll('#top .label')].map(e => e.textContent),
    percents: [...document.querySelectorAll('#top .pct')].map(e => e.textContent),
    caption: document.getElementById('cap').textContent, painted: painted / (320 * 320)});
})()"""


async def cdp(ws: aiohttp.ClientWebSocketResponse, counter: list[int], method: str, **params) -> dict:
    counter[0] += 1
    await ws.send_json({"id": counter[0], "method": method, "params": params})
    while True:
        message = json.loads((await ws.receive()).data)
        if message.get("id") == counter[0]:
            if "error" in message:
                raise RuntimeError(f"{method}: {message['error']}")
            return message["result"]


async def check(port: int, image: Path, out: Path, browser: str) -> dict:
    profile = tempfile.mkdtemp(prefix="vitkit-chromium-")
    proc = subprocess.Popen([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
                             f"--user-data-dir={profile}", "--window-size=900,700", f"http://127.0.0.1:{port}/"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        active = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not active.is_file() or not active.read_text().strip():
            if time.monotonic() > deadline:
                raise SystemExit("Chromium did not open its DevTools port")
            await asyncio.sleep(0.2)
        devtools = int(active.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                async with session.get(f"http://127.0.0.1:{devtools}/json/list") as r:
                    pages = [t for t in await r.json() if t["type"] == "page" and str(port) in t["url"]]
                if pages:
                    break
                await asyncio.sleep(0.2)
            async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                counter = [0]
                expression = DROP % (json.dumps(base64.b64encode(image.read_bytes()).decode()), json.dumps(image.name))
                for attempt in range(20):  # the first navigation may still replace the document
                    try:
                        result = await cdp(ws, counter, "Runtime.evaluate", expression=expression, awaitPromise=True,
                                           returnByValue=True)
                        break
                    except RuntimeError as e:
                        if "context was destroyed" not in str(e) or attempt == 19:
                            raise
                        await asyncio.sleep(0.5)
                if "exceptionDetails" in result:
                    raise SystemExit(f"page script failed: {result['exceptionDetails']}")
                shown = json.loads(result["result"]["value"])
                await asyncio.sleep(0.3)
                shot = await cdp(ws, counter, "Page.captureScreenshot", format="png")
                out.write_bytes(base64.b64decode(shot["data"]))
            async with session.post(f"http://127.0.0.1:{port}/predict?top_k=5", data=image.read_bytes(),
                                    headers={"Content-Type": "image/jpeg"}) as r:
                shown["api"] = [p["label"] for p in (await r.json())["top_k"]]
        return shown
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a model SOURCE vitkit serve takes")
    data = Path(os.environ.get("VITKIT_DATA", REPO.parent / "shared" / "data"))
    default = sorted((data / "imagenette_subset" / "val").rglob("*.JPEG"))
    parser.add_argument("--image", type=Path, default=default[0] if default else None, help="a JPEG to drop")
    parser.add_argument("--out", type=Path, default=Path("serve_page.png"), help="screenshot (PNG)")
    parser.add_argument("--browser", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    if not Path(args.browser).is_file():
        raise SystemExit(f"{args.browser}: no Chromium (Debian: apt-get install chromium)")
    server, port = start_server(args.source, 8, 5.0, 1)
    try:
        shown = asyncio.run(check(port, args.image, args.out, args.browser))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    print(json.dumps(shown, indent=1))
    problems = []
    if shown["state"] != "done" or shown["error"]:
        problems.append(f"page state {shown['state']!r} {shown['error']!r}")
    if shown["labels"] != shown["api"]:
        problems.append(f"page top-5 {shown['labels']} != POST /predict {shown['api']}")
    if "rollout" in shown["caption"] and shown["painted"] < 0.99:
        problems.append(f"the rollout canvas is {100 * shown['painted']:.0f}% painted")
    print(f"screenshot: {args.out}")
    if problems:
        sys.exit("page check FAILED: " + "; ".join(problems))
    print("page check passed: the page shows POST /predict's top-5 and the attention rollout")


if __name__ == "__main__":
    main()
