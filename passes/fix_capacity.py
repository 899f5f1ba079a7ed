"""`FixCapacity`: fix every Switch layer's expert capacity for the declared length."""

from __future__ import annotations

from moeify.compiler.program import Program
from moeify.passes._base import ProgramPass


class FixCapacity(ProgramPass):
    """Declare the group length of every Switch layer the program built.

    Requires: `BuildSwitchLayers` has run.
    Guarantees: with a declared length (``program.seq_len``, or ``config.group_size``)
        each layer's train and eval capacities are Python ints, the static shapes
        tracing, ``torch.compile`` and ONNX export keep; inputs of another length are
        refused. Without one, the capacity follows each input's sequence length in
        eager mode (``generate()`` feeds one token per step) and tracing or exporting
        asks for a declared length.
    Preserves the computation: yes for inputs of the declared length.
    """

    def requires(self, program: Program) -> None:  # type: ignore[override]
        if not program.layers:
            raise self.fail("no Switch layers: run BuildSwitchLayers first")

    def run(self, program: Program) -> bool:
        group = program.config.group_size
        for layer in program.layers.values():
            layer.set_tokens_per_group(group if group is not None else program.seq_len)
        return True
