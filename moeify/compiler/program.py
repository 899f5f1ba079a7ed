"""`Program`: what the conversion passes work on.

A pass (`moeify.passes`) is a ``torch.fx.passes.infra.pass_base.PassBase`` that takes a
`Program` and returns ``PassResult(program, modified)``. The program holds the user's
model and the typed records the passes hand each other: the analysis passes fill in
``analysis``, ``selected`` and ``sharding`` (together, `plan`); the transforming passes
read the plan and build, insert and configure the Switch layers. Nothing travels in
ad-hoc attributes of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from moeify.compiler.plan import ConversionPlan, FFNAnalysis, FFNSite, ShardingPlan
from moeify.compiler.trace import Graph, TraceResult
from moeify.config import MoEConfig
from moeify.switch import DenseFFNWeights, SwitchFFN

Progress = Callable[[str, int, int], None]


class Program:
    """A model being converted, with the records the passes produce.

    model: the user's module, rewritten in place by the transforming passes.
    config / seq_len: the Switch settings and the declared sequence length.
    example_inputs: ``(args, kwargs)`` that run the model, for dataflow tracing.
    trace / dataflow: symbolic regions and, when needed, the torch.export graph.
    analysis: every FFN site found and every rejected candidate.
    selected: the sites chosen for conversion, in module order.
    sharding: the expert-parallel layout of the converted model.
    layers: the Switch layer built for each selected site, by site path.
    dense: each selected site's dense weights, kept when layers are built on the meta
        device (the streaming writer materializes them from these).
    progress: callback ``(stage, done, total)`` the CLI turns into progress bars.
    """

    def __init__(
        self,
        model: nn.Module,
        config: MoEConfig,
        *,
        seq_len: int | None = None,
        example_inputs: tuple[tuple, dict[str, Any]] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.seq_len = seq_len
        self.example_inputs = example_inputs
        self.progress: Progress = progress or (lambda stage, done, total: None)
        self.trace: TraceResult | None = None
        self.dataflow: Graph | None = None
        self.analysis: FFNAnalysis | None = None
        self.selected: list[FFNSite] = []
        self.sharding: ShardingPlan | None = None
        self.params_dense = sum(p.numel() for p in model.parameters())
        self.layers: dict[str, SwitchFFN] = {}
        self.dense: dict[str, DenseFFNWeights] = {}

    @classmethod
    def from_plan(cls, model: nn.Module, plan: ConversionPlan, *,
                  progress: Progress | None = None) -> Program:
        """A program whose analysis is ``plan``'s, ready for the transforming passes."""
        program = cls(model, plan.config, seq_len=plan.seq_len, progress=progress)
        program.analysis = FFNAnalysis(plan.sites, plan.rejected, plan.examined)
        program.selected = list(plan.selected_sites)
        program.sharding = plan.sharding
        program.params_dense = plan.params_dense
        return program

    @property
    def plan(self) -> ConversionPlan:
        """The analysis so far, as a `ConversionPlan`."""
        analysis = self.analysis or FFNAnalysis((), ())
        return ConversionPlan(
            model=type(self.model).__name__, config=self.config, seq_len=self.seq_len,
            sites=analysis.sites, selected=tuple(s.path for s in self.selected),
            rejected=analysis.rejected, examined=analysis.examined, sharding=self.sharding,
            params_dense=self.params_dense,
        )
