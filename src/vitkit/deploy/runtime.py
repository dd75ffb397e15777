"""An exported ONNX file as a model vitkit's commands run: ``predict``, ``eval``, ``bench`` and ``serve``
take it like any other SOURCE (the resolver loads ``.onnx`` files through :func:`load_onnx`).

:class:`OnnxModel` is an ``nn.Module`` whose forward hands the batch to an onnxruntime session, so the
code that feeds eager models feeds it unchanged; its ``config`` is the exported model's own (from the file's
metadata): same preprocessing, same class names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vitkit.checkpoint import CheckpointError, config_from_record
from vitkit.deploy.formats import META_CONFIG, META_DYNAMIC_SIZE, META_PRECISION


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ValueError("running an .onnx model needs onnxruntime: pip install 'vitkit[onnx]'") from None
    return onnxruntime


class OnnxModel(nn.Module):
    """An onnxruntime CPU session behind ``nn.Module``'s call: float (B, C, H, W) in, logits out."""

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        super().__init__()
        ort = _ort()
        self.path = Path(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            raise CheckpointError(f"{self.path}: not a readable ONNX model ({str(e).splitlines()[0]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if META_CONFIG not in meta:
            raise CheckpointError(f"{self.path}: an ONNX file without vitkit's metadata ({META_CONFIG}); "
                                  "export it with `vitkit export SOURCE --format onnx`")
        self.config = config_from_record(json.loads(meta[META_CONFIG]), source=str(self.path))
        self.precision = meta.get(META_PRECISION, "fp32")
        self.dynamic_size = json.loads(meta.get(META_DYNAMIC_SIZE, "false"))
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, images: Tensor) -> Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        try:
            (logits,) = self.session.run(None, {self.input_name: array})
        except Exception as e:  # a wrong input shape: onnxruntime's message, on one line
            raise ValueError(f"{self.path}: {str(e).splitlines()[0]}") from None
        return torch.from_numpy(np.asarray(logits)).to(images.device)

    def to(self, *args: Any, **kwargs: Any) -> OnnxModel:
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"{self.path}: an ONNX model runs on the CPU through onnxruntime, not on {device}")
        return self

    def extra_repr(self) -> str:
        return f"{self.path}, {self.precision}"


def load_onnx(path: str | Path, *, threads: int | None = None) -> OnnxModel:
    """The ONNX file at ``path`` as an :class:`OnnxModel`."""
    return OnnxModel(path, threads=threads)
