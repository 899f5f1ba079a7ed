"""Pass pipelines: which passes a conversion runs, in order, and the runner.

``plan`` runs the analysis passes (nothing changes); ``apply`` runs the transforming
passes over a plan. A `Pipeline` is a plain list of passes (``pipeline.passes``): insert
a pass of your own where it belongs (``examples/custom_pass.py``) and hand it to
``moeify.convert(..., pipeline=...)``. This module is where the core assembles passes;
the passes themselves import only the core.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.fx.passes.infra.pass_base import PassBase

from moeify.compiler.plan import ConversionPlan, plan_of, record_plan
from moeify.compiler.program import Program, Progress
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
from moeify.switch import switch_layers


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


def apply_program(
    model: nn.Module, plan: ConversionPlan, *, lazy: bool = False,
    progress: Progress | None = None,
) -> Program:
    """Carry out ``plan`` on ``model`` in place (`moeify.apply` without the finishing
    touches), returning the `Program` it ran. ``lazy`` builds the Switch layers on the
    meta device and keeps each site's dense weights in ``program.dense`` (what the
    streaming checkpoint writer materializes layers from)."""
    if not isinstance(model, nn.Module):
        raise MoEError(f"moeify converts a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(plan, ConversionPlan):
        raise MoEError(f"apply takes a moeify.ConversionPlan, got {type(plan).__name__}")
    if plan_of(model) is not None or switch_layers(model):
        raise MoEError("the model is already converted (it has Switch layers); apply the "
                       "plan to the dense source model")
    if not plan.selected:
        raise MoEError("the plan selects no FFN site: nothing to apply (see its rejections "
                       "with moeify inspect)")
    plan.check_model(model)
    program = Program.from_plan(model, plan, progress=progress)
    transform_pipeline(lazy=lazy)(program)
    record_plan(model, program.plan)
    return program
