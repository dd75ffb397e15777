"""``vitkit serve``: a model behind HTTP (aiohttp, the optional extra ``vitkit[serve]``), with dynamic batching,
bounded request sizes and a page that shows the top-5 and the attention rollout."""

from vitkit.serve.app import build_app, run_server
from vitkit.serve.batching import DynamicBatcher
from vitkit.serve.engine import Engine
from vitkit.serve.images import BadImage, decode_image

__all__ = ["BadImage", "DynamicBatcher", "Engine", "build_app", "decode_image", "run_server"]
