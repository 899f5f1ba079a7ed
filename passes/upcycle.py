"""`UpcycleExperts`: build each selected site's experts from its dense FFN."""

from __future__ import annotations

import zlib

import torch
from torch import nn

from moeify.config import Init
from moeify.passes._base import ProgramPass
from moeify.passes.find_ffn import FFNSite
from moeify.program import Program
from moeify.switch.experts import DenseFFNWeights, Experts


def dense_weights(model: nn.Module, site: FFNSite) -> DenseFFNWeights:
    """The site's dense FFN in ``x @ W`` layout, read from its projection modules."""
    modules = dict(model.named_modules())

    def weight_bias(proj):
        if proj is None:
            return None, None
        module = modules[proj.path]
        bias = getattr(module, "bias", None)
        return proj.weight_in_out(module), None if bias is None else bias.detach()

    (w_in, b_in), (w_out, b_out), (w_gate, b_gate) = (
        weight_bias(site.up), weight_bias(site.down), weight_bias(site.gate)
    )
    return DenseFFNWeights(w_in, w_out, b_in, b_out, w_gate, b_gate)


def site_generator(
    seed: int, site: FFNSite, device: torch.device, purpose: str = "experts"
) -> torch.Generator:
    """A generator seeded by the config seed, the site's path and the purpose.

    Independent of the order and number of sites, so selecting more layers does not
    change the weights of the others.
    """
    mixed = (seed * 1_000_003 + zlib.crc32(f"{purpose}:{site.path}".encode())) % (2**63)
    if torch.device(device).type == "meta":
        device = "cpu"  # meta tensors draw no numbers; any generator will do
    return torch.Generator(device=device).manual_seed(mixed)


def build_experts(
    site: FFNSite, config, dense: DenseFFNWeights, device: str | torch.device | None = None
) -> Experts:
    """A site's `Experts`, initialized from its dense FFN as ``config`` says (seeded).

    Their dropout is the one the dense FFN applied between its projections
    (``site.dropout``; the rewrite removes that dropout with the FFN), unless
    ``config.expert_dropout`` sets one rate for every site.
    """
    c = config
    device = dense.w_in.device if device is None else torch.device(device)
    d_ff = site.d_ff // c.num_experts if c.init == Init.PARTITION else site.d_ff
    experts = Experts(
        c.num_experts, site.d_model, d_ff, activation=site.activation, gated=site.gated,
        bias=site.bias, dropout=c.resolve_expert_dropout(site.dropout), device=device,
        dtype=dense.w_in.dtype,
    )
    if device.type != "meta":
        generator = site_generator(c.seed, site, device)
        experts.load_dense(dense, init=c.init, noise=c.noise, generator=generator)
    return experts


class UpcycleExperts(ProgramPass):
    """Build `Experts` for every selected site (``config.init``: copy, partition, random).

    Requires: `SelectSites` has run; for ``partition``, d_ff divisible by num_experts.
    Guarantees: ``program.experts[site.path]`` holds E experts in the dense FFN's dtype
        and device; copy: exact copies (plus ``noise`` if set); seeded per site from
        ``config.seed``, so the same seed gives bitwise identical weights; expert
        dropout ``config.expert_dropout``, or where that is None the site's own
        (``FFNSite.dropout``), so the converted layer drops where the dense FFN did.
    Preserves the computation: yes (the model is not touched yet).

    ``lazy=True`` builds the experts on the meta device instead and keeps each site's
    dense weights in ``program.dense``: `moeify.stream` materializes one layer at a
    time while writing a checkpoint, with the same seeds and therefore the same values.
    """

    def __init__(self, *, lazy: bool = False) -> None:
        self.lazy = lazy

    def requires(self, program: Program) -> None:  # type: ignore[override]
        if not program.selected:
            raise self.fail("no selected sites: run SelectSites first")
        c = program.config
        if c.init == Init.PARTITION:
            bad = [s.path for s in program.selected if s.d_ff % c.num_experts]
            if bad:
                raise self.fail(
                    f"init='partition' splits d_ff into {c.num_experts} experts, but d_ff of "
                    f"{bad[0]} ({program.selected[0].d_ff}) is not divisible by it; pick a "
                    "num_experts that divides d_ff or init='copy'"
                )

    def run(self, program: Program) -> bool:
        c = program.config
        total = len(program.selected)
        for done, site in enumerate(program.selected):
            dense = dense_weights(program.model, site)
            if self.lazy:
                program.dense[site.path] = dense
                experts = build_experts(site, c, dense, device="meta")
            else:
                experts = build_experts(site, c, dense)
            program.experts[site.path] = experts
            program.progress("upcycling experts", done + 1, total)
        return False
