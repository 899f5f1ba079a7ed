"""ONNX export of converted models, with fixed capacity tensors, and a checked runner."""

from moeify.onnx.export import OnnxRunner, export_onnx

__all__ = ["OnnxRunner", "export_onnx"]
