"""The pass manager glue: `default_pipeline` and `run_pipeline`."""

from __future__ import annotations

import re

from torch.fx.passes.infra.pass_manager import PassManager

from moeify.config import MoEConfig
from moeify.errors import MoEError
from moeify.program import Program


def default_pipeline(
    config: MoEConfig, *, seq_len: int | None = None, lazy_experts: bool = False
) -> PassManager:
    """The standard conversion, as a ``torch.fx`` ``PassManager`` over a `Program`.

    ``manager.passes`` is a plain list: insert a pass of your own where it belongs
    (see ``examples/custom_pass.py``). ``seq_len`` declares the sequence length that
    fixes every layer's capacity (`FixCapacity`); ``lazy_experts`` leaves experts on
    the meta device for `moeify.stream` to materialize while writing; ``config`` is kept
    for passes whose choice depends on it.
    """
    from moeify.passes import (
        AnnotateSharding,
        AttachAuxLosses,
        FindFFN,
        FixCapacity,
        InsertRouter,
        SelectSites,
        UpcycleExperts,
    )

    del config  # every default pass reads the program's config
    return PassManager(
        passes=[
            FindFFN(),
            SelectSites(),
            UpcycleExperts(lazy=lazy_experts),
            InsertRouter(),
            FixCapacity(seq_len),
            AttachAuxLosses(),
            AnnotateSharding(),
        ]
    )


def run_pipeline(manager: PassManager, program: Program) -> Program:
    """Run ``manager`` on ``program``; a failing pass raises `MoEError` naming it."""
    try:
        result = manager(program)
    except Exception as error:  # noqa: BLE001 - re-raised with the pass named
        cause = error.__cause__
        if isinstance(cause, MoEError):
            raise cause from None
        match = re.search(r"running the '([^']+)' pass", str(error))
        if isinstance(cause, ValueError) and match:
            raise MoEError(f"{match.group(1)}: {cause}") from cause
        raise
    return result.graph_module
