"""moeify: turn a dense Transformer into a Switch Transformer.

The public names below load on first use, so ``import moeify`` (and ``moeify --help``)
does not pay for importing torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Activation": "moeify.config",
    "Gate": "moeify.config",
    "Init": "moeify.config",
    "MoEConfig": "moeify.config",
    "RouterKind": "moeify.config",
    "DenseFFNWeights": "moeify.switch",
    "SwitchFFN": "moeify.switch",
    "ConversionReport": "moeify.report",
    "ConversionResult": "moeify.api",
    "LayerStats": "moeify.api",
    "MoEError": "moeify.errors",
    "convert": "moeify.api",
    "export_onnx": "moeify.onnx.export",
    "distill": "moeify.distill",
    "distillation_loss": "moeify.distill",
    "load": "moeify.checkpoint",
    "save": "moeify.checkpoint",
    "conversion_of": "moeify.conversion",
    "ConversionPlan": "moeify.conversion",
    "FFNSite": "moeify.conversion",
    "plan": "moeify.api",
    "apply": "moeify.api",
    "default_pipeline": "moeify.pipeline",
    "inspect": "moeify.api",
    "aux_loss": "moeify.api",
    "add_aux_loss_to_output": "moeify.api",
    "set_expert_dropout": "moeify.api",
    "set_seq_len": "moeify.api",
    "routing_stats": "moeify.api",
    "switch_layers": "moeify.api",
    "write": "moeify.io.write",
    "Written": "moeify.io.write",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    from moeify.api import (
        ConversionResult,
        LayerStats,
        add_aux_loss_to_output,
        apply,
        aux_loss,
        convert,
        inspect,
        plan,
        routing_stats,
        set_expert_dropout,
        set_seq_len,
        switch_layers,
    )
    from moeify.checkpoint import load, save
    from moeify.distill import distill, distillation_loss
    from moeify.errors import MoEError
    from moeify.io.write import Written, write
    from moeify.onnx.export import export_onnx
    from moeify.pipeline import default_pipeline
    from moeify.conversion import ConversionPlan, FFNSite, conversion_of
    from moeify.report import ConversionReport
    from moeify.config import Activation, Gate, Init, MoEConfig, RouterKind
    from moeify.switch import DenseFFNWeights, SwitchFFN


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moeify' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
