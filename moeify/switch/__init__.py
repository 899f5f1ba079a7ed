"""The Switch Transformer layer: a router, a dispatcher and the experts (`SwitchFFN`),
over pure functions for routing, capacity, dispatch/combine and losses."""

from moeify.switch.dispatch import Sizes
from moeify.switch.dispatchers import (
    BATCHED_COST,
    Dispatcher,
    DispatchPath,
    ExpertChoiceDispatcher,
    LocalDispatcher,
    expert_block,
)
from moeify.switch.expert_choice import ExpertChoiceRouting, route_expert_choice
from moeify.switch.experts import DenseFFNWeights, Experts
from moeify.switch.layer import SwitchFFN, switch_layers
from moeify.switch.losses import load_balancing_loss, router_z_loss
from moeify.switch.router import ExpertChoiceRouter, Router, RoutingRecord, TokenChoiceRouter
from moeify.switch.routing import Routing, expert_capacity, route
from moeify.switch.shared import SharedExperts
from moeify.switch.upcycle import TensorSource, seeded_generator, upcycled_tensors

__all__ = [
    "BATCHED_COST",
    "DenseFFNWeights",
    "DispatchPath",
    "Dispatcher",
    "ExpertChoiceDispatcher",
    "ExpertChoiceRouter",
    "ExpertChoiceRouting",
    "Experts",
    "LocalDispatcher",
    "Router",
    "Routing",
    "RoutingRecord",
    "SharedExperts",
    "Sizes",
    "SwitchFFN",
    "TensorSource",
    "TokenChoiceRouter",
    "expert_block",
    "expert_capacity",
    "load_balancing_loss",
    "route",
    "route_expert_choice",
    "router_z_loss",
    "seeded_generator",
    "switch_layers",
    "upcycled_tensors",
]
