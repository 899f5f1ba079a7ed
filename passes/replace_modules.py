"""`ReplaceModules`: swap each site's dense FFN modules for its Switch layer."""

from __future__ import annotations

from typing import Any

from torch import nn

from moeify.compiler.program import Program
from moeify.passes._base import ProgramPass


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


class ReplaceModules(ProgramPass):
    """Module surgery: put each site's Switch layer where its dense FFN was.

    Requires: `BuildSwitchLayers` has run.
    Guarantees: every selected site's ``replace[0]`` module is its `SwitchFFN`; the
        site's other modules are `Bypass` and its function attributes (an activation
        applied in a module's code) pass-throughs; a module with a fused fast path that
        would skip the Switch layer (``nn.TransformerEncoderLayer`` in eval mode) has it
        turned off. The model keeps its class and the rest of its code.
    Preserves the computation: with ``gate="normalized"``, top-1 and nothing dropped,
        yes (upcycled copies); with the softmax gate each site computes ``p * FFN(x)``.
    """

    def requires(self, program: Program) -> None:  # type: ignore[override]
        missing = [s.path for s in program.selected if s.path not in program.layers]
        if missing or not program.selected:
            raise self.fail(f"no Switch layer for {missing or 'any site'}: run "
                            "BuildSwitchLayers first")

    def run(self, program: Program) -> bool:
        for site in program.selected:
            set_submodule(program.model, site.replace[0], program.layers[site.path])
            for path in site.replace[1:]:
                set_submodule(program.model, path, Bypass())
            for path in site.bypass_attributes:
                owner_path, _, name = path.rpartition(".")
                owner = program.model.get_submodule(owner_path)
                setattr(owner, name, passthrough)
                _disable_fused_fast_path(owner)
        return True
