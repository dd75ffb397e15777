"""int8 for CPU: dynamic quantization of the Linear layers of an exported ONNX file, by onnxruntime's quantizer.

Why onnxruntime's quantizer rather than torchao: the quantized model stays one standard ONNX file
(``DynamicQuantizeLinear`` + ``MatMulInteger``, opset ops) that the same runtime serves, predicts and
benchmarks, with no extra package and no ``torch.compile`` at load time; torchao's CPU int8 path relies on
inductor kernels and does not export to standard ONNX ops.

Only the matrix products with a weight (the encoder's Linear layers: qkv, proj, fc1, fc2) are quantized;
attention's activation-by-activation products (Q K^T, A V), the patch convolution, LayerNorm, softmax and the
classifier head (a ``Gemm`` on the pooled token, which onnxruntime's dynamic quantizer leaves float) stay
float32. Weights are int8 per output channel, activations uint8 per tensor, quantized at each call
from their own range: no calibration data. Static quantization (activation ranges fixed from calibration
images) is not offered: dynamic quantization needs no data set and meets the accuracy target on the model
measured in docs/deploy.md; static was not measured.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vitkit.deploy.formats import META_PRECISION
from vitkit.deploy.onnx_file import set_metadata


def _onnx_and_quantizer() -> tuple[Any, Any, Any]:
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise ValueError("int8 export needs onnxruntime: pip install 'vitkit[onnx]'") from None
    return onnx, quantize_dynamic, QuantType


def linear_nodes(proto: Any) -> list[str]:
    """Names of the MatMul/Gemm nodes whose second operand is a weight (an initializer): the Linear layers."""
    weights = {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
            and n.input[1] in weights]


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Write ``dst``: ``src`` with its Linear layers dynamically quantized to int8 (metadata kept)."""
    onnx, quantize_dynamic, QuantType = _onnx_and_quantizer()
    proto = onnx.load(str(src))
    nodes = linear_nodes(proto)
    if not nodes:
        raise ValueError(f"{src}: no Linear layer (MatMul/Gemm with a weight) to quantize")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's advice to pre-process, on the root logger, on every call
    try:
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes,
                         per_channel=True, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    quantized = onnx.load(str(dst))
    metadata = {p.key: p.value for p in proto.metadata_props}
    set_metadata(quantized, {**metadata, META_PRECISION: "int8-dynamic"})
    onnx.save(quantized, str(dst))
    return Path(dst)
