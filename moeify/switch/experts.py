"""Experts: E feed-forward networks stored as batched weights.

Weights follow ``x @ W`` (not ``nn.Linear``'s ``x @ W.T``): ``w_in [E, d, f]``,
``w_out [E, f, d]``, and for gated FFNs ``w_gate [E, d, f]``. A gated expert computes
``act(x @ w_gate) * (x @ w_in)`` before ``w_out``: ``w_gate`` is the activated branch
(T5 v1.1 ``wi_0``, Llama ``gate_proj``), ``w_in`` the linear one (``wi_1``,
``up_proj``). Expert dropout sits between the two matmuls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeify.config import Activation, Init

_ACTIVATIONS: dict[Activation, Callable[[Tensor], Tensor]] = {
    Activation.RELU: F.relu,
    Activation.GELU: F.gelu,
    Activation.GELU_TANH: lambda x: F.gelu(x, approximate="tanh"),
    Activation.SILU: F.silu,
}


def activation_fn(activation: Activation | str) -> Callable[[Tensor], Tensor]:
    """The function an `Activation` names."""
    return _ACTIVATIONS[Activation(activation)]


@dataclass(frozen=True)
class DenseFFNWeights:
    """One dense FFN's weights in ``x @ W`` layout (transpose ``nn.Linear`` weights).

    w_in: [d, f]; w_out: [f, d]; w_gate: [d, f] for gated FFNs; biases [f] / [d].
    """

    w_in: Tensor
    w_out: Tensor
    b_in: Tensor | None = None
    b_out: Tensor | None = None
    w_gate: Tensor | None = None
    b_gate: Tensor | None = None

    @classmethod
    def from_linears(
        cls, up: nn.Linear, down: nn.Linear, gate: nn.Linear | None = None
    ) -> DenseFFNWeights:
        """From ``nn.Linear`` layers: ``up`` d->f, ``down`` f->d, ``gate`` d->f (activated)."""
        return cls(
            w_in=up.weight.detach().T,
            w_out=down.weight.detach().T,
            b_in=None if up.bias is None else up.bias.detach(),
            b_out=None if down.bias is None else down.bias.detach(),
            w_gate=None if gate is None else gate.weight.detach().T,
            b_gate=None if gate is None or gate.bias is None else gate.bias.detach(),
        )


class Experts(nn.Module):
    """E copies of one FFN shape, computed with batched or per-expert matmuls."""

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        *,
        activation: Activation | str = Activation.RELU,
        gated: bool = False,
        bias: bool = False,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation = Activation(activation)
        self.gated = gated
        self.dropout = dropout
        make = dict(device=device, dtype=dtype)
        E, d, f = num_experts, d_model, d_ff
        self.w_in = nn.Parameter(torch.empty(E, d, f, **make))
        self.w_out = nn.Parameter(torch.empty(E, f, d, **make))
        self.w_gate = nn.Parameter(torch.empty(E, d, f, **make)) if gated else None
        self.b_in = nn.Parameter(torch.empty(E, f, **make)) if bias else None
        self.b_out = nn.Parameter(torch.empty(E, d, **make)) if bias else None
        self.b_gate = nn.Parameter(torch.empty(E, f, **make)) if bias and gated else None
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Fresh experts: truncated normal, std ``sqrt(0.1 / fan_in)`` (the paper's scale)."""
        for name, param in self.named_parameters(recurse=False):
            if param.device.type == "meta":
                continue
            if name.startswith("b_"):
                nn.init.zeros_(param)
            else:
                std = math.sqrt(0.1 / param.shape[1])
                nn.init.trunc_normal_(param, std=std, a=-2 * std, b=2 * std, generator=generator)

    @torch.no_grad()
    def load_dense(
        self,
        dense: DenseFFNWeights,
        *,
        init: Init | str = Init.COPY,
        noise: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        """Initialize every expert from one dense FFN (sparse upcycling).

        copy: each expert an exact copy of the dense FFN; ``noise > 0`` then adds
            ``noise * std(W) * N(0, 1)`` to each copied weight matrix.
        partition: the dense FFN's f hidden neurons split into E consecutive groups of
            f/E (MoEfication); this module's d_ff must be f / E.
        random: fresh init at the paper's scale; the dense weights only fix the shapes.
        """
        init = Init(init)
        pairs = [("w_in", dense.w_in), ("w_out", dense.w_out), ("w_gate", dense.w_gate),
                 ("b_in", dense.b_in), ("b_out", dense.b_out), ("b_gate", dense.b_gate)]
        for name, source in pairs:
            target = getattr(self, name)
            if (target is None) != (source is None):
                have = "has" if target is not None else "has no"
                raise ValueError(f"Experts {have} {name} but the dense FFN does not match")
        if init == Init.RANDOM:
            self.reset_parameters(generator)
            return
        for name, source in pairs:
            target = getattr(self, name)
            if target is None:
                continue
            if init == Init.PARTITION:
                source = _partition(name, source, self.num_experts)
            else:
                source = source.unsqueeze(0).expand(self.num_experts, *source.shape)
            if tuple(source.shape) != tuple(target.shape):
                raise ValueError(
                    f"dense {name} gives expert shape {tuple(source.shape)}, "
                    f"expected {tuple(target.shape)}"
                )
            target.copy_(source)
            if noise > 0 and init == Init.COPY and name.startswith("w_"):
                scale = noise * source[0].float().std()
                target.add_(scale * torch.randn(target.shape, generator=generator).to(target))

    def _hidden(self, h_in: Tensor, h_gate: Tensor | None) -> Tensor:
        act = _ACTIVATIONS[self.activation]
        hidden = act(h_in) if h_gate is None else act(h_gate) * h_in
        return F.dropout(hidden, self.dropout, self.training)

    def forward(self, x: Tensor) -> Tensor:
        """All experts on their padded buffers: [E, N, d] -> [E, N, d] (batched matmuls)."""
        h_in = _linear(x, self.w_in, self.b_in, batched=True)
        h_gate = None if self.w_gate is None else _linear(x, self.w_gate, self.b_gate, batched=True)
        return _linear(self._hidden(h_in, h_gate), self.w_out, self.b_out, batched=True)

    def forward_sorted(self, x: Tensor, counts: list[int]) -> Tensor:
        """Rows sorted by expert, ``counts[e]`` rows for expert e: [n, d] -> [n, d].

        Only occupied slots are computed: one matmul per expert that has rows, written
        straight into one output (see `segment_linear`); the activation, gating and
        dropout run once over all rows.
        """
        h_in = segment_linear(x, self.w_in, self.b_in, counts)  # [n, f]
        h_gate = None if self.w_gate is None else segment_linear(x, self.w_gate, self.b_gate, counts)
        return segment_linear(self._hidden(h_in, h_gate), self.w_out, self.b_out, counts)

    def extra_repr(self) -> str:
        kind = f"gated {self.activation.value}" if self.gated else self.activation.value
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"{kind}, bias={self.b_in is not None}, dropout={self.dropout}"
        )


