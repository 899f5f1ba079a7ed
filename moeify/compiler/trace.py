"""Tracing: turn a model nobody prepared for us into fx graphs with module paths.

Two strategies, tried in this order (docs/compiler.md, section 1, has why):

1. **Symbolic regions** (`trace_regions`): ``torch.fx`` symbolic tracing, bottom-up.
   Every module that holds a projection is traced with its untraceable descendants
   kept opaque (leaf calls); the largest modules that trace are the *regions*. A
   model that traces as a whole is one region, the root. Needs no inputs and touches
   no weights, so it works on the meta device.
2. **Export dataflow** (`export_dataflow`): ``torch.export.export(strict=False)`` of
   the whole model on example inputs. Its nodes carry ``nn_module_stack``, which ties
   every op to the module that ran it, so it sees an FFN whose pieces live in sibling
   modules joined by untraceable code (BERT's ``intermediate`` -> ``output.dense``).

Both produce `Graph` records: an fx graph, the module that owns it, and for every
node the module paths it ran inside. The FFN analysis (`moeify.passes.match_ffn`)
reads nothing else.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from moeify.compiler.plan import Projection, ProjectionKind
from moeify.switch import SwitchFFN

# --- projections: the linear-like modules an FFN is built from ---------------------------


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def projection_of(module: nn.Module, path: str = "") -> Projection | None:
    """The `Projection` a module computes, or None if it is not a linear map."""
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        return Projection(path, ProjectionKind.LINEAR, module.in_features, module.out_features, bias)
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        n_in, n_out = module.weight.shape
        return Projection(path, ProjectionKind.CONV1D, n_in, n_out, bias)
    return None


def projections(model: nn.Module) -> dict[str, Projection]:
    """Every projection in the model by qualified path, in module order."""
    found = {}
    for path, module in model.named_modules():
        proj = projection_of(module, path)
        if proj is not None:
            found[path] = proj
    return found


# --- graphs -------------------------------------------------------------------------------


class TraceMethod(str, enum.Enum):
    SYMBOLIC = "fx.symbolic_trace"
    EXPORT = "torch.export(strict=False)"


@dataclass
class Graph:
    """One traced program: an fx graph and where its nodes come from.

    root: path of the module the graph computes ("" = the model).
    owners: for each node, the module paths (absolute, outermost first, the model
        itself left out) it ran inside; a leaf ``call_module`` node also lists its target.
    projections: the projection each projection node applies, by node.
    weights: for export graphs, the placeholders that carry parameters and buffers.
    """

    method: TraceMethod
    root: str
    graph: fx.Graph
    modules: Mapping[str, nn.Module]
    owners: dict[fx.Node, tuple[str, ...]] = field(default_factory=dict)
    projections: dict[fx.Node, Projection] = field(default_factory=dict)
    weights: set[fx.Node] = field(default_factory=set)

    def is_weight(self, node: fx.Node) -> bool:
        """A parameter or buffer read (get_attr, or an export graph's lifted input)."""
        return node.op == "get_attr" or node in self.weights

    def describe(self) -> str:
        where = f" of {self.root}" if self.root else " of the whole model"
        return f"{self.method.value}{where}"


@dataclass(frozen=True)
class Opaque:
    """A module that symbolic tracing could not enter, with the first line of why."""

    path: str
    type_name: str
    reason: str


@dataclass
class TraceResult:
    regions: list[Graph]
    opaque: list[Opaque]

    @property
    def whole(self) -> bool:
        """Whether the model traced symbolically as one graph."""
        return len(self.regions) == 1 and self.regions[0].root == ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


# --- strategy 1: symbolic regions ----------------------------------------------------------


class _RegionTracer(fx.Tracer):
    """Leaves: projections, modules without projections, and known-opaque modules."""

    def __init__(self, holds_projection: set[int], opaque: set[int]) -> None:
        super().__init__()
        self.holds_projection = holds_projection
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            id(m) in self.opaque
            or id(m) not in self.holds_projection
            or projection_of(m) is not None
            or isinstance(m, SwitchFFN)
        )


