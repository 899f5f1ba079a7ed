"""The Switch Transformer layer: routing, capacity, dispatch/combine, losses, modules."""

from moeify.switch.dispatch import Sizes
from moeify.switch.expert_choice import ExpertChoiceRouting, route_expert_choice
from moeify.switch.experts import DenseFFNWeights, Experts
from moeify.switch.layer import DispatchPath, RoutingRecord, SwitchFFN
from moeify.switch.losses import load_balancing_loss, router_z_loss
from moeify.switch.router import Router
from moeify.switch.routing import Routing, expert_capacity, route
from moeify.switch.upcycle import TensorSource, seeded_generator, upcycled_tensors

__all__ = [
    "DenseFFNWeights",
    "DispatchPath",
    "ExpertChoiceRouting",
    "Experts",
    "Router",
    "Routing",
    "RoutingRecord",
    "Sizes",
    "SwitchFFN",
    "TensorSource",
    "expert_capacity",
    "load_balancing_loss",
    "route",
    "route_expert_choice",
    "router_z_loss",
    "seeded_generator",
    "upcycled_tensors",
]
