"""Experts: E feed-forward networks stored as batched weights.

Weights follow ``x @ W`` (not ``nn.Linear``'s ``x @ W.T``): ``w_in [E, d, f]``,
``w_out [E, f, d]``, and for gated FFNs ``w_gate [E, d, f]``. A gated expert computes
``act(x @ w_gate) * (x @ w_in)`` before ``w_out``: ``w_gate`` is the activated branch
(T5 v1.1 ``wi_0``, Llama ``gate_proj``), ``w_in`` the linear one (``wi_1``,
``up_proj``). Expert dropout sits between the two matmuls.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeify.config import Activation, Init
from moeify.errors import MoEError

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

    def to(self, device: torch.device | str) -> DenseFFNWeights:
        """The same weights on ``device`` (``"meta"``: shapes and dtypes only)."""
        return DenseFFNWeights(**{f.name: None if getattr(self, f.name) is None
                                  else getattr(self, f.name).to(device) for f in fields(self)})


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
        drop_ratio: float = 0.5,
        granularity: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        """Initialize every expert from one dense FFN (sparse upcycling).

        ``granularity`` G > 1 (with copy): expert ``e`` is slice ``e % G`` of the dense
        FFN's hidden neurons split into G consecutive groups, its output projection
        scaled by G (`granular_slices`; ``MoEConfig.granularity`` has the reasoning).

        copy: each expert an exact copy of the dense FFN; ``noise > 0`` then adds
            ``noise * std(W) * N(0, 1)`` to each copied weight matrix.
        partition: the dense FFN's f hidden neurons split into E consecutive groups of
            f/E (MoEfication); this module's d_ff must be f / E.
        random: fresh init at the paper's scale; the dense weights only fix the shapes.
        drop: Drop-Upcycling (Nakamura et al., ICLR 2025). Each expert a copy, then a
            different random subset of ``round(drop_ratio * f)`` hidden neurons
            re-initialized: for each of them its weights in the input projection(s)
            (``w_in`` and ``w_gate`` columns, ``b_in`` / ``b_gate`` entries) and its
            weights in the output projection (``w_out`` row) are drawn from a normal
            distribution with the mean and standard deviation of the whole dense tensor
            they replace; ``b_out`` (per output, not per neuron) stays a copy.
        """
        init = Init(init)
        pairs = [("w_in", dense.w_in), ("w_out", dense.w_out), ("w_gate", dense.w_gate),
                 ("b_in", dense.b_in), ("b_out", dense.b_out), ("b_gate", dense.b_gate)]
        for name, source in pairs:
            target = getattr(self, name)
            if (target is None) != (source is None):
                have = "has" if target is not None else "has no"
                raise MoEError(f"Experts {have} {name} but the dense FFN does not match")
        if init == Init.RANDOM:
            self.reset_parameters(generator)
            return
        for name, source in pairs:
            target = getattr(self, name)
            if target is None:
                continue
            if init == Init.PARTITION:
                source = _partition(name, source, self.num_experts)
            elif granularity > 1:
                source = granular_slices(name, source, self.num_experts, granularity)
            else:
                source = source.unsqueeze(0).expand(self.num_experts, *source.shape)
            if tuple(source.shape) != tuple(target.shape):
                raise MoEError(
                    f"dense {name} gives expert shape {tuple(source.shape)}, "
                    f"expected {tuple(target.shape)}"
                )
            target.copy_(source)
            if noise > 0 and init == Init.COPY and name.startswith("w_"):
                scale = noise * source[0].float().std()
                target.add_(scale * torch.randn(target.shape, generator=generator).to(target))
        if init == Init.DROP:
            self._drop_neurons(dense, drop_ratio, generator)

    def _drop_neurons(self, dense: DenseFFNWeights, ratio: float,
                      generator: torch.Generator | None) -> None:
        """Drop-Upcycling's re-initialization of copied experts (see `load_dense`)."""
        f = self.d_ff
        count = math.floor(ratio * f + 0.5)
        if count == 0:
            return
        stats = {name: (source.float().mean().item(), source.float().std(correction=0).item())
                 for name in HIDDEN_AXIS if (source := getattr(dense, name)) is not None}
        for e in range(self.num_experts):
            neurons = torch.randperm(f, generator=generator)[:count].sort().values
            for name, (mean, std) in stats.items():
                expert, axis = getattr(self, name)[e], HIDDEN_AXIS[name]
                shape = list(expert.shape)
                shape[axis] = count
                fresh = torch.randn(shape, generator=generator) * std + mean
                expert.index_copy_(axis, neurons.to(expert.device), fresh.to(expert))

    def _hidden(self, h_in: Tensor, h_gate: Tensor | None) -> Tensor:
        act = _ACTIVATIONS[self.activation]
        hidden = act(h_in) if h_gate is None else act(h_gate) * h_in
        return F.dropout(hidden, self.dropout, self.training)

    def forward(self, x: Tensor, *, batched: bool = True) -> Tensor:
        """All experts on equal row counts (padded buffers): [E, N, d] -> [E, N, d].

        batched: one batched matmul (``bmm``) per weight, the form tracing and export
        need; otherwise the per-expert matmuls of `forward_sorted` over the same rows.
        """
        if not batched:
            E, N = x.shape[0], x.shape[1]
            return self.forward_sorted(x.flatten(0, 1), [N] * E).unflatten(0, (E, N))
        h_in = _bmm(x, self.w_in, self.b_in)
        h_gate = None if self.w_gate is None else _bmm(x, self.w_gate, self.b_gate)
        return _bmm(self._hidden(h_in, h_gate), self.w_out, self.b_out)

    def batched_matmul_ok(self) -> bool:
        """Whether an eager ``bmm`` runs in the weights' own dtype. Under autocast it
        would first cast every expert's weights as one full-size copy (and their
        gradient back), which costs more than the matmuls at many experts."""
        return matmul_dtype(self.w_in) == self.w_in.dtype

    def forward_sorted(self, x: Tensor, counts: list[int]) -> Tensor:
        """Rows sorted by expert, ``counts[e]`` rows for expert e: [n, d] -> [n, d].

        Only occupied slots are computed. Each expert's whole FFN runs on its rows in
        turn (`expert_ffn`): its hidden activations stay in cache between the two
        matmuls instead of making a round trip through memory for every expert at once.
        With dropout active (training, ``dropout > 0``) the layers run one after the
        other over all rows (`segment_linear`), the dropout drawn once over them.
        """
        if self.training and self.dropout > 0:
            h_in = segment_linear(x, self.w_in, self.b_in, counts)  # [n, f]
            h_gate = (None if self.w_gate is None
                      else segment_linear(x, self.w_gate, self.b_gate, counts))
            return segment_linear(self._hidden(h_in, h_gate), self.w_out, self.b_out, counts)
        return expert_ffn(x, counts, self.activation, self.w_in, self.b_in, self.w_out,
                          self.b_out, self.w_gate, self.b_gate)

    def extra_repr(self) -> str:
        kind = f"gated {self.activation.value}" if self.gated else self.activation.value
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"{kind}, bias={self.b_in is not None}, dropout={self.dropout}"
        )


