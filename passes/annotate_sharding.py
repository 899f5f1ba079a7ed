"""`AnnotateSharding`: plan how the converted model's parameters shard over experts."""

from __future__ import annotations

from moeify.compiler.plan import plan_sharding
from moeify.compiler.program import Program
from moeify.passes._base import ProgramPass


class AnnotateSharding(ProgramPass):
    """Plan expert parallelism for the model the selected sites make.

    Requires: selected sites (`SelectSites`).
    Guarantees: ``program.sharding`` names every parameter the converted model will have
        exactly once: expert tensors (``<site>.experts.w_*`` / ``b_*``) split on dim 0
        over the ``expert`` mesh axis, routers and every other parameter replicated.
        The distributed runtime, checkpoint loading and ONNX's sharding annotations
        read this plan.
    Preserves the computation: yes (an analysis: nothing is changed).
    """

    def requires(self, program: Program) -> None:  # type: ignore[override]
        if program.analysis is None:
            raise self.fail("run FindFFN and SelectSites first")

    def run(self, program: Program) -> bool:
        program.sharding = plan_sharding(program.model, tuple(program.selected), program.config)
        return False
