"""Names shared by the deploy modules: the export formats and the ONNX file's metadata keys."""

from __future__ import annotations

FORMATS = ("vitkit", "onnx", "exported-program")
"""``vitkit export --format``: a vitkit model directory (the default), an ONNX file, a ``torch.export`` .pt2."""

INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"

META_CONFIG = "vitkit.config"
"""JSON: the model's config record (what a vitkit ``config.json`` holds), so that vitkit rebuilds its config."""
META_PREPROCESSING = "preprocessing"
"""JSON: size, mean, std, crop_pct, interpolation: how an image becomes the ``pixel_values`` input."""
META_CLASSES = "class_names"
"""JSON: the class names in logit order."""
META_PRECISION = "vitkit.precision"
"""``fp32`` or ``int8-dynamic`` (Linear weights int8, activations quantized per call)."""
META_DYNAMIC_SIZE = "vitkit.dynamic_size"
"""``true`` when height and width are dynamic (position embeddings resampled in the graph)."""
