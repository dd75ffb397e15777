"""``vitkit export --format onnx | exported-program``: trace, write, validate, and only then put the file in
place. A file that fails validation is not left where the export was asked to go."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from vitkit.deploy.graph import export_module, trace
from vitkit.deploy.onnx_file import is_standard, write_onnx
from vitkit.deploy.quantize import quantize_int8
from vitkit.deploy.runtime import OnnxModel
from vitkit.deploy.validate import (
    DEFAULT_ATOL,
    DEFAULT_MIN_AGREEMENT_INT8,
    Agreement,
    ExportMismatch,
    Tolerance,
    ValidationImages,
    compare,
    resized,
)

SUFFIXES = {"onnx": ".onnx", "exported-program": ".pt2"}


@dataclass
class ExportReport:
    path: Path
    format: str
    checks: list[tuple[Agreement, Tolerance]] = field(default_factory=list)


def _scratch(out: Path) -> Path:
    """A temporary file next to ``out`` (same file system: the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".tmp" + out.suffix, dir=out.parent)
    os.close(fd)
    return Path(name)


def _second_size(model: nn.Module) -> tuple[int, int]:
    """Another input size for a dynamic-size graph: the trained grid plus two patches each way."""
    h, w = model.config.image_hw
    stride = model.patch_embed.stride
    return h + 2 * stride, w + 2 * stride


def export_model(model: nn.Module, out: str | Path, *, format: str, validation: ValidationImages,
                 int8: bool = False, dynamic_size: bool = False, atol: Optional[float] = None,
                 min_agreement: Optional[float] = None,
                 log: Callable[[str], None] = lambda message: None) -> ExportReport:
    """Export ``model`` to ``out`` as ``format`` and validate it on ``validation``'s images against the eager
    model; raise :class:`ExportMismatch` (and write nothing at ``out``) when it disagrees beyond the tolerance:
    float32 (also checked before int8 quantization): max |logit diff| <= ``atol`` (default 1e-3), and top-1
    agreement >= ``min_agreement`` when given; int8: top-1 agreement >= ``min_agreement`` (default 97%), its
    logit difference reported."""
    if format not in SUFFIXES:
        raise ValueError(f"--format {format!r}: choose onnx or exported-program (or vitkit)")
    if int8 and format != "onnx":
        raise ValueError("--int8: dynamic int8 quantization is done on the ONNX graph; use --format onnx")
    out = Path(out)
    if out.suffix.lower() != SUFFIXES[format]:
        raise ValueError(f"{out}: a {format} export is written to a {SUFFIXES[format]} file")
    model = model.eval()
    fp32 = Tolerance(atol=DEFAULT_ATOL if atol is None else atol,
                     min_agreement=0.0 if min_agreement is None or int8 else min_agreement)
    quantized = Tolerance(atol=None, min_agreement=DEFAULT_MIN_AGREEMENT_INT8 if min_agreement is None
                          else min_agreement)
    reference = export_module(model, dynamic_size=dynamic_size)
    example = validation.images[:2]
    log(f"tracing with torch.export ({'dynamic batch, height and width' if dynamic_size else 'dynamic batch'})")
    program = trace(model, example, dynamic_size=dynamic_size)
    report = ExportReport(out, format)
    scratch: list[Path] = []
    try:
        path = _scratch(out)
        scratch.append(path)
        if format == "exported-program":
            torch.export.save(program, str(path))
            candidate = torch.export.load(str(path)).module()
            label = "exported program"
        else:
            log("translating to ONNX (torch.onnx.export, dynamo=True)")
            write_onnx(program, model, path, dynamic_size=dynamic_size)
            foreign = is_standard(path)
            if foreign:
                raise ExportMismatch(f"{out}: the graph holds non-standard ops: {', '.join(foreign)}")
            candidate, label = OnnxModel(path), "onnxruntime fp32"
        _validate(report, label, reference, candidate, validation, fp32, model, dynamic_size)
        if int8:
            fp32_path, path = path, _scratch(out)
            scratch.append(path)
            log("quantizing the Linear layers to int8 (onnxruntime quantize_dynamic)")
            quantize_int8(fp32_path, path)
            _validate(report, "onnxruntime int8", reference, OnnxModel(path), validation, quantized, model,
                      dynamic_size)
        os.replace(path, out)
        return report
    finally:
        for p in scratch:
            p.unlink(missing_ok=True)


def _validate(report: ExportReport, label: str, reference: nn.Module, candidate: nn.Module,
              validation: ValidationImages, tolerance: Tolerance, model: nn.Module, dynamic_size: bool) -> None:
    sets = [(validation.images, validation.labels)]
    if dynamic_size:
        sets.append((resized(validation.images, _second_size(model)), validation.labels))
    for images, labels in sets:
        result = compare(label, reference, candidate, images, labels)
        report.checks.append((result, tolerance))
        why = tolerance.check(result)
        if why is not None:
            raise ExportMismatch(f"{report.path}: {label} disagrees with the eager model on {validation.source}: "
                                 f"{why} (tolerance: {tolerance.describe()}); nothing written")
