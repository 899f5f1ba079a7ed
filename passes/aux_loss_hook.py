"""`RegisterAuxLossHook`: keep each forward's auxiliary losses current."""

from __future__ import annotations

from typing import Any

from torch import nn

from moeify.compiler.program import Program
from moeify.passes._base import ProgramPass
from moeify.switch import SwitchFFN


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


class RegisterAuxLossHook(ProgramPass):
    """Register `clear_routing_records` as a forward pre-hook of the model.

    Every Switch layer records its load-balancing loss and router z-loss in each
    forward (`SwitchFFN.last_routing`); this hook clears the records before each
    forward of the whole model, so ``moeify.aux_loss(model)`` is the mean over the
    layers that ran in the latest forward of ``aux_loss_coef * load_balancing +
    z_loss_coef * z_loss``, a scalar with gradient.

    Requires: `ReplaceModules` has run (the model holds Switch layers).
    Guarantees: the hook is registered once.
    Preserves the computation: yes.
    """

    def requires(self, program: Program) -> None:  # type: ignore[override]
        if not any(isinstance(m, SwitchFFN) for m in program.model.modules()):
            raise self.fail("the model has no Switch layers: run ReplaceModules first")

    def run(self, program: Program) -> bool:
        program.model.register_forward_pre_hook(clear_routing_records)
        return True
