"""ONNX export of converted models, with fixed capacity tensors, and checked runners.

Names load on first use: ``from moeify.onnx import OnnxGenerator`` imports numpy and
onnxruntime only, so a deployment that generates from exported graphs needs no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moeify.onnx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
