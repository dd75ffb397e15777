"""Writing an ONNX file from a traced model, with the model's preprocessing and classes in its metadata.

The exporter is ``torch.onnx.export(..., dynamo=True)``: it translates the ``torch.export`` graph
(:func:`vitkit.deploy.graph.trace`, the same graph the ``exported-program`` format saves), handles the
dynamic batch/height/width axes as symbolic shapes, and emits standard ``ai.onnx`` ops only (opset 20:
``Gelu`` and ``LayerNormalization`` are single ops). The TorchScript exporter (``dynamo=False``) also
works on these models but is the legacy path (a DeprecationWarning since torch 2.9, where dynamo became the
default) and traces shapes as Python values, so ``--dynamic-size`` would need the position-embedding branch
traced by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.deploy.formats import (
    INPUT_NAME,
    META_CLASSES,
    META_CONFIG,
    META_DYNAMIC_SIZE,
    META_PRECISION,
    META_PREPROCESSING,
    OUTPUT_NAME,
)
from vitkit.models.registry import config_record
from vitkit.version import __version__

OPSET = 20


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ValueError("ONNX export needs the onnx packages: pip install 'vitkit[onnx]'") from None
    return onnx


def model_metadata(model: nn.Module, *, precision: str = "fp32", dynamic_size: bool = False) -> dict[str, str]:
    """The metadata_props of an exported model: config, preprocessing, class names, precision."""
    config = model.config
    names = list(config.class_names or [str(i) for i in range(config.num_classes)])
    return {META_CONFIG: json.dumps(config_record(config)),
            META_PREPROCESSING: json.dumps(config.preprocessing().to_dict()),
            META_CLASSES: json.dumps(names), META_PRECISION: precision,
            META_DYNAMIC_SIZE: json.dumps(dynamic_size)}


def set_metadata(proto: Any, metadata: dict[str, str]) -> None:
    """Replace ``proto``'s metadata_props entries of the same keys."""
    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def read_metadata(path: str | Path) -> dict[str, str]:
    """An ONNX file's metadata_props (reads the graph structure, not the weights)."""
    onnx = _onnx()
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def write_onnx(program: torch.export.ExportedProgram, model: nn.Module, path: str | Path, *,
               dynamic_size: bool = False) -> Path:
    """Translate a traced model to ONNX and write it (one self-contained file) with its metadata."""
    onnx = _onnx()
    onnx_program = torch.onnx.export(program, f=None, dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
                                     output_names=[OUTPUT_NAME], verbose=False, optimize=True)
    proto = onnx_program.model_proto
    proto.producer_name, proto.producer_version = "vitkit", __version__
    set_metadata(proto, model_metadata(model, dynamic_size=dynamic_size))
    onnx.save(proto, str(path))
    return Path(path)


def is_standard(path: str | Path) -> list[str]:
    """The ops of an ONNX file outside the standard ``ai.onnx`` domain (empty when all are standard)."""
    onnx = _onnx()
    proto = onnx.load(str(path), load_external_data=False)
    return sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
