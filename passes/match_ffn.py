"""The FFN analysis: find every feed-forward subgraph by dataflow, mutate nothing.

An FFN site is, in a traced graph (`moeify.compiler.trace.Graph`):

    x ──up (d->f)──▶ act ──(dropout)──▶ down (f->d)          plain
    x ──gate (d->f)──▶ act ─┐
    x ──up   (d->f)─────────┴─ * ──(dropout)──▶ down (f->d)   gated (SwiGLU, GeGLU)

matched structurally: projections are found by module type (`nn.Linear`, HF
`Conv1D`), the ops between them are *probed*: run on a test tensor, they must be
elementwise (each output element depends on its own input element only) and equal
one of the supported activations. Nothing here knows a module name.

Every candidate that fails keeps a `Rejection` with its reason. A site also carries
its rewrite plan (`FFNSite.replace`): the modules that together compute exactly the
FFN and nothing else, so the rewrite is module surgery that leaves the rest of the
model's code (and class) untouched. A candidate without such a cover is rejected here,
before anything is mutated.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from moeify.compiler.plan import FFNSite, Projection, Rejection
from moeify.compiler.trace import Graph
from moeify.config import Activation
from moeify.switch.experts import activation_fn

MAX_OPS_BETWEEN = 64  # ops between projections that an FFN may have (activations are few)


# --- the analysis --------------------------------------------------------------------------


@dataclass(frozen=True)
class Half:
    """Half of a possible FFN at the edge of a graph: an up-projection whose activation
    is the graph's output, or a down-projection fed straight from a graph input."""

    kind: str  # "up" or "down"
    projection: Projection
    graph: str  # Graph.describe() of where it was seen

    def pairs_with(self, other: Half) -> bool:
        up, down = (self, other) if self.kind == "up" else (other, self)
        return (
            up.kind == "up" and down.kind == "down" and up.graph != down.graph
            and up.projection.in_features == down.projection.out_features
            and up.projection.out_features == down.projection.in_features
        )


def find_ffn_sites(graphs: Iterable[Graph]) -> tuple[list[FFNSite], list[Rejection], list[Half]]:
    """Match FFNs in ``graphs``: sites, rejections and halves at graph edges.

    Two halves that pair up (`Half.pairs_with`) across graphs are an FFN whose middle
    runs in code none of these graphs contains.
    """
    sites: list[FFNSite] = []
    rejected: list[Rejection] = []
    halves: list[Half] = []
    for graph in graphs:
        for down_node, down in graph.projections.items():
            outcome = _match(graph, down_node, down)
            if isinstance(outcome, FFNSite):
                sites.append(outcome)
            elif isinstance(outcome, Rejection):
                rejected.append(outcome)
            elif outcome == "partial":
                halves.append(Half("down", down, graph.describe()))
        halves += [Half("up", p, graph.describe()) for p in _dangling_up_projections(graph)]
    return sites, rejected, halves


def assign_stacks(sites: Iterable[FFNSite], module_order: list[str]) -> list[FFNSite]:
    """Group sites into stacks by path pattern and number them in module order."""
    position = {path: i for i, path in enumerate(module_order)}
    ordered = sorted(sites, key=lambda s: position.get(s.path, len(position)))
    counters: dict[str, int] = {}
    result = []
    for site in ordered:
        stack = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", site.path)
        index = counters.get(stack, 0)
        counters[stack] = index + 1
        result.append(_replace(site, stack=stack, index=index))
    return result


def _replace(site: FFNSite, **changes) -> FFNSite:
    import dataclasses

    return dataclasses.replace(site, **changes)


# --- matching one down-projection ----------------------------------------------------------


@dataclass
class _Between:
    """The ops between the boundary projections and the down-projection."""

    nodes: list[fx.Node] = field(default_factory=list)  # in graph order
    boundary: list[fx.Node] = field(default_factory=list)  # projection nodes feeding them
    edge: fx.Node | None = None  # a graph input/attribute reached instead


def _walk_back(graph: Graph, down_node: fx.Node) -> _Between | str:
    seen: set[fx.Node] = set()
    between = _Between()
    frontier = [_tensor_input(down_node)]
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in graph.projections:
            between.boundary.append(node)
            continue
        if node.op in ("placeholder", "get_attr"):
            between.edge = between.edge or node
            continue
        between.nodes.append(node)
        if len(between.nodes) > MAX_OPS_BETWEEN:
            return f"more than {MAX_OPS_BETWEEN} ops between projections"
        frontier.extend(node.all_input_nodes)
    order = {n: i for i, n in enumerate(graph.graph.nodes)}
    between.nodes.sort(key=order.__getitem__)
    between.boundary.sort(key=order.__getitem__)
    return between