def _holding_projections(model: nn.Module) -> set[int]:
    """ids of modules that contain a projection (themselves or below)."""
    holds: set[int] = set()

    def visit(module: nn.Module) -> bool:
        found = projection_of(module) is not None
        for child in module.children():
            found = visit(child) or found
        if found:
            holds.add(id(module))
        return found

    visit(model)
    return holds


def _post_order(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        yield from _post_order(child, _join(prefix, name))
    yield prefix, module


def trace_regions(model: nn.Module) -> TraceResult:
    """Symbolically trace the largest traceable modules of ``model`` (bottom-up)."""
    holds = _holding_projections(model)
    opaque_ids: set[int] = set()
    opaque: list[Opaque] = []
    traced: dict[str, fx.Graph] = {}
    modules = dict(model.named_modules())
    for path, module in _post_order(model):
        if id(module) not in holds or projection_of(module) is not None:
            continue
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            opaque_ids.add(id(module))  # containers have no forward: their users decide
            continue
        tracer = _RegionTracer(holds, opaque_ids)
        try:
            traced[path] = tracer.trace(module)
        except Exception as error:  # noqa: BLE001 - any failure means "opaque", recorded
            opaque_ids.add(id(module))
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            opaque.append(Opaque(path, type(module).__name__, first_line[:200]))
    regions = []
    for path, graph in traced.items():
        ancestors = [path[:i] for i, ch in enumerate(path) if ch == "."] + ([""] if path else [])
        if not any(a in traced for a in ancestors):
            regions.append(_symbolic_graph(path, graph, modules))
    regions.sort(key=lambda g: list(modules).index(g.root))
    return TraceResult(regions=regions, opaque=opaque)


def _symbolic_graph(root: str, graph: fx.Graph, modules: Mapping[str, nn.Module]) -> Graph:
    result = Graph(TraceMethod.SYMBOLIC, root, graph, modules)
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack", {})
        paths = [root] + [_join(root, path) for path, _ in stack.values()]
        if node.op == "call_module":
            target = _join(root, node.target)
            paths.append(target)
            proj = projection_of(modules[target], target)
            if proj is not None:
                result.projections[node] = proj
        result.owners[node] = tuple(dict.fromkeys(p for p in paths if p))
    return result


# --- strategy 2: export dataflow -----------------------------------------------------------


def export_dataflow(
    model: nn.Module, example_inputs: tuple[tuple, dict[str, Any]]
) -> Graph:
    """The whole model's dataflow from ``torch.export.export(strict=False)``.

    Exported in training mode (and restored) so modules with an eval-only fused fast
    path, such as ``nn.TransformerEncoderLayer``, show their individual ops.
    """
    args, kwargs = example_inputs
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            program = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    signature = program.graph_signature
    params = dict(signature.inputs_to_parameters)
    lifted = set(params) | set(signature.inputs_to_buffers)
    result = Graph(TraceMethod.EXPORT, "", program.graph, modules)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in lifted:
            result.weights.add(node)
        stack = node.meta.get("nn_module_stack", {})
        result.owners[node] = tuple(path for path, _ in stack.values() if path)
        if node.op == "call_function" and node.target is torch.ops.aten.linear.default:
            weight = node.args[1]
            param = params.get(getattr(weight, "name", None), "")
            path = param.removesuffix(".weight")
            if param.endswith(".weight") and path in modules:
                proj = projection_of(modules[path], path)
                if proj is not None and proj.kind == ProjectionKind.LINEAR:
                    result.projections[node] = proj
    return result


def default_example_inputs(model: nn.Module) -> tuple[tuple, dict[str, Any]] | None:
    """Inputs that run the model, when it can say so itself (HF ``dummy_inputs``)."""
    dummy = getattr(model, "dummy_inputs", None)
    if not isinstance(dummy, Mapping) or not dummy:
        return None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dummy.items()}
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", None) is not None:
        kwargs.setdefault("use_cache", False)
    return (), kwargs
