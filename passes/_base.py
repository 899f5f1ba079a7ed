"""The shape every moeify pass shares (torch's ``PassBase`` over a `Program`)."""

from __future__ import annotations

from torch.fx.passes.infra.pass_base import PassBase, PassResult

from moeify.compiler.program import Program
from moeify.errors import MoEError


class ProgramPass(PassBase):
    """A pass over a `moeify.compiler.program.Program`.

    Subclasses implement `run(program) -> bool` (whether the model changed) and may
    override `requires` / `ensures`, which raise `MoEError` naming the pass (`fail`).
    """

    def call(self, program: Program) -> PassResult:  # type: ignore[override]
        if not isinstance(program, Program):
            raise TypeError(f"{type(self).__name__} runs on a moeify Program, got {type(program)}")
        return PassResult(program, self.run(program))

    def run(self, program: Program) -> bool:
        raise NotImplementedError

    def fail(self, message: str) -> MoEError:
        return MoEError(f"{type(self).__name__}: {message}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
