"""What the server computes: preprocessing by the model's own eval transform, batched class probabilities, and
the attention rollout of one image (eager ViTs), independent of HTTP."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from vitkit.analysis.attention import attention_rollout
from vitkit.data.transforms import eval_transform
from vitkit.deploy.runtime import OnnxModel
from vitkit.models.vit import VisionTransformer
from vitkit.serve.images import MAX_PIXELS, decode_image


class Engine:
    """A loaded model ready to answer: ``prepare`` (bytes -> input), ``probabilities`` (a list of inputs ->
    (B, classes)), ``rollout`` (bytes -> the map and the pixels it lies over)."""

    def __init__(self, model: nn.Module, description: str, *, max_pixels: int = MAX_PIXELS) -> None:
        self.model = model.eval()
        self.description = description
        self.config = model.config
        self.transform = eval_transform(self.config)
        self.max_pixels = max_pixels
        self.class_names = list(self.config.class_names or [str(i) for i in range(self.config.num_classes)])

    @property
    def has_rollout(self) -> bool:
        """Attention rollout needs the eager model's attention (not an ONNX graph's)."""
        return isinstance(self.model, VisionTransformer) and not isinstance(self.model, OnnxModel)

    def decode(self, data: bytes) -> Tensor:
        """uint8 (C, h, w) as the model sees it: decoded, channels, resize, centre crop."""
        return self.transform.resize(decode_image(data, max_pixels=self.max_pixels))

    def prepare(self, data: bytes) -> Tensor:
        return self.transform.normalize(self.decode(data))

    @torch.inference_mode()
    def probabilities(self, inputs: list[Tensor]) -> Tensor:
        return self.model(torch.stack(inputs)).float().softmax(dim=-1)

    def top_k(self, probabilities: Tensor, k: int) -> list[dict[str, Any]]:
        top = probabilities.topk(max(1, min(k, len(self.class_names))))
        return [{"label": self.class_names[i], "index": int(i), "probability": round(float(p), 6)}
                for p, i in zip(top.values.tolist(), top.indices.tolist())]

    @torch.inference_mode()
    def rollout(self, pixels: Tensor) -> dict[str, Any]:
        """The attention rollout (Abnar & Zuidema) of one prepared image, with that image as a PNG data URL."""
        model = self.model
        maps = model.attention_maps(self.transform.normalize(pixels)[None])
        grid = model.patch_embed_grid(tuple(pixels.shape[-2:]))
        heat = attention_rollout(maps, grid, model.num_prefix_tokens)[0]
        heat = heat / max(float(heat.max()), 1e-12)
        rgb = pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels
        buffer = io.BytesIO()
        Image.fromarray(rgb.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        return {"grid": np.round(heat.astype(np.float64), 4).tolist(), "image": "data:image/png;base64,"
                + base64.b64encode(buffer.getvalue()).decode()}

    def metadata(self) -> dict[str, Any]:
        cfg = self.config
        return {"model": self.description, "architecture": type(cfg).__name__,
                "runtime": f"onnxruntime ({self.model.precision})" if isinstance(self.model, OnnxModel)
                else "torch eager", "input_size": list(cfg.image_hw), "in_chans": cfg.in_chans,
                "preprocessing": cfg.preprocessing().to_dict(), "classes": self.class_names,
                "rollout": self.has_rollout}
