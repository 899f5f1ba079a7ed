"""The Switch layer: thin modules that hold parameters and call the pure functions.

`Router` holds the router weight, `Experts` the batched expert weights, and `SwitchFFN`
puts them together as a drop-in replacement for a dense FFN: ``[..., d] -> [..., d]``,
returning 0 for tokens that no expert processed so the surrounding residual carries
them unchanged.
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeify.config import Activation, MoEConfig, RouterKind
from moeify.switch.dispatch import (
    Sizes,
    SortedAssignments,
    combine_padded,
    combine_sorted,
    dispatch_padded,
    dispatch_sorted,
    sort_by_expert,
)
from moeify.switch.experts import DenseFFNWeights, Experts, matmul_dtype
from moeify.switch.expert_choice import (
    ExpertChoiceRouting,
    combine_expert_choice,
    dispatch_expert_choice,
    route_expert_choice,
    times_chosen,
)
from moeify.switch.losses import load_balancing_loss, router_z_loss
from moeify.switch.router import Router
from moeify.switch.routing import Routing, group_capacities, route
from moeify.switch.upcycle import upcycled_tensors


class DispatchPath(enum.Enum):
    """How `SwitchFFN` hands tokens to its experts (see `moeify.switch.dispatch`).

    PADDED: static ``[E, G, C, d]`` buffers, empty slots included. Traced, compiled and
        exported graphs always take it (their shapes must not depend on the routing). In
        eager mode the expert matmuls are one ``bmm`` per weight where the weights are
        already in the matmul dtype, else one matmul per expert (see `Experts.forward`).
    SORTED: only the occupied slots, sorted by expert, one matmul per expert (eager).
    AUTO: PADDED when traced; in eager mode, after routing, whichever costs less for the
        rows at hand: PADDED's batched matmul computes every slot, so it is chosen only
        where ``bmm`` over the padded rows is predicted to beat per-expert matmuls over
        the occupied rows (`BATCHED_COST`, measured per device type and dtype by
        ``benchmarks/bench_dispatch.py``).
    """

    AUTO = "auto"
    PADDED = "padded"
    SORTED = "sorted"


# Time of one batched matmul (bmm) over R rows per expert relative to E per-expert
# matmuls over the same rows, per device type and matmul dtype (forward and backward
# together). AUTO takes PADDED when ``cost * padded_rows < occupied_rows``; a device type
# or dtype not listed takes the sorted path. Measured with ``benchmarks/bench_dispatch.py``
# (BENCHMARKS.md, "Dispatch cost"):
# - this project's 2-core CPU machines: in float32 the two are within the machine's noise
#   of each other (0.88-1.33 over E 8/64 and 16-256 rows per expert), so padding never
#   pays; with bfloat16 weights oneDNN's batched matmul runs at 0.76-1.19 of the
#   per-expert calls (median 0.92), so padding pays only for nearly full buffers.
# - an NVIDIA H200: one bmm replaces E kernel launches, 0.15-0.8 of the per-expert calls in
#   float32 (rising with rows per expert) and 0.04-0.26 in bfloat16.
BATCHED_COST: dict[tuple[str, torch.dtype], float] = {
    ("cpu", torch.float32): 1.0,
    ("cpu", torch.float64): 1.0,
    ("cpu", torch.bfloat16): 0.75,
    ("cpu", torch.float16): 0.75,
    ("cuda", torch.float32): 0.7,
    ("cuda", torch.bfloat16): 0.25,
    ("cuda", torch.float16): 0.25,
}


class RoutingRecord(NamedTuple):
    """What one forward of a Switch layer leaves behind for losses and statistics.

    load_balancing_loss: scalar float32 with gradient, unweighted; a constant 0 for an
                         expert-choice layer (balanced by construction).
    z_loss:              scalar float32 with gradient, unweighted.
    tokens_per_expert:   [E] int64, assignments each expert processed (all groups);
                         expert choice: C per group, fewer in groups with padding.
    dropped_fraction:    scalar float32, fraction of the real tokens no expert
                         processed (expert choice: that no expert chose).
    expert_capacity:     slots per expert and group in that forward.
    num_tokens:          real tokens in that forward.
    """

    load_balancing_loss: Tensor
    z_loss: Tensor
    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    expert_capacity: int
    num_tokens: int


class SwitchFFN(nn.Module):
    """A Switch Transformer FFN layer: router, E experts, static expert capacity.

    Built for a declared group length (``config.group_size``, else ``seq_len``: one
    sequence per group), the capacity is a Python int fixed here, never computed from
    an input's shape in ``forward``; ``train()`` / ``eval()`` switch between the
    training and the evaluation capacity factor. Input ``[..., d]``: with one sequence
    per group the second-to-last axis must be the declared sequence length; with
    ``group_size`` the token count must divide into groups.

    Without a declared length (``seq_len=None`` and no ``group_size``) each sequence is
    still one group, and in eager mode the capacity follows each input's sequence length
    by the same formula, as a Python int: what autoregressive decoding needs (one new
    token per step). Tracing, compiling and exporting need the fixed capacity of a
    declared length and refuse an undeclared layer.

    With ``config.router == "expert-choice"`` the experts choose their tokens
    (`moeify.switch.expert_choice`): each expert takes C tokens of every group, computed
    in the static ``[E, G*C, d]`` buffers (``dispatch_path`` does not apply).

    After each forward (outside tracing and export), `last_routing` holds the unweighted
    losses and the routing statistics that `moeify.aux_loss` and `moeify.routing_stats`
    read: the one piece of state a forward writes, the equivalent of flax's ``sow``.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        config: MoEConfig,
        *,
        seq_len: int | None = None,
        activation: Activation | str = Activation.RELU,
        gated: bool = False,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        router: Router | None = None,
        experts: Experts | None = None,
        source_dropout: float = 0.0,
    ) -> None:
        """``router`` / ``experts``: modules built elsewhere (the conversion passes) to
        use instead of allocating fresh ones; their shapes must match.
        ``source_dropout``: the dropout rate inside the dense FFN this layer replaces;
        fresh experts use it unless ``config.expert_dropout`` overrides it."""
        super().__init__()
        self.config = config
        self.d_model, self.d_ff = d_model, d_ff
        self.dispatch_path = DispatchPath.AUTO
        if router is None:
            router = Router(
                d_model,
                config.num_experts,
                jitter_eps=config.jitter_eps,
                router_dtype="float64" if dtype == torch.float64 else config.router_dtype,
                device=device,
            )
        if experts is None:
            experts = Experts(
                config.num_experts, d_model, d_ff, activation=activation, gated=gated,
                bias=bias, dropout=config.resolve_expert_dropout(source_dropout),
                device=device, dtype=dtype,
            )
        expected = (config.num_experts, d_model)
        if tuple(router.weight.shape) != expected:
            raise ValueError(f"router weight {tuple(router.weight.shape)} != {expected}")
        if (experts.num_experts, experts.d_model, experts.d_ff) != (*expected, d_ff):
            raise ValueError(
                f"experts ({experts.num_experts}, {experts.d_model}, {experts.d_ff}) != "
                f"{(*expected, d_ff)}"
            )
        self.router = router
        self.experts = experts
        self.set_tokens_per_group(config.group_size if config.group_size is not None else seq_len)
        self.last_routing: RoutingRecord | None = None
        # [batch, length] mask of the real tokens for the model's current forward (set
        # and cleared around it by a hook on the model), or None: every token is real
        self.token_mask: Tensor | None = None

    @classmethod
    def from_dense(
        cls,
        dense: DenseFFNWeights,
        config: MoEConfig,
        *,
        path: str = "",
        seq_len: int | None = None,
        activation: Activation | str = Activation.RELU,
        source_dropout: float = 0.0,
    ) -> SwitchFFN:
        """Upcycle one dense FFN: experts from its weights (``config.init``), new router.

        The one way a Switch layer is made from a dense FFN: conversion, streamed
        conversion and loading all come here or to `upcycled_tensors`, which this uses.
        ``path`` (the FFN's module path in its model) seeds the random draws with
        ``config.seed``, so ``from_dense(moeify.FFNSite.dense_weights(model), config,
        path=site.path)`` equals what ``moeify.convert`` builds for that site.
        ``source_dropout``: the dropout rate the dense FFN applies between its
        projections (the experts' rate unless ``config.expert_dropout`` overrides it).
        Dense weights on the meta device give a layer on the meta device (nothing drawn:
        loading a checkpoint assigns its tensors).
        """
        d, f = dense.w_in.shape
        split = config.hidden_split
        if f % split.parts:
            raise ValueError(f"{split.who} splits the hidden width {f} into {split.parts} "
                             f"{split.unit}, which does not divide it: {split.fix}")
        f = config.expert_width(f)
        layer = cls(  # on meta first: every parameter is written below, none drawn twice
            d, f, config, seq_len=seq_len, activation=activation,
            gated=dense.w_gate is not None, bias=dense.b_in is not None,
            device="meta", dtype=dense.w_in.dtype, source_dropout=source_dropout,
        )
        if dense.w_in.is_meta:
            return layer
        layer = layer.to_empty(device=dense.w_in.device)
        params = dict(layer.named_parameters())
        for name, source in upcycled_tensors(dense, config, path=path,
                                             activation=activation).items():
            source.copy_to(params[name])
        return layer

    def set_tokens_per_group(self, tokens_per_group: int | None) -> None:
        """Declare the group length and fix the train and eval capacities for it.

        ``None`` (only without ``MoEConfig.group_size``) undeclares it: eager inputs of
        any sequence length, capacity computed per call (see the class docs).
        """
        if tokens_per_group is None and self.config.group_size is not None:
            raise ValueError("MoEConfig.group_size is set: the group length is always declared")
        if tokens_per_group is not None and (
            not isinstance(tokens_per_group, int) or tokens_per_group < 1
        ):
            raise ValueError(f"tokens_per_group must be an int >= 1, got {tokens_per_group!r}")
        self.tokens_per_group = tokens_per_group
        capacity = lambda training: (  # noqa: E731
            None if tokens_per_group is None
            else self.config.capacity(tokens_per_group, training=training)
        )
        self.train_capacity = capacity(True)
        self.eval_capacity = capacity(False)

    @property
    def expert_capacity(self) -> int | None:
        """Slots per expert and group in the current mode (None: undeclared length)."""
        return self.train_capacity if self.training else self.eval_capacity

    @property
    def sizes(self) -> Sizes:
        """Routing sizes for the declared group length."""
        if self.tokens_per_group is None:
            raise ValueError(
                "this SwitchFFN has no declared sequence length, so no fixed capacity: "
                "call set_tokens_per_group(n) (moeify.convert(..., seq_len=n))"
            )
        return self._sizes(self.tokens_per_group)

    def _sizes(self, tokens_per_group: int) -> Sizes:
        c = self.config
        capacity = c.capacity(tokens_per_group, training=self.training)
        return Sizes(c.num_experts, capacity, tokens_per_group, c.top_k)

    def forward(self, hidden_states: Tensor) -> Tensor:
        tracing = _is_tracing(hidden_states)
        if tracing:
            sizes = self.sizes  # a traced graph keeps its capacity: it must be declared
        else:
            self._check_input(hidden_states)
            tokens = self.tokens_per_group or hidden_states.shape[-2]  # eager: a Python int
            sizes = self._sizes(tokens)
        x = hidden_states.reshape(-1, sizes.tokens_per_group, self.d_model)  # [G, T, d]
        valid = self._valid_tokens(hidden_states, x)  # [G, T] bool or None
        capacity: int | Tensor = sizes.expert_capacity
        if valid is not None:  # each group's capacity from its real tokens
            capacity = self._group_capacities(valid)
        if self.config.router == RouterKind.EXPERT_CHOICE:
            y = self._expert_choice(x, sizes, capacity, valid, tracing=tracing,
                                    record=not _is_exporting(hidden_states))
            return y.reshape_as(hidden_states).to(hidden_states.dtype)
        routing = self.route(x, capacity, valid=valid)
        ort_experts = self._modules.get("ort_experts")  # attached by an export only
        if ort_experts is not None and _is_exporting(hidden_states):
            y = self._ort_experts(ort_experts, x, routing, sizes)
            return y.reshape_as(hidden_states).to(hidden_states.dtype)
        assignments = None if tracing else sort_by_expert(routing, sizes)
        if assignments is None or self._use_padded(x, assignments, sizes):
            dispatched = dispatch_padded(x, routing, sizes)  # [E, G, C, d]
            batched = tracing or self.experts.batched_matmul_ok()
            expert_out = self.experts(dispatched.flatten(1, 2), batched=batched)  # [E, G*C, d]
            expert_out = expert_out.unflatten(1, (-1, sizes.expert_capacity))  # [E, G, C, d]
            y = combine_padded(expert_out, routing, sizes)  # [G, T, d]
        else:
            x_flat = x.flatten(0, 1)  # [G*T, d]
            rows = dispatch_sorted(x_flat, assignments, sizes.top_k)  # [n, d], by expert
            expert_out = self.experts.forward_sorted(rows, assignments.counts)
            y = combine_sorted(expert_out, routing, assignments, x_flat)
        if not _is_exporting(hidden_states):
            counts = None if assignments is None else assignments.counts
            self.last_routing = self._record(routing, counts, sizes.expert_capacity)
        return y.reshape_as(hidden_states).to(hidden_states.dtype)

    def _ort_experts(self, ort_experts: nn.Module, x: Tensor, routing: Routing,
                     sizes: Sizes) -> Tensor:
        """The experts as ONNX Runtime's MoE operator, for an export with
        ``moe_op="ort"`` (`moeify.onnx.moe_op`): every token through its routed experts,
        then the capacity and padding applied as the ``kept`` mask."""
        y = ort_experts(x.flatten(0, 1), routing.router_logits.flatten(0, 1))  # [G*T, d]
        y = y.unflatten(0, x.shape[:2])
        if routing.valid is not None or sizes.expert_capacity < sizes.tokens_per_group:
            # top-1: the one choice; top-2 reaches here only where nothing can drop
            y = y * routing.kept.any(dim=-1, keepdim=True).to(y.dtype)
        return y

    def _expert_choice(self, x: Tensor, sizes: Sizes, capacity: int | Tensor,
                       valid: Tensor | None, *, tracing: bool, record: bool) -> Tensor:
        """Expert choice over grouped tokens x: [G, T, d] -> [G, T, d]. ``capacity``: the
        static C, or each group's capacity for its real tokens ([G, 1, 1])."""
        routing = route_expert_choice(
            self.router(x), expert_capacity=sizes.expert_capacity, valid=valid,
            group_capacity=None if isinstance(capacity, int) else capacity,
        )
        dispatched = dispatch_expert_choice(x, routing, sizes)  # [E, G*C, d]
        batched = tracing or self.experts.batched_matmul_ok()
        expert_out = self.experts(dispatched, batched=batched)  # [E, G*C, d]
        if record:
            self.last_routing = self._record_expert_choice(routing, sizes.expert_capacity)
        return combine_expert_choice(expert_out, routing, sizes, x)

    def _record_expert_choice(self, routing: ExpertChoiceRouting,
                              expert_capacity: int) -> RoutingRecord:
        valid = routing.valid
        chosen = times_chosen(routing) > 0  # [G, T]; padding is never chosen
        real = chosen.numel() if valid is None else int(valid.sum())
        return RoutingRecord(
            load_balancing_loss=torch.zeros((), device=chosen.device),
            z_loss=router_z_loss(routing.router_logits, valid),
            tokens_per_expert=routing.kept.sum(dim=(0, 2)).detach(),
            dropped_fraction=(1.0 - chosen.sum().float() / max(real, 1)).detach(),
            expert_capacity=expert_capacity,
            num_tokens=real,
        )

    def _use_padded(self, x: Tensor, assignments: SortedAssignments, sizes: Sizes) -> bool:
        """Eager-mode choice of dispatch path for grouped tokens x: [G, T, d] (see
        `DispatchPath`)."""
        if self.dispatch_path != DispatchPath.AUTO:
            return self.dispatch_path == DispatchPath.PADDED
        if not self.experts.batched_matmul_ok():
            return False  # padded rows would run the same per-expert matmuls, on more rows
        padded_rows = x.shape[0] * sizes.expert_capacity * sizes.num_experts
        w = self.experts.w_in
        cost = BATCHED_COST.get((w.device.type, matmul_dtype(w)), 1.0)
        return cost * padded_rows < sum(assignments.counts)

    def _valid_tokens(self, hidden_states: Tensor, x: Tensor) -> Tensor | None:
        """The real tokens of this forward as [G, T] bool, from ``token_mask`` (set around
        the model's forward from its attention mask, see `moeify.passes.RegisterPaddingMask`),
        or None when there is no mask or it does not describe these tokens.

        A mask ``[batch, length]`` covers this input's ``[batch, seq]`` tokens when the
        batch matches and ``length >= seq``: with a KV cache the mask also covers the past
        tokens, and this step's tokens are its last ``seq`` columns.
        """
        mask = self.token_mask
        if mask is None or hidden_states.dim() < 3:
            return None
        batch, seq = hidden_states.shape[0], hidden_states.shape[-2]
        if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < seq:
            return None
        return mask[:, mask.shape[1] - seq:].to(device=x.device, dtype=torch.bool).reshape(x.shape[:2])

    def _group_capacities(self, valid: Tensor) -> Tensor:
        c = self.config
        factor = c.capacity_factor if self.training else c.eval_capacity_factor
        return group_capacities(valid.sum(dim=1), num_experts=c.num_experts,
                                capacity_factor=factor, top_k=c.top_k,
                                min_capacity=c.min_capacity, dropless=c.dropless)

    def route(self, x: Tensor, expert_capacity: int | Tensor | None = None, *,
              valid: Tensor | None = None) -> Routing:
        """Router logits and routing decisions for grouped tokens x: [G, T, d].

        ``expert_capacity`` defaults to the capacity of the declared length; ``valid``
        ([G, T] bool) marks the real tokens (padding chooses no expert).
        """
        if expert_capacity is None:
            expert_capacity = self.sizes.expert_capacity
        c = self.config
        router_logits = self.router(x)  # [G, T, E] float32
        uniform = None
        if self.training and c.top_k == 2:
            uniform = torch.rand_like(router_logits[..., 0])  # GShard random routing
        return route(
            router_logits, num_experts=c.num_experts, top_k=c.top_k,
            expert_capacity=expert_capacity, gate=c.gate, second_uniform=uniform,
            valid=valid,
        )

    def _record(
        self, routing: Routing, counts: list[int] | None, expert_capacity: int
    ) -> RoutingRecord:
        E = self.config.num_experts
        if counts is None:
            assigned = F.one_hot(routing.expert_index, E) * routing.kept.unsqueeze(-1)
            tokens_per_expert = assigned.sum(dim=(0, 1, 2)).detach()
        else:
            tokens_per_expert = torch.tensor(counts, dtype=torch.int64)
        reached = routing.kept.any(dim=-1)  # [G, T]
        valid = routing.valid
        real = reached.numel() if valid is None else int(valid.sum())
        return RoutingRecord(
            load_balancing_loss=load_balancing_loss(
                routing.router_probs, routing.expert_index[..., 0], num_experts=E, valid=valid
            ),
            z_loss=router_z_loss(routing.router_logits, valid),
            tokens_per_expert=tokens_per_expert,
            dropped_fraction=(1.0 - reached.sum().float() / max(real, 1)).detach(),
            expert_capacity=expert_capacity,
            num_tokens=real,
        )

    def _check_input(self, hidden_states: Tensor) -> None:
        shape = tuple(hidden_states.shape)
        if not shape or shape[-1] != self.d_model:
            raise ValueError(f"SwitchFFN expects inputs [..., {self.d_model}], got {shape}")
        if len(shape) < 2 and self.config.group_size is None:
            raise ValueError(
                f"SwitchFFN expects inputs [..., seq_len, {self.d_model}] (one sequence per "
                f"group), got {shape}"
            )
        if self.config.group_size is None:
            if self.tokens_per_group is not None and shape[-2] != self.tokens_per_group:
                raise ValueError(
                    f"SwitchFFN was built for sequences of {self.tokens_per_group} tokens "
                    f"(its capacity is fixed for that length), got input {shape}; call "
                    f"set_tokens_per_group({shape[-2]}) to re-declare it, or "
                    "set_tokens_per_group(None) for a per-call capacity in eager mode"
                )
        elif math.prod(shape[:-1]) % self.tokens_per_group:
            raise ValueError(
                f"SwitchFFN routes groups of {self.tokens_per_group} tokens; input {shape} "
                f"has {math.prod(shape[:-1])} tokens, not a multiple of it"
            )

    def extra_repr(self) -> str:
        c = self.config
        if self.tokens_per_group is None:
            capacity = "per call (undeclared length)"
        else:
            capacity = f"{self.train_capacity} (train) / {self.eval_capacity} (eval)"
        return (
            f"d_model={self.d_model}, num_experts={c.num_experts}, top_k={c.top_k}, "
            f"tokens_per_group={self.tokens_per_group}, expert_capacity={capacity}, "
            f"gate={c.gate.value}, router={c.router.value}"
        )


def _captured(x: Tensor) -> bool:
    """Whether this forward is being recorded by fx, the jit tracer or ONNX export."""
    return (
        isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    )


def _is_tracing(x: Tensor) -> bool:
    """Whether this forward is traced or compiled rather than run eagerly (static path)."""
    return _captured(x) or torch.compiler.is_compiling()


def _is_exporting(x: Tensor) -> bool:
    """Whether this forward produces a graph that cannot hold module state writes."""
    return _captured(x) or torch.compiler.is_exporting()
