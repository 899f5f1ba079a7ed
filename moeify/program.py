"""`Program`: what the conversion passes work on, and what a conversion leaves behind.

A pass (`moeify.passes`) is a ``torch.fx.passes.infra.pass_base.PassBase``: it takes
a `Program`, returns ``PassResult(program, modified)``. The program holds the user's
model and the typed records the passes hand each other (trace, FFN analysis, chosen
sites, built experts and routers, the sharding plan); nothing travels in ad-hoc
attributes of the model. After the pipeline, `Conversion` stays on the model so that
saving, exporting and the distributed runtime can find how it was converted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from moeify.config import MoEConfig

if TYPE_CHECKING:
    from moeify.passes.annotate_sharding import ShardingPlan
    from moeify.passes.find_ffn import FFNAnalysis, FFNSite
    from moeify.switch import DenseFFNWeights, Experts, Router, SwitchFFN
    from moeify.trace import Graph, TraceResult

CONVERSION_ATTR = "_moeify_conversion"


@dataclass(frozen=True)
class Conversion:
    """How a model was converted; kept on the model (see `conversion_of`)."""

    config: MoEConfig
    seq_len: int | None
    sites: tuple[FFNSite, ...]
    sharding: ShardingPlan | None = None


def conversion_of(model: nn.Module) -> Conversion | None:
    """The `Conversion` record of a converted model, None for a dense one."""
    return model.__dict__.get(CONVERSION_ATTR)


class Program(nn.Module):
    """A model being converted, with the records the passes produce.

    model: the user's module, rewritten in place by the transforming passes.
    trace / dataflow: symbolic regions and, when needed, the torch.export graph.
    analysis: every FFN site found and every rejected candidate (`find_ffn`).
    selected: the sites chosen for conversion, in module order.
    experts / routers / layers: built per selected site path.
    sharding: the expert-parallel plan.
    progress: callback ``(stage, done, total)`` the CLI turns into progress bars.
    """

    def __init__(
        self,
        model: nn.Module,
        config: MoEConfig,
        *,
        seq_len: int | None = None,
        example_inputs: tuple[tuple, dict[str, Any]] | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.seq_len = seq_len
        self.example_inputs = example_inputs
        self.progress = progress or (lambda stage, done, total: None)
        self.trace: TraceResult | None = None
        self.dataflow: Graph | None = None
        self.analysis: FFNAnalysis | None = None
        self.selected: list[FFNSite] = []
        self.experts: dict[str, Experts] = {}
        self.dense: dict[str, DenseFFNWeights] = {}  # kept by UpcycleExperts(lazy=True)
        self.routers: dict[str, Router] = {}
        self.layers: dict[str, SwitchFFN] = {}
        self.sharding: ShardingPlan | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def conversion(self) -> Conversion:
        return Conversion(self.config, self.seq_len, tuple(self.selected), self.sharding)
