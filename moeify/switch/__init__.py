"""The Switch Transformer layer: routing, capacity, dispatch/combine, losses, modules."""

from moeify.switch.dispatch import Sizes
from moeify.switch.experts import DenseFFNWeights, Experts
from moeify.switch.layer import DispatchPath, Router, RoutingRecord, SwitchFFN
from moeify.switch.losses import load_balancing_loss, router_z_loss
from moeify.switch.routing import Routing, expert_capacity, route

__all__ = [
    "DenseFFNWeights",
    "DispatchPath",
    "Experts",
    "Router",
    "Routing",
    "RoutingRecord",
    "Sizes",
    "SwitchFFN",
    "expert_capacity",
    "load_balancing_loss",
    "route",
    "router_z_loss",
]
