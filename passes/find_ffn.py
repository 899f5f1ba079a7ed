"""`FindFFN`: the analysis pass (trace, match, record), no mutation."""

from __future__ import annotations

import dataclasses

from torch import nn

from moeify.compiler.plan import FFNAnalysis, Rejection, plan_of
from moeify.compiler.program import Program
from moeify.compiler.trace import (
    default_example_inputs,
    export_dataflow,
    projections,
    trace_regions,
)
from moeify.passes._base import ProgramPass
from moeify.passes.match_ffn import assign_stacks, find_ffn_sites
from moeify.switch import SwitchFFN


class FindFFN(ProgramPass):
    """Find every FFN site of the model.

    Requires: a model not converted yet.
    Guarantees: ``program.analysis`` lists every site (with stack, index, rewrite plan,
        causality (`is_causal_site`) and how it was found) and every rejected candidate
        with its reason.
    Preserves the computation: yes (an analysis; the model is not touched).

    Strategy (`moeify.compiler.trace`): symbolic regions first; when they leave halves of an
    FFN at a region's edge (an FFN spread over sibling modules, or inside a module fx
    cannot enter), the whole model's dataflow from ``torch.export(strict=False)`` on
    the example inputs (the model's own ``dummy_inputs`` if none were given).
    """

    def requires(self, program: Program) -> None:  # type: ignore[override]
        model = program.model
        if plan_of(model) is not None or any(
            isinstance(m, SwitchFFN) for m in model.modules()
        ):
            raise self.fail(
                "the model is already converted (it has Switch layers); convert the dense "
                "source model instead"
            )

    def run(self, program: Program) -> bool:
        model = program.model
        program.progress("tracing", 0, 1)
        program.trace = trace_regions(model)
        sites, rejected, halves = find_ffn_sites(program.trace.regions)
        examined = [g.describe() for g in program.trace.regions]
        found = {s.down.path for s in sites}
        partial = {
            h.projection.path for h in halves if any(h.pairs_with(o) for o in halves)
        } | _unreached_pairs(model, program.trace)
        partial -= found | {s.up.path for s in sites}
        if partial:
            inputs = program.example_inputs or default_example_inputs(model)
            if inputs is None:
                rejected += [
                    Rejection(
                        path,
                        "half of a possible FFN whose other half is in code fx cannot trace; "
                        "pass example_inputs so moeify can follow the dataflow with "
                        "torch.export",
                        "fx.symbolic_trace",
                    )
                    for path in sorted(partial)
                ]
            else:
                program.dataflow = export_dataflow(model, inputs)
                examined.append(program.dataflow.describe())
                more, more_rejected, _ = find_ffn_sites([program.dataflow])
                sites += [s for s in more if s.down.path not in found]
                claimed = {p for s in sites for p in (s.up.path, s.down.path)}
                rejected += [r for r in more_rejected if not _mentions(r, claimed)]
        order = [path for path, _ in model.named_modules()]
        sites = [dataclasses.replace(s, causal=is_causal_site(model, s.path))
                 for s in assign_stacks(sites, order)]
        program.analysis = FFNAnalysis(
            sites=tuple(sites),
            rejected=tuple(rejected),
            examined=tuple(examined)
            + tuple(f"opaque {o.path or '<root>'} ({o.type_name}): {o.reason}"
                    for o in program.trace.opaque),
        )
        program.progress("tracing", 1, 1)
        return False


def is_causal_site(model: nn.Module, path: str) -> bool:
    """Whether the FFN at ``path`` runs in a causal stack (attention that hides later
    tokens), read from the markers transformers' modules carry, on any device.

    From the FFN's parent outwards, the first module that is marked decides: one with
    ``is_decoder=True`` (T5's decoder stack and blocks, BERT's layers of a decoder) is
    causal; otherwise the first whose submodules include an attention with a boolean
    ``is_causal`` (GPT-2, Llama, T5 and BERT attention) is causal iff one of them is
    (T5's decoder block: its self-attention is, its cross-attention is not). A model
    without these markers (a plain torch model, nanoGPT masking inside ``forward``)
    reads as not causal: expert choice is its user's call there.
    """
    parts = path.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        ancestor = model.get_submodule(".".join(parts[:depth]))
        if getattr(ancestor, "is_decoder", None) is True:
            return True
        flags = [m.is_causal for m in ancestor.modules()
                 if isinstance(getattr(m, "is_causal", None), bool)]
        if flags:
            return any(flags)
    return False


def _unreached_pairs(model, trace) -> set[str]:
    """Projections outside every region that could pair into an FFN (d->f, f->d, f != d)."""
    reached = {p.path for g in trace.regions for p in g.projections.values()}
    loose = [p for path, p in projections(model).items() if path not in reached]
    parent = lambda p: p.path.rpartition(".")[0]  # noqa: E731
    found = set()
    def siblings(proj):
        shape = (proj.in_features, proj.out_features)
        return sum(parent(p) == parent(proj) and (p.in_features, p.out_features) == shape
                   for p in loose)

    for up in loose:
        if siblings(up) > 2:
            continue  # q, k, v: an FFN has one or two up-projections
        for down in loose:
            if siblings(down) > 1:
                continue  # and exactly one down-projection
            if (up.out_features == down.in_features != up.in_features == down.out_features):
                found |= {up.path, down.path}
    return found


def _mentions(rejection: Rejection, paths: set[str]) -> bool:
    return any(p in rejection.where.replace(" -> ", ", ").split(", ") for p in paths)