def _bmm(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x @ w + b`` for every expert at once: x [E, N, i], w [E, i, o], b [E, o]."""
    return torch.bmm(x, w) if b is None else torch.baddbmm(b.unsqueeze(1), x, w)


# The hidden (f) axis of each dense FFN tensor (w_in [d, f], w_out [f, d], ...), which is
# also an expert's axis once the leading expert axis is indexed away; b_out has none.
HIDDEN_AXIS = {"w_in": 1, "w_gate": 1, "b_in": 0, "b_gate": 0, "w_out": 0}


def granular_slices(name: str, source: Tensor, num_experts: int, granularity: int) -> Tensor:
    """Granular upcycling: the dense tensor ``name`` as ``num_experts`` experts, expert
    ``e`` holding slice ``e % G`` of the hidden neurons (G = ``granularity``); ``w_out``
    slices scaled by G, so G slices combined with weights 1/G give the dense output
    (``b_out`` is every slice's whole bias: the weights 1/G add it once)."""
    slices = _partition(name, source, granularity)
    if name == "w_out":
        slices = slices * granularity
    return slices.repeat(num_experts // granularity, *([1] * source.dim()))


def _partition(name: str, source: Tensor, num_experts: int) -> Tensor:
    """Split a dense weight's hidden (f) axis into ``num_experts`` consecutive groups."""
    f_axis = HIDDEN_AXIS.get(name)
    if f_axis is None:  # b_out: a token reaches one partition, which adds the whole bias
        return source.unsqueeze(0).expand(num_experts, *source.shape)
    f = source.shape[f_axis]
    if f % num_experts:
        raise MoEError(
            f"init='partition' needs the hidden width {f} to divide by num_experts={num_experts}"
        )
    return torch.stack(source.chunk(num_experts, dim=f_axis))


def matmul_dtype(w: Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in for weights ``w``.

    Inside a ``torch.autocast`` region of ``w``'s device: the autocast dtype, for the
    weights autocast would cast (floating point, not float64), exactly as ``nn.Linear``
    runs there. Elsewhere: the weights' own dtype.
    """
    device_type = w.device.type
    if (torch.is_autocast_enabled(device_type) and w.is_floating_point()
            and w.dtype != torch.float64):
        return torch.get_autocast_dtype(device_type)
    return w.dtype


def segment_linear(x: Tensor, w: Tensor, b: Tensor | None, counts: list[int]) -> Tensor:
    """Per-segment ``x @ w[e] + b[e]``: rows sorted by expert, ``counts[e]`` rows each.

    x: [n, i]; w: [E, i, o]; b: [E, o] or None -> [n, o] in `matmul_dtype` (w).

    One matmul per expert that has rows, each writing into its slice of one output; the
    backward writes each expert's weight gradient into its slice of one ``[E, i, o]``
    gradient in the weights' dtype, which autograd then installs as ``.grad`` as it is.
    So a step allocates one buffer per tensor, never one per expert plus a concatenation.

    Under autocast the matmuls run in the autocast dtype like ``nn.Linear``'s, but no
    pass casts the whole ``[E, i, o]`` weight: each expert's weight is cast into one
    small reused buffer right before its matmul, which then reads it from cache (again
    in the backward, for the input gradient: a second read of the float32 weights costs
    less than writing and re-reading a kept half-precision copy in fresh memory, measured
    in BENCHMARKS.md). Each expert's weight gradient is cast into its slice of the
    float32 gradient as it is computed, so no full-size half-precision gradient exists.
    """
    dtype = matmul_dtype(w)
    x = x.to(dtype)  # autograd casts the input gradient back, as autocast does
    with torch.autocast(w.device.type, enabled=False):  # the out= matmuls below
        return _SegmentLinear.apply(x, w, b, counts, dtype)


class _GradientStorage:
    """Reuses the memory of each expert weight's gradient from one backward to the next.

    PyTorch's CPU allocator takes tensors above glibc's mmap threshold (32 MiB at most)
    straight from fresh pages, which the kernel faults in and zeroes on first touch: an
    ``[E, d, f]`` gradient allocated anew every step costs that every step (1.2 GB at
    Switch-Base-64, where per-expert ``nn.Linear`` gradients of a few MiB are recycled by
    the heap instead). The pool keeps a reference to the storage of the gradient it last
    handed out for each weight, never to the tensor, so autograd still installs that
    tensor as ``.grad`` without a copy. When nothing else refers to the storage any more
    (``zero_grad()`` set the gradient to None and nobody kept it), the next backward
    writes into it again; while anything still holds it (accumulating gradients, a
    reference of the user's, a distributed bucket) a new one is allocated.
    """

    def __init__(self) -> None:
        # id(weight) -> (weak reference to the weight, storage); entries leave with the weight
        self._storage: dict[int, tuple[weakref.ref, torch.UntypedStorage]] = {}

    def empty_like(self, weight: Tensor) -> Tensor:
        entry = self._storage.get(id(weight))
        storage = entry[1] if entry is not None and entry[0]() is weight else None
        if (storage is not None and storage.device == weight.device
                and storage.nbytes() == weight.numel() * weight.element_size()
                and torch._C._storage_Use_Count(storage._cdata) == 1):
            grad = weight.new_empty(0)
            return grad.set_(storage, 0, weight.shape, weight.stride())
        grad = torch.empty_like(weight)
        if grad.device.type == "cpu":  # other devices have caching allocators
            key = id(weight)
            forget = lambda _, key=key: self._storage.pop(key, None)  # noqa: E731
            self._storage[key] = (weakref.ref(weight, forget), grad.untyped_storage())
        return grad


_GRADIENTS = _GradientStorage()


class _ExpertWeights:
    """One expert's weight (and bias) in the matmul dtype: a view where the weights
    already have it, else a cast into one reused ``[i, o]`` buffer."""

    def __init__(self, w: Tensor, b: Tensor | None, dtype: torch.dtype) -> None:
        self.w, self.b, self.dtype = w, b, dtype
        self.buffer = None if w.dtype == dtype else w.new_empty(w.shape[1:], dtype=dtype)

    def __call__(self, e: int) -> tuple[Tensor, Tensor | None]:
        b = None if self.b is None else self.b[e].to(self.dtype)
        if self.buffer is None:
            return self.w[e], b
        return self.buffer.copy_(self.w[e]), b


class _SegmentLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, counts: list[int],
                dtype: torch.dtype) -> Tensor:
        ctx.counts, ctx.dtype, ctx.has_bias = counts, dtype, b is not None
        weights = _ExpertWeights(w, b, dtype)
        out = x.new_empty(x.shape[0], w.shape[-1])
        for e, rows in _segments(counts):
            w_e, b_e = weights(e)
            if b_e is None:
                torch.mm(x[rows], w_e, out=out[rows])
            else:
                torch.addmm(b_e, x[rows], w_e, out=out[rows])
        ctx.save_for_backward(x, w)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, w = ctx.saved_tensors
        counts, dtype = ctx.counts, ctx.dtype
        grad_out = grad_out.to(dtype).contiguous()  # e.g. an expanded gradient of a sum()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = _GRADIENTS.empty_like(w) if need_w else None  # the weights' dtype
        grad_b = w.new_empty(w.shape[0], w.shape[-1]) if need_b else None
        for e, count in enumerate(counts):  # experts without rows: zero gradients
            if count == 0:
                for grad in (grad_w, grad_b):
                    if grad is not None:
                        grad[e].zero_()
        weights = _ExpertWeights(w, None, dtype) if need_x else None
        # A weight gradient computed in a lower dtype goes through one reused buffer.
        staged = None if not need_w or w.dtype == dtype else w.new_empty(w.shape[1:], dtype=dtype)
        # Half precision: x transposed once ([i, n], row-major), on which oneDNN's matmul
        # runs about twice as fast as on a transposed view of each expert's rows; float32
        # (MKL) takes the view as fast, so it skips the copy.
        x_t = None if not need_w else x.T.contiguous() if x.element_size() < 4 else x.T
        for e, rows in _segments(counts):
            g = grad_out[rows]
            if need_x:
                torch.mm(g, weights(e)[0].T, out=grad_x[rows])
            if need_w:
                if staged is None:
                    torch.mm(x_t[:, rows], g, out=grad_w[e])
                else:
                    grad_w[e].copy_(torch.mm(x_t[:, rows], g, out=staged))
            if need_b:
                grad_b[e].copy_(g.sum(0))  # in the matmul dtype, as nn.Linear
        return grad_x, grad_w, grad_b, None, None


def expert_ffn(
    x: Tensor,
    counts: list[int],
    activation: Activation,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    w_gate: Tensor | None = None,
    b_gate: Tensor | None = None,
) -> Tensor:
    """Every expert's FFN on its rows, one expert at a time: [n, d] -> [n, d].

    Rows are sorted by expert, ``counts[e]`` of them for expert e. For each expert the
    up (and gate) matmul, the activation and the down matmul run back to back on that
    expert's rows, so the hidden activations ``[rows, f]`` are still in cache when the
    down matmul reads them; the output of every expert lands in its slice of one buffer.
    The pre-activations are kept for the backward (what autograd would keep), which
    recomputes the activation per expert and runs each expert's gradients the same way.
    Matmul dtypes and casts follow `segment_linear` (autocast as ``nn.Linear``, one
    expert's weight cast at a time, gradients in the weights' dtype).
    """
    dtype = matmul_dtype(w_in)
    x = x.to(dtype)
    with torch.autocast(w_in.device.type, enabled=False):
        return _ExpertFFN.apply(x, w_in, b_in, w_out, b_out, w_gate, b_gate, counts,
                                Activation(activation), dtype)


def _activation_into(activation: Activation, a: Tensor, out: Tensor) -> Tensor:
    """``out = act(a)`` without a new allocation (``out`` may be ``a``)."""
    if activation == Activation.RELU:
        return torch.clamp_min(a, 0, out=out)
    if activation == Activation.SILU:
        return torch._C._nn.silu(a, out=out)
    approximate = "tanh" if activation == Activation.GELU_TANH else "none"
    return torch._C._nn.gelu(a, approximate=approximate, out=out)


def _activation_backward(activation: Activation, grad: Tensor, a: Tensor, h: Tensor) -> Tensor:
    """Gradient through ``h = act(a)`` (``h`` given for ReLU, whose derivative reads it)."""
    if activation == Activation.RELU:
        return torch.ops.aten.threshold_backward(grad, h, 0)
    if activation == Activation.SILU:
        return torch.ops.aten.silu_backward(grad, a)
    approximate = "tanh" if activation == Activation.GELU_TANH else "none"
    return torch.ops.aten.gelu_backward(grad, a, approximate=approximate)


def _matmul(x: Tensor, w: Tensor, b: Tensor | None, out: Tensor) -> Tensor:
    return torch.mm(x, w, out=out) if b is None else torch.addmm(b, x, w, out=out)


class _ExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, b_out, w_gate, b_gate, counts, activation, dtype):
        n, f, gated = x.shape[0], w_in.shape[-1], w_gate is not None
        keep = any(ctx.needs_input_grad[:7])  # a backward will come: keep pre-activations
        widest = max(counts, default=0)
        pre = x.new_empty(n if keep else widest, f)  # up projection, before the activation
        pre_gate = x.new_empty(n if keep else widest, f) if gated else None
        hidden = x.new_empty(widest, f)
        out = x.new_empty(n, w_out.shape[-1])
        up, down = _ExpertWeights(w_in, b_in, dtype), _ExpertWeights(w_out, b_out, dtype)
        gate = _ExpertWeights(w_gate, b_gate, dtype) if gated else None
        for e, rows in _segments(counts):
            here = rows if keep else slice(0, rows.stop - rows.start)
            h = hidden[: rows.stop - rows.start]
            a = _matmul(x[rows], *up(e), out=pre[here])
            if gated:
                g = _matmul(x[rows], *gate(e), out=pre_gate[here])
                torch.mul(_activation_into(activation, g, out=h), a, out=h)
            else:
                _activation_into(activation, a, out=h)
            _matmul(h, *down(e), out=out[rows])
        ctx.counts, ctx.activation, ctx.dtype = counts, activation, dtype
        ctx.has_bias = b_in is not None
        ctx.save_for_backward(x, w_in, w_out, w_gate, pre if keep else None,
                              pre_gate if keep else None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, w_in, w_out, w_gate, pre, pre_gate = ctx.saved_tensors
        counts, activation, dtype = ctx.counts, ctx.activation, ctx.dtype
        gated = w_gate is not None
        need = ctx.needs_input_grad
        grad_out = grad_out.to(dtype).contiguous()  # e.g. an expanded gradient of a sum()
        widest, f = max(counts, default=0), w_in.shape[-1]
        grads = {"x": torch.empty_like(x) if need[0] else None}
        for name, weight, index in (("w_in", w_in, 1), ("w_out", w_out, 3), ("w_gate", w_gate, 5)):
            wanted = weight is not None and need[index]
            grads[name] = _GRADIENTS.empty_like(weight) if wanted else None
        for name, weight, index in (("b_in", w_in, 2), ("b_out", w_out, 4), ("b_gate", w_gate, 6)):
            wanted = ctx.has_bias and weight is not None and need[index]
            grads[name] = weight.new_empty(weight.shape[0], weight.shape[-1]) if wanted else None
        for e, count in enumerate(counts):  # experts without rows: zero gradients
            if count == 0:
                for name in ("w_in", "w_out", "w_gate", "b_in", "b_out", "b_gate"):
                    if grads[name] is not None:
                        grads[name][e].zero_()
        up, down = _ExpertWeights(w_in, None, dtype), _ExpertWeights(w_out, None, dtype)
        gate = _ExpertWeights(w_gate, None, dtype) if gated else None
        staged = {name: None if grads[name] is None or grads[name].dtype == dtype
                  else grads[name].new_empty(grads[name].shape[1:], dtype=dtype)
                  for name in ("w_in", "w_out", "w_gate")}
        hidden, grad_hidden = x.new_empty(widest, f), x.new_empty(widest, f)
        half = x.element_size() < 4  # oneDNN: transposed left operands run ~2x slower

        def weight_grad(name: str, e: int, left: Tensor, right: Tensor) -> None:
            """grads[name][e] = left.T @ right, in the weights' dtype."""
            if grads[name] is None:
                return
            left_t = left.T.contiguous() if half else left.T
            target = grads[name][e] if staged[name] is None else staged[name]
            torch.mm(left_t, right, out=target)
            if staged[name] is not None:
                grads[name][e].copy_(target)

        def bias_grad(name: str, e: int, grad: Tensor) -> None:
            if grads[name] is not None:
                grads[name][e].copy_(grad.sum(0))  # in the matmul dtype, as nn.Linear

        for e, rows in _segments(counts):
            r = rows.stop - rows.start
            a, gy, xe = pre[rows], grad_out[rows], x[rows]
            h, gh = hidden[:r], grad_hidden[:r]
            if gated:
                g = pre_gate[rows]
                act_g = _activation_into(activation, g, out=h)
                torch.mm(gy, down(e)[0].T, out=gh)  # d loss / d hidden
                grad_a = gh * act_g
                grad_g = _activation_backward(activation, gh * a, g, act_g)
                h = torch.mul(act_g, a, out=h)
            else:
                _activation_into(activation, a, out=h)
                torch.mm(gy, down(e)[0].T, out=gh)
                grad_a = _activation_backward(activation, gh, a, h)
            weight_grad("w_out", e, h, gy)
            bias_grad("b_out", e, gy)
            weight_grad("w_in", e, xe, grad_a)
            bias_grad("b_in", e, grad_a)
            if gated:
                weight_grad("w_gate", e, xe, grad_g)
                bias_grad("b_gate", e, grad_g)
            if grads["x"] is not None:
                gx = torch.mm(grad_a, up(e)[0].T, out=grads["x"][rows])
                if gated:
                    gx.addmm_(grad_g, gate(e)[0].T)
        return (grads["x"], grads["w_in"], grads["b_in"], grads["w_out"], grads["b_out"],
                grads["w_gate"], grads["b_gate"], None, None, None)


def _segments(counts: list[int]) -> Iterator[tuple[int, slice]]:
    """(expert, its row slice) for every expert that has rows."""
    start = 0
    for e, count in enumerate(counts):
        if count:
            yield e, slice(start, start + count)
        start += count
