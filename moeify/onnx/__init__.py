"""ONNX export of converted models, with fixed capacity tensors, and checked runners.

Names load on first use: ``from moeify.onnx import OnnxGenerator`` imports numpy and
onnxruntime only, so a deployment that generates from exported graphs needs no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moeify._lazy import lazy_exports

_EXPORTS = {
    "OnnxRunner": "moeify.onnx.export",
    "export_onnx": "moeify.onnx.export",
    "export_generation": "moeify.onnx.generation",
    "OnnxGenerator": "moeify.onnx.generator",
    "optimize_graph": "moeify.onnx.optimize",
    "quantize_graph": "moeify.onnx.quantize",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from moeify.onnx.export import OnnxRunner, export_onnx
    from moeify.onnx.generation import export_generation
    from moeify.onnx.generator import OnnxGenerator
    from moeify.onnx.optimize import optimize_graph
    from moeify.onnx.quantize import quantize_graph


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
