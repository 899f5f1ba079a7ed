"""Shared experts: always-on experts every token goes through (DeepSeekMoE, Qwen2-MoE).

N shared experts of the routed experts' width f are one FFN ``N * f`` hidden neurons
wide (the sum of N FFNs is one FFN over their concatenated hidden neurons), stored as an
`Experts` of one expert so they compute, export and load like the routed ones:
``ffn.w_in [1, d, N*f]``, ``ffn.w_out [1, N*f, d]`` (+ ``ffn.w_gate`` for gated FFNs,
biases as `Experts` has them). With ``gate`` (Qwen2-MoE's ``shared_expert_gate``), a
learned row ``gate.weight [1, d]`` scales the shared output by ``sigmoid(x . w)``,
computed in the model's dtype.

A Switch layer adds the shared output to its routed output (`moeify.switch.SwitchFFN`).
They hold no expert axis to split: under expert parallelism they are replicated like
every dense parameter. How upcycling fills them: `moeify.switch.upcycle`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moeify.config import Activation
from moeify.switch.experts import Experts


class SharedExperts(nn.Module):
    """``num_shared`` always-on experts of width ``d_ff`` as one FFN, optionally gated."""

    def __init__(
        self,
        num_shared: int,
        d_model: int,
        d_ff: int,
        *,
        gate: bool = False,
        activation: Activation | str = Activation.RELU,
        gated: bool = False,
        bias: bool = False,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``d_ff``: the width of one expert (the routed experts'); ``gate``: a learned
        sigmoid gate on the output; ``gated``: gated experts (SwiGLU, gated GELU)."""
        super().__init__()
        self.num_shared = num_shared
        self.ffn = Experts(1, d_model, num_shared * d_ff, activation=activation, gated=gated,
                           bias=bias, dropout=dropout, device=device, dtype=dtype)
        self.gate = (nn.Linear(d_model, 1, bias=False, device=device, dtype=dtype)
                     if gate else None)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Fresh shared experts at the paper's scale (`Experts.reset_parameters`) and a
        gate row of 0: the gate starts at ``sigmoid(0) = 1/2`` for every token."""
        self.ffn.reset_parameters(generator)
        if self.gate is not None and not self.gate.weight.is_meta:
            nn.init.zeros_(self.gate.weight)

    @property
    def d_ff(self) -> int:
        """The hidden width of one shared expert."""
        return self.ffn.d_ff // self.num_shared

    def forward(self, x: Tensor, *, batched: bool = True) -> Tensor:
        """Every token through the shared experts: ``[..., d] -> [..., d]``.

        ``batched``: one batched matmul per weight (what tracing and export need), else
        the grouped kernels of `Experts.forward_sorted` (eager, e.g. under autocast)."""
        rows = x.reshape(1, -1, x.shape[-1])  # [1, n, d]: every token a row of the one FFN
        y = self.ffn(rows, batched=batched).reshape_as(x)  # [..., d]
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x)) * y
        return y

    def extra_repr(self) -> str:
        return f"num_shared={self.num_shared}, d_ff={self.d_ff}, gate={self.gate is not None}"
