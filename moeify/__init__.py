"""moeify: turn a dense Transformer into a Switch Transformer."""

from moeify.api import LayerStats, MoEError, aux_loss, routing_stats, switch_layers
from moeify.config import Activation, Gate, Init, MoEConfig
from moeify.switch import DenseFFNWeights, SwitchFFN

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "DenseFFNWeights",
    "Gate",
    "Init",
    "LayerStats",
    "MoEConfig",
    "MoEError",
    "SwitchFFN",
    "__version__",
    "aux_loss",
    "routing_stats",
    "switch_layers",
]
