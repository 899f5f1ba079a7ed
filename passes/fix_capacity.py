"""`FixCapacity`: fix every Switch layer's expert capacity for a declared length."""

from __future__ import annotations

from moeify.passes._base import ProgramPass
from moeify.program import Program


class FixCapacity(ProgramPass):
    """Declare the group length of every converted layer (``seq_len`` tokens).

    Requires: `InsertRouter` has run.
    Guarantees: with a declared length (``seq_len``, or ``config.group_size``) each
        layer's train and eval capacities are Python ints, the static shapes tracing,
        ``torch.compile`` and ONNX export keep; inputs of another length are refused.
        With ``seq_len=None`` and no group size the capacity follows each input's
        sequence length in eager mode (``generate()`` feeds one token per step) and
        tracing or exporting asks for a declared length.
    Preserves the computation: yes for inputs of the declared length.
    """

    def __init__(self, seq_len: int | None = None) -> None:
        if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 1):
            raise ValueError(f"seq_len must be an int >= 1 or None, got {seq_len!r}")
        self.seq_len = seq_len

    def requires(self, program: Program) -> None:  # type: ignore[override]
        if not program.layers:
            raise self.fail("no Switch layers: run InsertRouter first")

    def run(self, program: Program) -> bool:
        seq_len = self.seq_len if self.seq_len is not None else program.seq_len
        program.seq_len = seq_len
        group = program.config.group_size
        for layer in program.layers.values():
            layer.set_tokens_per_group(group if group is not None else seq_len)
        return True

    def __repr__(self) -> str:
        return f"FixCapacity(seq_len={self.seq_len})"
