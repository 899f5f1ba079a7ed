"""Convert straight into a checkpoint without holding the whole MoE model in memory.

t5-base with 64 experts is ~15 GB of float32 weights: more than fits beside the dense
model on a 24 GB machine if built at once. `convert_to_checkpoint` runs the standard
pipeline with lazy upcycling (experts and routers on the meta device, each site's dense
weights kept), then writes the checkpoint tensor by tensor: non-expert weights straight
from the model, each Switch layer materialized when the writer reaches it and dropped
after. Copied experts without noise are not materialized at all: the dense matrix is
written E times. Seeds are the ones the in-memory pipeline uses, so the checkpoint is
the one ``convert`` + ``save`` would write.

Peak memory: the dense model plus one Switch layer (less for plain copies).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from moeify.config import Init, MoEConfig
from moeify.errors import MoEError
from moeify.report import ConversionReport
from moeify.sources import Source


def convert_to_checkpoint(
    model: nn.Module,
    config: MoEConfig,
    path: str | os.PathLike,
    *,
    seq_len: int | None = None,
    source: Source | None = None,
    force: bool = False,
    max_shard_bytes: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ConversionReport:
    """Convert ``model`` (in place, leaving Switch layers on meta) and write it to ``path``."""
    from moeify.checkpoint import DEFAULT_SHARD_BYTES, atomic_directory, write_checkpoint
    from moeify.pipeline import default_pipeline, run_pipeline
    from moeify.program import CONVERSION_ATTR, Program

    if Path(path).exists() and not force:  # fail before the work, not after it
        atomic_directory(path, force=False).__enter__()
    params_dense = sum(p.numel() for p in model.parameters())
    program = Program(model, config, seq_len=seq_len, progress=progress)
    run_pipeline(default_pipeline(config, seq_len=seq_len, lazy_experts=True), program)
    model.__dict__[CONVERSION_ATTR] = program.conversion()
    sites = {site.path: site for site in program.selected}
    materialize = _Materializer(program, sites)
    write_checkpoint(
        model, path, materialize.fetch, source=source, force=force,
        max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES, progress=progress,
    )
    return ConversionReport.build(
        type(model).__name__, config, program.seq_len, program.analysis, program.selected,
        params_dense,
    )


class _Materializer:
    """Supplies the tensors of meta Switch layers, one layer at a time."""

    def __init__(self, program, sites) -> None:
        self.program = program
        self.sites = sites
        self.current: tuple[str, dict[str, list[torch.Tensor]]] | None = None

    def fetch(self, name: str) -> Iterable[torch.Tensor]:
        path = next((p for p in self.sites if name.startswith(p + ".")), None)
        if path is None:
            raise MoEError(f"{name} is on the meta device but belongs to no converted site")
        if self.current is None or self.current[0] != path:
            self.current = (path, self._layer(path))
        return self.current[1][name[len(path) + 1:]]

    def _layer(self, path: str) -> dict[str, list[torch.Tensor]]:
        from moeify.passes.upcycle import build_experts, site_generator
        from moeify.switch.layer import Router

        program, site = self.program, self.sites[path]
        c = program.config
        dense = program.dense[path]
        router = Router(site.d_model, c.num_experts, jitter_eps=c.jitter_eps,
                        router_dtype=c.router_dtype)
        router.reset_parameters(site_generator(c.seed, site, torch.device("cpu"), "router"))
        tensors: dict[str, list[torch.Tensor]] = {"router.weight": [router.weight.detach()]}
        if c.init == Init.COPY and c.noise == 0:
            pairs = {"w_in": dense.w_in, "w_out": dense.w_out, "w_gate": dense.w_gate,
                     "b_in": dense.b_in, "b_out": dense.b_out, "b_gate": dense.b_gate}
            for name, source in pairs.items():
                if source is not None:
                    source = source.detach().contiguous()
                    tensors[f"experts.{name}"] = [source] * c.num_experts
        else:
            experts = build_experts(site, c, dense, device="cpu")
            for name, param in experts.named_parameters():
                tensors[f"experts.{name}"] = [param.detach()]
        return tensors
