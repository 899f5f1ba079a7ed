"""moeify: turn a dense Transformer into a Switch Transformer.

The public names below load on first use, so ``import moeify`` (and ``moeify --help``)
does not pay for importing torch until something needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moeify._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "Activation": "moeify.config",
    "Gate": "moeify.config",
    "Init": "moeify.config",
    "MoEConfig": "moeify.config",
    "RouterKind": "moeify.config",
    "Scoring": "moeify.config",
    "DenseFFNWeights": "moeify.switch",
    "SwitchFFN": "moeify.switch",
    "ConversionReport": "moeify.compiler.report",
    "ConversionResult": "moeify.api",
    "LayerStats": "moeify.api",
    "MoEError": "moeify.errors",
    "convert": "moeify.api",
    "export_onnx": "moeify.onnx.export",
    "distill": "moeify.distillation",
    "distillation_loss": "moeify.distillation",
    "load": "moeify.io.checkpoint",
    "save": "moeify.io.checkpoint",
    "plan_of": "moeify.compiler.plan",
    "ConversionPlan": "moeify.compiler.plan",
    "FFNSite": "moeify.compiler.plan",
    "plan": "moeify.api",
    "apply": "moeify.api",
    "default_pipeline": "moeify.compiler.pipeline",
    "inspect": "moeify.api",
    "aux_loss": "moeify.api",
    "add_aux_loss_to_output": "moeify.api",
    "balance_experts": "moeify.switch.balance",
    "set_expert_dropout": "moeify.api",
    "set_seq_len": "moeify.api",
    "routing_stats": "moeify.api",
    "switch_layers": "moeify.api",
    "write": "moeify.writer",
    "Written": "moeify.writer",
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
    from moeify.compiler.pipeline import default_pipeline
    from moeify.compiler.plan import ConversionPlan, FFNSite, plan_of
    from moeify.compiler.report import ConversionReport
    from moeify.config import Activation, Gate, Init, MoEConfig, RouterKind, Scoring
    from moeify.distillation import distill, distillation_loss
    from moeify.errors import MoEError
    from moeify.io.checkpoint import load, save
    from moeify.onnx.export import export_onnx
    from moeify.switch import DenseFFNWeights, SwitchFFN
    from moeify.switch.balance import balance_experts
    from moeify.writer import Written, write


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
