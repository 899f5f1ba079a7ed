"""The dispatcher part of a Switch layer: how the selected tokens reach the experts and
how their outputs come back (the pure functions are in `moeify.switch.dispatch` and
`moeify.switch.expert_choice`).

A dispatcher is a stateless module called as ``dispatcher(x, routing, sizes, experts,
tracing=...)`` on grouped tokens x ``[G, T, d]``; it returns the combined output
``[G, T, d]`` and the number of rows each expert computed when it counted them (a list
of Python ints, or None: the router counts them for the record). Which one a layer
runs:

| dispatcher | when |
| --- | --- |
| `LocalDispatcher` (`DispatchPath` AUTO, PADDED or SORTED) | token choice in one process (the default) |
| `ExpertChoiceDispatcher` | expert choice |
| `moeify.distributed.AllToAllDispatcher` | `moeify.distributed.expert_parallel` / `parallelize` |
| `moeify.onnx.moe_op.OrtDispatcher` | inside an ONNX export with ``moe_op="ort"`` |

`expert_block` states the expert-parallel rule once: which experts each rank holds.
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor, nn

from moeify.errors import MoEError
from moeify.switch.dispatch import (
    Sizes,
    SortedAssignments,
    combine_padded,
    combine_sorted,
    dispatch_padded,
    dispatch_sorted,
    sort_by_expert,
)
from moeify.switch.expert_choice import (
    ExpertChoiceRouting,
    combine_expert_choice,
    dispatch_expert_choice,
)
from moeify.switch.experts import Experts, matmul_dtype
from moeify.switch.router import RoutingRecord
from moeify.switch.routing import Routing


class DispatchPath(enum.Enum):
    """How `LocalDispatcher` hands tokens to the experts (see `moeify.switch.dispatch`).

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


def expert_block(num_experts: int, rank: int, world_size: int, *, who: str = "the model",
                 over: str | None = None, fix: str = "a world size") -> range:
    """The experts rank ``rank`` of ``world_size`` holds under expert parallelism.

    The one statement of the rule: the experts divide evenly over the ranks
    (``num_experts % world_size == 0``) and rank r holds the contiguous block
    ``r*E/W .. (r+1)*E/W - 1``. ``who``, ``over`` (default ``"W processes"``) and ``fix``
    word the `MoEError` for the caller: ``"{who} has E experts, which do not divide over
    {over}: use {fix} that divides num_experts"``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise MoEError(f"rank {rank} is not in a group of {world_size}")
    if num_experts % world_size:
        over = over or f"{world_size} processes"
        raise MoEError(f"{who} has {num_experts} experts, which do not divide over {over}: "
                       f"use {fix} that divides num_experts")
    per_rank = num_experts // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


class Dispatcher(nn.Module):
    """How selected tokens reach the experts and come back (see the module docs).

    Holds no parameters of the layer: swapping a layer's dispatcher changes neither its
    state_dict nor its function.
    """

    def local_experts(self, num_experts: int) -> range:
        """The layer's experts this process holds (``Experts`` has as many): all of them
        unless the experts are spread over processes."""
        return range(num_experts)

    def forward(self, x: Tensor, routing: Routing | ExpertChoiceRouting, sizes: Sizes,
                experts: Experts, *, tracing: bool) -> tuple[Tensor, list[int] | None]:
        """Grouped tokens x [G, T, d] through their selected experts -> (y [G, T, d],
        rows per expert or None). ``tracing``: the forward is traced, compiled or
        exported (static shapes only)."""
        raise NotImplementedError

    def batch_record(self, record: RoutingRecord, routing: Routing | ExpertChoiceRouting
                     ) -> RoutingRecord:
        """The record of the whole batch this forward is part of, from this process's
        ``record``: the same record unless the batch is spread over processes."""
        return record


class LocalDispatcher(Dispatcher):
    """Token choice in one process: capacity-padded buffers or rows sorted by expert
    (dropless up to the capacity), chosen by ``path`` (`DispatchPath`)."""

    def __init__(self, path: DispatchPath = DispatchPath.AUTO) -> None:
        super().__init__()
        self.path = DispatchPath(path)

    def forward(self, x: Tensor, routing: Routing, sizes: Sizes, experts: Experts, *,
                tracing: bool) -> tuple[Tensor, list[int] | None]:
        assignments = None if tracing else sort_by_expert(routing, sizes)
        counts = None if assignments is None else assignments.counts
        if assignments is None or self.use_padded(x, assignments, sizes, experts):
            dispatched = dispatch_padded(x, routing, sizes)  # [E, G, C, d]
            batched = tracing or experts.batched_matmul_ok()
            expert_out = experts(dispatched.flatten(1, 2), batched=batched)  # [E, G*C, d]
            expert_out = expert_out.unflatten(1, (-1, sizes.expert_capacity))  # [E, G, C, d]
            return combine_padded(expert_out, routing, sizes), counts  # [G, T, d]
        x_flat = x.flatten(0, 1)  # [G*T, d]
        rows = dispatch_sorted(x_flat, assignments, sizes.top_k)  # [n, d], by expert
        expert_out = experts.forward_sorted(rows, assignments.counts)
        return combine_sorted(expert_out, routing, assignments, x_flat), counts

    def use_padded(self, x: Tensor, assignments: SortedAssignments, sizes: Sizes,
                   experts: Experts) -> bool:
        """Eager-mode choice of path for grouped tokens x: [G, T, d] (see `DispatchPath`)."""
        if self.path != DispatchPath.AUTO:
            return self.path == DispatchPath.PADDED
        if not experts.batched_matmul_ok():
            return False  # padded rows would run the same per-expert matmuls, on more rows
        padded_rows = x.shape[0] * sizes.expert_capacity * sizes.num_experts
        w = experts.w_in
        cost = BATCHED_COST.get((w.device.type, matmul_dtype(w)), 1.0)
        return cost * padded_rows < sum(assignments.counts)

    def extra_repr(self) -> str:
        return f"path={self.path.value}"


class ExpertChoiceDispatcher(Dispatcher):
    """Expert choice: each expert's C tokens per group gathered into ``[E, G*C, d]``
    (every slot occupied but for padding), one batched matmul per weight, outputs
    scatter-added back (several experts may share a token)."""

    def forward(self, x: Tensor, routing: ExpertChoiceRouting, sizes: Sizes,
                experts: Experts, *, tracing: bool) -> tuple[Tensor, list[int] | None]:
        dispatched = dispatch_expert_choice(x, routing, sizes)  # [E, G*C, d]
        batched = tracing or experts.batched_matmul_ok()
        expert_out = experts(dispatched, batched=batched)  # [E, G*C, d]
        return combine_expert_choice(expert_out, routing, sizes, x), None