def _match(graph: Graph, down_node: fx.Node, down: Projection) -> FFNSite | Rejection | str | None:
    found_by = graph.describe()
    reject = lambda reason: Rejection(down.path, reason, found_by)  # noqa: E731
    between = _walk_back(graph, down_node)
    if isinstance(between, str):
        return None  # deep inside other computation (attention): not an FFN candidate
    if not between.boundary:
        if between.edge is not None and between.edge.op == "placeholder" and all(
            _is_passthrough_candidate(graph, n) for n in between.nodes
        ):
            return "partial"
        return None
    ups = [graph.projections[n] for n in between.boundary]
    if not any(u.out_features == down.in_features or u.in_features == down.out_features
               for u in ups):
        return None  # no width lines up: not shaped like an FFN, nothing worth reporting
    names = ", ".join(p.path for p in ups)
    where = f"{names} -> {down.path}"
    reject = lambda reason: Rejection(where, reason, found_by)  # noqa: E731
    if between.edge is not None:
        return reject(
            f"the ops before {down.path} also read {_describe_node(graph, between.edge)}, "
            "not only the up-projection"
        )
    if len(ups) > 2:
        return reject(f"{len(ups)} projections feed {down.path} ({names}); an FFN has 1 or 2")
    for up in ups:
        if up.in_features != down.out_features:
            return reject(f"output width {down.out_features} != input width {up.in_features}")
        if up.out_features != down.in_features:
            return reject(
                f"hidden width {up.out_features} of {up.path} != input width "
                f"{down.in_features} of {down.path}"
            )
    if len({_tensor_input(n) for n in between.boundary}) != 1:
        return reject(f"{names} read different inputs; a gated FFN's projections share one")
    if len({p.bias for p in ups + [down]}) != 1:
        return reject("some projections have a bias and some do not")
    inside = set(between.nodes) | set(between.boundary)
    for node in inside:
        outside = [u for u in node.users if u not in inside and u is not down_node]
        if outside:
            return reject(
                f"{_describe_node(graph, node)} is also used outside the FFN "
                f"(by {_describe_node(graph, outside[0])})"
            )
    probe = _probe(graph, between, down_node)
    if isinstance(probe, str):
        return reject(probe)
    activation, gate_position = probe
    gate = None
    up_index = 0
    if len(ups) == 2:
        gate = ups[gate_position]
        up_index = 1 - gate_position
    up = ups[up_index]
    cover = _cover(graph, between, down_node)
    if isinstance(cover, str):
        return reject(cover)
    modules, attributes = cover
    dropout = _combined_dropout(_dropout_p(graph, n) for n in between.nodes)
    return FFNSite(
        path=modules[0], replace=tuple(modules), bypass_attributes=tuple(attributes), up=up,
        gate=gate, down=down, activation=activation, dropout=dropout, found_by=found_by,
    )


def _dangling_up_projections(graph: Graph) -> list[Projection]:
    """Projections whose single-input successors (at least one) reach the graph's output."""
    found = []
    for node, proj in graph.projections.items():
        current, steps = node, 0
        while len(current.users) == 1 and steps < 8:
            (user,) = current.users
            if user.op == "output":
                if steps:
                    found.append(proj)
                break
            if not _is_passthrough_candidate(graph, user) or user in graph.projections:
                break
            current, steps = user, steps + 1
    return found


# --- probing the ops between projections ---------------------------------------------------


_DROPOUT_FUNCTIONS: set[Callable] = {F.dropout, torch.dropout}
_DROPOUT_OPS = {torch.ops.aten.dropout.default}


