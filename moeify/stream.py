"""Convert straight into a checkpoint without holding the whole MoE model in memory.

t5-base with 64 experts is ~15 GB of float32 weights: more than fits beside the dense
model on a 24 GB machine if built at once. `convert_to_checkpoint` applies the plan with
the Switch layers left on the meta device (each site's dense weights kept), then writes
the checkpoint tensor by tensor: non-expert weights straight from the model, each Switch
layer's tensors from `moeify.switch.upcycled_tensors` when the writer reaches them, and
dropped after. Plain copies are never materialized: the dense matrix is written E times.
`upcycled_tensors` is also what ``moeify.convert`` builds layers from, so the checkpoint
is the one ``convert`` + ``save`` would write.

Peak memory: the dense model plus one Switch layer (less for plain copies).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from moeify.api import apply_program
from moeify.checkpoint import DEFAULT_SHARD_BYTES, save
from moeify.errors import MoEError
from moeify.fs import check_free_space, check_output, output_lock
from moeify.conversion import ConversionPlan
from moeify.program import Program
from moeify.report import ConversionReport
from moeify.sources import Source
from moeify.switch import TensorSource, upcycled_tensors


def convert_to_checkpoint(
    model: nn.Module,
    plan: ConversionPlan,
    path: str | os.PathLike,
    *,
    source: Source | None = None,
    force: bool = False,
    max_shard_bytes: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ConversionReport:
    """Apply ``plan`` to ``model`` (in place, Switch layers left on meta) and write the
    converted model to ``path`` as a moeify checkpoint."""
    check_output(path, force=force)  # fail before the work, not after it
    with output_lock(path):  # no other writer from here to the final rename
        check_free_space(path, plan.nbytes(_dtype_of(model))["moe"])
        program = apply_program(model, plan, lazy=True, progress=progress)
        layers = _LayerTensors(program)
        save(model, path, source=source, force=force, fetch=layers.fetch,
             max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES, progress=progress)
    return ConversionReport.from_plan(program.plan)


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


class _LayerTensors:
    """Supplies the tensors of meta Switch layers, one layer at a time."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.sites = {site.path: site for site in program.selected}
        self.current: tuple[str, dict[str, TensorSource]] | None = None

    def fetch(self, name: str) -> Iterable[torch.Tensor]:
        path = next((p for p in self.sites if name.startswith(p + ".")), None)
        if path is None:
            raise MoEError(f"{name} is on the meta device but belongs to no converted site")
        if self.current is None or self.current[0] != path:
            site = self.sites[path]
            self.current = (path, upcycled_tensors(self.program.dense[path], self.program.config,
                                                   path=path, activation=site.activation))
        source = self.current[1][name[len(path) + 1:]]
        dtype = self.program.layers[path].get_parameter(name[len(path) + 1:]).dtype
        return [chunk.to(dtype) for chunk in source.chunks()]
