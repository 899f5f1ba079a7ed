"""`InsertRouter`: put a float32 router in front of each site's experts and swap the
resulting Switch layer into the model."""

from __future__ import annotations

from typing import Any

from torch import nn

from moeify.passes._base import ProgramPass
from moeify.passes.upcycle import site_generator
from moeify.program import Program
from moeify.switch.layer import Router, SwitchFFN


class Bypass(nn.Module):
    """Stands where a piece of a replaced FFN was: returns its first input unchanged.

    When an FFN spans several modules (BERT: ``intermediate`` then ``output.dense``),
    the first becomes the Switch layer and the others pass its output through.
    """

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


def passthrough(x: Any, *args: Any, **kwargs: Any) -> Any:
    """Replaces a function attribute that was part of a converted FFN (its activation)."""
    return x


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and name.isdigit():
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


def _disable_fused_fast_path(owner: nn.Module) -> None:
    """Keep ``nn.TransformerEncoderLayer`` off its fused inference kernel.

    In eval mode that kernel reads ``linear1`` / ``linear2`` weights directly and would
    bypass the Switch layer; it is taken only while ``activation_relu_or_gelu`` is set
    (the attribute ``nn.TransformerEncoder`` also checks before its nested-tensor path).
    """
    if hasattr(owner, "activation_relu_or_gelu"):
        owner.activation_relu_or_gelu = False


class InsertRouter(ProgramPass):
    """Create each selected site's router and replace the dense FFN by a `SwitchFFN`.

    Requires: `UpcycleExperts` has run.
    Guarantees: every selected site's ``replace[0]`` module is a `SwitchFFN` with a new
        router (truncated normal, std sqrt(0.1 / d_model), computed in float32,
        seeded per site) and the site's experts; the site's other modules are `Bypass`
        and its function attributes (an activation applied in a module's code) are
        pass-throughs; a module with a fused fast path that would skip the Switch
        layer (``nn.TransformerEncoderLayer`` in eval mode) has it turned off.
    Preserves the computation: with ``gate="normalized"`` and top-1 and nothing
        dropped, yes (upcycled copies); with the softmax gate each site computes
        ``p * FFN(x)``.
    """

    def requires(self, program: Program) -> None:  # type: ignore[override]
        missing = [s.path for s in program.selected if s.path not in program.experts]
        if missing or not program.selected:
            raise self.fail(f"no experts for {missing or 'any site'}: run UpcycleExperts first")

    def run(self, program: Program) -> bool:
        c = program.config
        total = len(program.selected)
        for done, site in enumerate(program.selected):
            experts = program.experts[site.path]
            device = experts.w_in.device
            router = Router(
                site.d_model, c.num_experts, jitter_eps=c.jitter_eps,
                router_dtype=c.router_dtype, device=device,
            )
            router.reset_parameters(site_generator(c.seed, site, device, "router"))
            layer = SwitchFFN(
                site.d_model, experts.d_ff, c, seq_len=program.seq_len,
                activation=site.activation, gated=site.gated, bias=site.bias,
                router=router, experts=experts,
            )
            layer.train(program.model.training)
            set_submodule(program.model, site.replace[0], layer)
            for path in site.replace[1:]:
                set_submodule(program.model, path, Bypass())
            for path in site.bypass_attributes:
                owner_path, _, name = path.rpartition(".")
                owner = program.model.get_submodule(owner_path)
                setattr(owner, name, passthrough)
                _disable_fused_fast_path(owner)
            program.routers[site.path] = router
            program.layers[site.path] = layer
            program.progress("inserting routers", done + 1, total)
        program.experts.clear()  # the layers own them now
        return True
