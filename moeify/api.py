"""User-facing functions over a model that contains Switch layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moeify.switch.layer import SwitchFFN


class MoEError(Exception):
    """A problem with the user's model, config or files, stated with its fix."""


@dataclass(frozen=True)
class LayerStats:
    """Routing statistics of one Switch layer's last forward pass."""

    name: str
    tokens_per_expert: tuple[int, ...]
    dropped_fraction: float
    expert_capacity: int
    num_tokens: int


def switch_layers(model: nn.Module) -> list[tuple[str, SwitchFFN]]:
    """Every Switch layer in ``model`` with its qualified name, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SwitchFFN)]


def _records(model: nn.Module):
    layers = switch_layers(model)
    if not layers:
        raise MoEError("the model has no Switch layers: convert it with moeify.convert first")
    missing = [name or "<root>" for name, layer in layers if layer.last_routing is None]
    if missing:
        raise MoEError(
            f"Switch layer(s) {', '.join(missing)} have not run yet: "
            "call the model's forward before reading its losses or statistics"
        )
    return [(name, layer, layer.last_routing) for name, layer in layers]


def aux_loss(model: nn.Module) -> Tensor:
    """Weighted auxiliary loss of the last forward pass, a scalar with gradient.

    ``mean over Switch layers of (aux_loss_coef * load_balancing + z_loss_coef * z_loss)``;
    averaged over layers (as t5x does) so the weight does not grow with depth. Add it to
    the task loss before ``backward()``.
    """
    terms = [
        layer.config.aux_loss_coef * record.load_balancing_loss
        + layer.config.z_loss_coef * record.z_loss
        for _, layer, record in _records(model)
    ]
    return torch.stack(terms).mean()


def routing_stats(model: nn.Module) -> list[LayerStats]:
    """Per Switch layer: tokens per expert, fraction dropped, capacity (last forward)."""
    return [
        LayerStats(
            name=name,
            tokens_per_expert=tuple(record.tokens_per_expert.tolist()),
            dropped_fraction=float(record.dropped_fraction),
            expert_capacity=record.expert_capacity,
            num_tokens=record.num_tokens,
        )
        for name, _, record in _records(model)
    ]
