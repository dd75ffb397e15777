"""Deployment: a trained model as an ONNX file or a ``torch.export`` program, validated against the eager model
on real images, int8 for CPU, and run through onnxruntime by ``predict``/``eval``/``bench``/``serve``."""

from vitkit.deploy.artifact import ExportReport, export_model
from vitkit.deploy.formats import FORMATS
from vitkit.deploy.runtime import OnnxModel, load_onnx
from vitkit.deploy.validate import Agreement, ExportMismatch, Tolerance, ValidationImages, validation_images

__all__ = ["FORMATS", "Agreement", "ExportMismatch", "ExportReport", "OnnxModel", "Tolerance", "ValidationImages",
           "export_model", "load_onnx", "validation_images"]
