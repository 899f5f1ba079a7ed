"""`AttachAuxLosses`: make the auxiliary losses of each forward reachable from the model."""

from __future__ import annotations

from typing import Any

from torch import nn

from moeify.passes._base import ProgramPass
from moeify.program import Program
from moeify.switch.layer import SwitchFFN


def clear_routing_records(model: nn.Module, args: Any = None) -> None:
    """Forget every Switch layer's last routing (a forward pre-hook on the model).

    Run before each forward of the converted model, so `moeify.aux_loss` and
    `moeify.routing_stats` see the layers that ran in the latest forward only, never a
    stale record of a layer this forward skipped (a decoder step reuses the encoder's
    output and runs no encoder layer).
    """
    for module in model.modules():
        if isinstance(module, SwitchFFN):
            module.last_routing = None


class AttachAuxLosses(ProgramPass):
    """Wire the load-balancing loss and router z-loss to the model.

    Requires: `InsertRouter` has run.
    Guarantees: after any forward of the model, ``moeify.aux_loss(model)`` is
        ``mean over the layers that ran of (aux_loss_coef * load_balancing +
        z_loss_coef * z_loss)``, a scalar with gradient, and ``moeify.routing_stats``
        lists those layers' statistics; records from earlier forwards are cleared.
    Preserves the computation: yes.
    """

    def requires(self, program: Program) -> None:  # type: ignore[override]
        if not program.layers:
            raise self.fail("no Switch layers: run InsertRouter first")

    def run(self, program: Program) -> bool:
        program.model.register_forward_pre_hook(clear_routing_records)
        return True