def _is_dropout(graph: Graph, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(graph.modules[graph.owners[node][-1]], nn.modules.dropout._DropoutNd)
    return node.op == "call_function" and (
        node.target in _DROPOUT_FUNCTIONS or node.target in _DROPOUT_OPS
    )


def _dropout_p(graph: Graph, node: fx.Node) -> float:
    """The rate of a dropout node (0.0 for any other node).

    Its ``training`` argument is not read: fx records ``self.training`` as the constant
    of the mode the model was traced in, while the rate applies in training mode.
    """
    if not _is_dropout(graph, node):
        return 0.0
    if node.op == "call_module":
        p = graph.modules[graph.owners[node][-1]].p
    else:
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        return 0.0  # a rate computed at run time: nothing to read statically
    return float(p)


def _combined_dropout(rates: Iterable[float]) -> float:
    """One dropout rate equivalent to several in a row: inverted dropouts keep an element
    with probability ``prod(1 - p)`` and scale it by its inverse, exactly one dropout
    of rate ``1 - prod(1 - p)`` (a single rate is returned as is)."""
    rates = [p for p in rates if p > 0]
    if len(rates) <= 1:
        return rates[0] if rates else 0.0
    keep = 1.0
    for p in rates:
        keep *= 1.0 - p
    return 1.0 - keep


def _is_passthrough_candidate(graph: Graph, node: fx.Node) -> bool:
    """Single-tensor-input ops (activations, dropout, casts) at a graph's edge."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return False
    return len(node.all_input_nodes) == 1


def _tensor_input(node: fx.Node) -> fx.Node:
    return node.args[0]


def _run(graph: Graph, between: _Between, inputs: list[torch.Tensor]) -> torch.Tensor:
    env: dict[fx.Node, object] = dict(zip(between.boundary, inputs))
    for node in between.nodes:
        if _is_dropout(graph, node):
            env[node] = env[node.all_input_nodes[0]]
            continue
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "call_module":
            env[node] = graph.modules[graph.owners[node][-1]](*args, **kwargs)
        elif node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            raise ValueError(f"unexpected {node.op} node {node.name}")
    return env[between.nodes[-1]] if between.nodes else env[between.boundary[0]]


def _probe_shape(node: fx.Node, width: int) -> tuple[int, ...]:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return (2, 3, width)


def _probe(graph: Graph, between: _Between, down_node: fx.Node) -> tuple[Activation, int] | str:
    """(activation, index of the activated boundary projection) or why not."""
    ops = ", ".join(_describe_node(graph, n) for n in between.nodes) or "nothing"
    if not between.nodes or all(_is_dropout(graph, n) for n in between.nodes):
        return "no activation between the projections (two linear maps in a row are one)"
    width = graph.projections[between.boundary[0]].out_features
    shape = _probe_shape(between.boundary[0], width)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=generator) * 3 for _ in between.boundary]
    try:
        with torch.no_grad():
            out = _run(graph, between, inputs)
            if not isinstance(out, torch.Tensor) or out.shape != inputs[0].shape:
                return f"the ops between the projections ({ops}) change the shape"
            for which in range(len(inputs)):
                if not _elementwise(graph, between, inputs, out, which):
                    return f"activation {ops} is not elementwise-pointwise"
    except Exception as error:  # noqa: BLE001 - the reason is reported, not swallowed
        return f"could not evaluate the ops between the projections ({ops}): {error}"
    if len(inputs) == 1 and torch.equal(out, inputs[0]):
        return "no activation between the projections (two linear maps in a row are one)"
    for activation in Activation:
        act = activation_fn(activation)
        if len(inputs) == 1:
            if torch.allclose(out, act(inputs[0]), rtol=1e-4, atol=1e-5):
                return activation, 0
            continue
        for gate_position in (0, 1):
            expected = act(inputs[gate_position]) * inputs[1 - gate_position]
            if torch.allclose(out, expected, rtol=1e-4, atol=1e-5):
                return activation, gate_position
    supported = ", ".join(a.value for a in Activation)
    kind = "gated activation" if len(inputs) == 2 else "activation"
    return f"{kind} {ops} is elementwise but none of the supported {supported}"


def _elementwise(graph, between, inputs, out, which: int) -> bool:
    """Changing one input element changes at most the same output element."""
    flat = inputs[which].numel()
    for index in (0, flat // 2 + 1, flat - 1):
        changed = [t.clone() for t in inputs]
        changed[which].view(-1)[index] += 0.731
        diff = (_run(graph, between, changed) != out).view(-1)
        diff[index] = False
        if bool(diff.any()):
            return False
    return True


# --- the rewrite plan: modules that compute exactly the FFN --------------------------------


def _cover(graph: Graph, between: _Between, down_node: fx.Node) -> tuple[list[str], list[str]] | str:
    """(modules, attributes) that compute exactly the FFN, or why there are none.

    Modules: the largest modules all of whose work is part of the FFN, in dataflow
    order. Attributes: a plain function attribute of a module (``self.activation =
    F.relu``) applied in that module's own code, which the rewrite replaces with a
    pass-through; allowed only when nothing else in that module's code applies it.
    """
    chain = set(between.nodes) | set(between.boundary) | {down_node}
    live = _live_nodes(graph.graph)
    used: dict[str, set[fx.Node]] = {}
    for node in graph.graph.nodes:
        if node.op in ("placeholder", "output") or node not in live:
            continue  # dead code (shape reads a module makes and drops) is not work
        for path in graph.owners.get(node, ()):
            used.setdefault(path, set()).add(node)
    candidates = {p for n in chain for p in graph.owners.get(n, ()) if p}
    coverable = {p for p in candidates if used.get(p) and used[p] <= chain}
    maximal = [p for p in coverable if not any(_is_ancestor(q, p) for q in coverable)]
    order = list(graph.graph.nodes)
    segments: dict[str, set[fx.Node]] = {
        p: {n for n in chain if p in graph.owners.get(n, ())} for p in maximal
    }
    attributes = []
    for node in sorted(chain, key=order.index):
        if any(p in maximal for p in graph.owners.get(node, ())):
            continue
        owner = next((p for p in reversed(graph.owners.get(node, ())) if p), "")
        attribute = _function_attribute(graph, node, owner, used.get(owner, set()))
        if attribute is None:
            owner_desc = f"{owner} ({type(graph.modules[owner]).__name__})" if owner else "the model"
            return (
                f"{_describe_node(graph, node)} runs in the code of {owner_desc}, which also "
                "computes other things; moeify rewrites whole modules only"
            )
        attributes.append(attribute)
        segments[attribute] = {node}
    pieces = sorted(segments, key=lambda p: min(order.index(n) for n in segments[p]))
    if pieces[0] in attributes:
        return f"the FFN starts in code of {pieces[0].rpartition('.')[0]}, not in a module"
    previous_exit = _tensor_input(between.boundary[0])
    for piece in pieces:
        nodes = segments[piece]
        inputs = {
            i for n in nodes for i in n.all_input_nodes
            if i not in nodes and not graph.is_weight(i)
        }
        if inputs != {previous_exit}:
            return (
                f"the FFN's pieces {', '.join(pieces)} are not a simple chain "
                f"({piece} reads {len(inputs)} outside values)"
            )
        exits = [n for n in nodes if any(u not in nodes for u in n.users)]
        if len(exits) != 1:
            return f"{piece} hands more than one value onward"
        previous_exit = exits[0]
    if previous_exit is not down_node:
        return f"the FFN's last piece {pieces[-1]} does not end with {graph.projections[down_node].path}"
    return [p for p in pieces if p not in attributes], attributes


def _live_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes the graph's output depends on."""
    live: set[fx.Node] = set()
    frontier = [n for n in graph.nodes if n.op == "output"]
    while frontier:
        node = frontier.pop()
        if node not in live:
            live.add(node)
            frontier.extend(node.all_input_nodes)
    return live


def _function_attribute(graph: Graph, node: fx.Node, owner: str, owner_nodes) -> str | None:
    """``owner.name`` if a plain function attribute of ``owner`` is what ``node`` applies."""
    if not owner or node.op != "call_function" or len(node.all_input_nodes) != 1:
        return None
    direct = [
        n for n in owner_nodes
        if graph.owners.get(n) and graph.owners[n][-1] == owner and n.target == node.target
    ]
    if direct != [node]:
        return None  # the same op runs elsewhere in the owner's code
    module = graph.modules[owner]
    probe = torch.randn(3, 7, generator=torch.Generator().manual_seed(1)) * 3
    try:
        args = fx.node.map_arg(node.args, lambda _: probe)
        kwargs = fx.node.map_arg(node.kwargs, lambda _: probe)
        expected = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - not a probe-able function: no attribute match
        return None
    matches = []
    for name, value in vars(module).items():
        if name.startswith("_") or not callable(value) or isinstance(value, (nn.Module, type)):
            continue
        try:
            if value is node.target or torch.equal(value(probe), expected):
                matches.append(name)
        except Exception:  # noqa: BLE001 - a callable of another kind, not the activation
            continue
    return f"{owner}.{matches[0]}" if len(matches) == 1 else None


def _is_ancestor(a: str, b: str) -> bool:
    return a != b and (a == "" or b.startswith(a + "."))


def _describe_node(graph: Graph, node: fx.Node) -> str:
    if node.op == "call_module":
        path = graph.owners[node][-1]
        return f"{path} ({type(graph.modules[path]).__name__})"
    if node.op in ("placeholder", "get_attr"):
        return f"{node.op} {node.target}"
    target = node.target
    if node.op == "call_method":
        return f".{target}()"
    packet = getattr(target, "overloadpacket", None)  # aten ops from torch.export
    name = getattr(packet or target, "__name__", None) or str(target)
    return "mul" if target is operator.mul else name
