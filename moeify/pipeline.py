"""Pass pipelines: which passes a conversion runs, in order, and the runner.

``plan`` runs the analysis passes (nothing changes); ``apply`` runs the transforming
passes over a plan. A `Pipeline` is a plain list of passes (``pipeline.passes``): insert
a pass of your own where it belongs (``examples/custom_pass.py``) and hand it to
``moeify.convert(..., pipeline=...)``. This module is where the core assembles passes;
the passes themselves import only the core.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch.fx.passes.infra.pass_base import PassBase

from moeify.errors import MoEError
from moeify.passes import (
    AnnotateSharding,
    BuildSwitchLayers,
    FindFFN,
    FixCapacity,
    RegisterAuxLossHook,
    RegisterPaddingMask,
    ReplaceModules,
    SelectSites,
)
from moeify.program import Program


class PassError(MoEError):
    """A pass failed for a reason other than a `MoEError` of its own; names the pass."""

    def __init__(self, pass_name: str, error: BaseException) -> None:
        super().__init__(f"pass {pass_name} failed: {type(error).__name__}: {error}")
        self.pass_name = pass_name


class Pipeline:
    """Passes run in order over a `Program`.

    Each pass is called as torch's ``PassBase`` is (``requires``, ``call``, ``ensures``);
    a `MoEError` a pass raises (they name themselves) passes through, any other
    exception becomes a `PassError` naming the pass, with the original as its cause.
    """

    def __init__(self, passes: Iterable[PassBase]) -> None:
        self.passes: list[PassBase] = list(passes)

    def __call__(self, program: Program) -> Program:
        for pass_ in self.passes:
            try:
                pass_(program)
            except MoEError:
                raise
            except Exception as error:  # noqa: BLE001 - re-raised with the pass named
                raise PassError(type(pass_).__name__, error) from error
        return program

    def __add__(self, other: Pipeline) -> Pipeline:
        return Pipeline(self.passes + other.passes)

    def __repr__(self) -> str:
        return "Pipeline(" + " -> ".join(type(p).__name__ for p in self.passes) + ")"


def analysis_pipeline() -> Pipeline:
    """The passes `moeify.plan` runs: find the FFNs, choose the sites, plan the sharding."""
    return Pipeline([FindFFN(), SelectSites(), AnnotateSharding()])


def transform_pipeline(*, lazy: bool = False) -> Pipeline:
    """The passes `moeify.apply` runs over a plan. ``lazy`` builds the Switch layers on
    the meta device and keeps each site's dense weights for the streaming writer."""
    return Pipeline([BuildSwitchLayers(lazy=lazy), ReplaceModules(), FixCapacity(),
                     RegisterAuxLossHook(), RegisterPaddingMask()])


def default_pipeline() -> Pipeline:
    """The whole standard conversion: analysis then transformation."""
    return analysis_pipeline() + transform_pipeline()
