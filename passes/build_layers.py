"""`BuildSwitchLayers`: make each selected site's Switch layer from its dense FFN."""

from __future__ import annotations

from moeify.compiler.plan import layer_config
from moeify.compiler.program import Program
from moeify.passes._base import ProgramPass
from moeify.switch import SwitchFFN


class BuildSwitchLayers(ProgramPass):
    """Build a `SwitchFFN` for every selected site: experts upcycled from the site's dense
    FFN (``config.init``: copy, partition, random), a new float32 router.

    Requires: selected sites (`SelectSites`, or a plan); for ``partition``, every
        selected site's d_ff divisible by num_experts.
    Guarantees: ``program.layers[site.path]`` is the site's layer, made by
        `SwitchFFN.from_dense` (seeded by ``config.seed`` and the site path, so any route
        gives bitwise identical weights), in the dense FFN's dtype and device and the
        model's train/eval mode, its expert dropout ``config.expert_dropout`` or the
        site's own (``FFNSite.dropout``), its config `layer_config` (token choice at a
        causal site under ``router="expert-choice"``). The model is not touched yet.
    Preserves the computation: yes (nothing is inserted).

    ``lazy=True`` builds the layers on the meta device and keeps each site's dense
    weights in ``program.dense``: the streaming checkpoint writer materializes one layer
    at a time from them (`moeify.io.streaming`). A model whose weights are on the meta device
    (loading a checkpoint) gets meta layers either way.
    """

    def __init__(self, *, lazy: bool = False) -> None:
        self.lazy = lazy

    def requires(self, program: Program) -> None:  # type: ignore[override]
        if not program.selected:
            raise self.fail("no selected sites: run SelectSites first (or apply a plan)")
        c = program.config
        split = c.hidden_split
        bad = next((s for s in program.selected if s.d_ff % split.parts), None)
        if bad is not None:
            raise self.fail(f"{split.who} splits d_ff into {split.parts} {split.unit}, but d_ff "
                            f"of {bad.path} ({bad.d_ff}) is not divisible by it; {split.fix}")

    def run(self, program: Program) -> bool:
        c = program.config
        total = len(program.selected)
        for done, site in enumerate(program.selected):
            dense = site.dense_weights(program.model)
            if self.lazy:
                program.dense[site.path] = dense
                dense = dense.to("meta")
            layer = SwitchFFN.from_dense(dense, layer_config(site, c), path=site.path,
                                         activation=site.activation, source_dropout=site.dropout)
            program.layers[site.path] = layer.train(program.model.training)
            program.progress("building Switch layers", done + 1, total)
        return False

    def __repr__(self) -> str:
        return f"BuildSwitchLayers(lazy={self.lazy})"