def _linear(x: Tensor, w: Tensor, b: Tensor | None, *, batched: bool = False) -> Tensor:
    """``x @ w + b``; batched: x [E, N, i], w [E, i, o], b [E, o]."""
    if batched:
        return torch.bmm(x, w) if b is None else torch.baddbmm(b.unsqueeze(1), x, w)
    return x @ w if b is None else torch.addmm(b, x, w)


def _partition(name: str, source: Tensor, num_experts: int) -> Tensor:
    """Split a dense weight's hidden (f) axis into ``num_experts`` consecutive groups."""
    f_axis = {"w_in": 1, "w_gate": 1, "b_in": 0, "b_gate": 0, "w_out": 0}.get(name)
    if f_axis is None:  # b_out: a token reaches one partition, which adds the whole bias
        return source.unsqueeze(0).expand(num_experts, *source.shape)
    f = source.shape[f_axis]
    if f % num_experts:
        raise ValueError(
            f"init='partition' needs the hidden width {f} to divide by num_experts={num_experts}"
        )
    return torch.stack(source.chunk(num_experts, dim=f_axis))


def segment_linear(x: Tensor, w: Tensor, b: Tensor | None, counts: list[int]) -> Tensor:
    """Per-segment ``x @ w[e] + b[e]``: rows sorted by expert, ``counts[e]`` rows each.

    x: [n, i]; w: [E, i, o]; b: [E, o] or None -> [n, o]. Each matmul writes into its
    slice of one output buffer, and the backward writes each expert's weight gradient
    into its slice of one ``[E, i, o]`` gradient, so a step allocates one buffer per
    tensor instead of one per expert plus a concatenation (at 64 experts and few
    tokens per expert those copies and their page faults dominate the step).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):  # out= matmuls bypass autocast: cast here
        dtype = torch.get_autocast_dtype(device_type)
        x, w = x.to(dtype), w.to(dtype)
        b = None if b is None else b.to(dtype)
    with torch.autocast(device_type, enabled=False):
        if b is None:
            return _SegmentLinear.apply(x, w, counts)
        return _SegmentLinear.apply(x, w, counts, b)


class _SegmentLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, counts: list[int], b: Tensor | None = None) -> Tensor:
        ctx.counts = counts
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, w)
        out = x.new_empty(x.shape[0], w.shape[-1])
        for e, rows in _segments(counts):
            if b is None:
                torch.mm(x[rows], w[e], out=out[rows])
            else:
                torch.addmm(b[e], x[rows], w[e], out=out[rows])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, w = ctx.saved_tensors
        grad_out = grad_out.contiguous()  # e.g. an expanded gradient of a sum()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[3]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = None
        if need_w:  # experts without rows get zeros; every other slice is written below
            grad_w = torch.zeros_like(w) if 0 in ctx.counts else torch.empty_like(w)
        grad_b = grad_out.new_zeros(w.shape[0], w.shape[-1]) if need_b else None
        for e, rows in _segments(ctx.counts):
            g = grad_out[rows]
            if need_x:
                torch.mm(g, w[e].T, out=grad_x[rows])
            if need_w:
                torch.mm(x[rows].T, g, out=grad_w[e])
            if need_b:
                torch.sum(g, dim=0, out=grad_b[e])
        if ctx.has_bias:
            return grad_x, grad_w, None, grad_b
        return grad_x, grad_w, None


def _segments(counts: list[int]) -> Iterator[tuple[int, slice]]:
    """(expert, its row slice) for every expert that has rows."""
    start = 0
    for e, count in enumerate(counts):
        if count:
            yield e, slice(start, start + count)
        start += count
