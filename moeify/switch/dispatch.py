"""Dispatch tokens into expert buffers and combine expert outputs back.

Two implementations of one function (a test proves they agree):

* `dispatch_padded` / `combine_padded`: static shapes. Every expert gets exactly C slots
  per group, an ``[E, G, C, d]`` buffer in which empty slots hold zeros. Built from index
  gathers plus one scatter whose indices are all distinct (every dropped choice has a
  discard column of its own), so tracing, ``torch.compile`` and ONNX export see fixed
  capacity dims and a graph the ONNX spec defines.
* `sort_by_expert` / `combine_sorted`: eager. Kept assignments sorted by expert, so the
  experts compute only the occupied slots. Sizes depend on the routing, so this path is
  for eager execution only.

`moeify.switch.dispatchers.LocalDispatcher` runs one of them per forward (`DispatchPath`).

Memory and time are linear in tokens: no ``[T, E, C]`` one-hot tensor is ever built.
Sizes (E, C, T, k) arrive as Python ints; the number of groups G is never read from a
shape, only carried by the tensors (so a batch axis can stay dynamic in an export).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from moeify.switch.routing import Routing


class Sizes(NamedTuple):
    """The static sizes of one Switch layer's buffers."""

    num_experts: int  # E
    expert_capacity: int  # C
    tokens_per_group: int  # T
    top_k: int  # k


def _group_index(reference: Tensor) -> Tensor:
    """[G, 1] int64 holding 0, 1, ..., G-1, computed from data so G stays symbolic."""
    return torch.ones_like(reference[:, :1], dtype=torch.int64).cumsum(0) - 1


def slot_destinations(routing: Routing, sizes: Sizes) -> Tensor:
    """Where each choice writes its token: [G, T*k] int64, distinct within each group.

    A kept choice writes to its slot ``e * C + position`` (< E*C); every other choice to
    a discard column of its own (``E*C + choice``), so no two writes share an index.
    """
    E, C, T, k = sizes
    slot = routing.expert_index * C + routing.position  # [G, T, k]
    choice = torch.arange(T * k, device=slot.device).view(T, k)  # one id per choice
    return torch.where(routing.kept, slot, E * C + choice).flatten(1)


def slot_tokens(routing: Routing, sizes: Sizes) -> Tensor:
    """Which token of its group fills each expert slot: [E, G, C] int64, T if empty."""
    E, C, T, k = sizes
    dest = slot_destinations(routing, sizes)  # [G, T*k]
    token = torch.arange(T, device=dest.device).repeat_interleave(k).expand_as(dest)
    empty = torch.zeros_like(dest[:, :1]).expand(-1, E * C + T * k) + T  # [G, E*C + T*k]
    filled = empty.scatter(1, dest, token)[:, : E * C]  # [G, E*C]
    return filled.unflatten(1, (E, C)).transpose(0, 1)  # [E, G, C]


def dispatch_padded(x: Tensor, routing: Routing, sizes: Sizes) -> Tensor:
    """Gather tokens into expert buffers. x: [G, T, d] -> [E, G, C, d], zeros where empty."""
    T = sizes.tokens_per_group
    x_padded = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)  # [G, T+1, d], row T = 0
    tokens = slot_tokens(routing, sizes) + _group_index(x[:, :, 0]).unsqueeze(0) * (T + 1)
    gathered = x_padded.flatten(0, 1).index_select(0, tokens.flatten())  # [E*G*C, d]
    return gathered.unflatten(0, (sizes.num_experts, -1, sizes.expert_capacity))


def combine_padded(expert_out: Tensor, routing: Routing, sizes: Sizes) -> Tensor:
    """Weighted sum of each token's expert outputs. [E, G, C, d] -> [G, T, d].

    A choice that was not kept reads an appended zero row, so a token with no kept
    choice comes out as exactly 0.
    """
    E, C, T, k = sizes
    group = _group_index(routing.expert_index.flatten(1)).unsqueeze(-1)  # [G, 1, 1]
    num_groups = group[-1:] + 1  # [1, 1, 1]
    source = routing.expert_index * (num_groups * C) + group * C + routing.position
    source = torch.where(routing.kept, source, E * num_groups * C)  # [G, T, k]
    rows = expert_out.flatten(0, 2)  # [E*G*C, d]
    rows = torch.cat([rows, torch.zeros_like(rows[:1])])  # + a zero row for dropped choices
    picked = rows.index_select(0, source.flatten()).unflatten(0, (-1, T, k))  # [G, T, k, d]
    weights = routing.combine_weights.to(picked.dtype).unsqueeze(-1)  # [G, T, k, 1]
    return (picked * weights).sum(dim=2)


class SortedAssignments(NamedTuple):
    """Kept (token, expert) assignments of a forward, sorted by expert.

    order:  [n] int64, index of each assignment in the flattened ``[G, T, k]`` routing.
    token:  [n] int64, index of its token in the flattened ``[G*T, d]`` input.
    row:    [G*T*k] int64, the inverse of ``order``: the sorted row of each choice, ``n``
            for a choice that was not kept.
    counts: per-expert number of assignments (Python ints, sum n).
    """

    order: Tensor
    token: Tensor
    row: Tensor
    counts: list[int]


def sort_by_expert(routing: Routing, sizes: Sizes) -> SortedAssignments:
    """Sort the kept assignments by expert, earlier tokens first within an expert."""
    E, k = sizes.num_experts, sizes.top_k
    key = torch.where(routing.kept, routing.expert_index, E).flatten()  # dropped -> E
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=E + 1)[:E].tolist()
    n = sum(counts)
    order = order[:n]
    row = torch.full_like(key, n).index_copy_(0, order, torch.arange(n, device=key.device))
    token = torch.div(order, k, rounding_mode="floor")
    return SortedAssignments(order, token, row, counts)


def dispatch_sorted(x_flat: Tensor, assignments: SortedAssignments, top_k: int) -> Tensor:
    """The rows the experts compute, sorted by expert: x_flat [G*T, d] -> [n, d]."""
    inverse = assignments.row.view(-1, top_k)  # [G*T, k]: the rows that read each token
    return gather_rows(x_flat, assignments.token, inverse)


def combine_sorted(
    expert_out: Tensor, routing: Routing, assignments: SortedAssignments, x_flat: Tensor
) -> Tensor:
    """Weighted sum of each token's expert rows. expert_out [n, d] -> like x_flat, [G*T, d].

    A choice that was not kept reads a zero row, so a token with no kept choice comes out
    as exactly 0.
    """
    k = routing.expert_index.shape[-1]
    picked = gather_rows(expert_out, assignments.row, assignments.order.unsqueeze(1))
    weights = routing.combine_weights.reshape(-1, 1).to(picked.dtype)  # [G*T*k, 1]
    weighted = (picked * weights).to(x_flat.dtype)  # [G*T*k, d]
    return weighted if k == 1 else weighted.unflatten(0, (-1, k)).sum(1)


def gather_rows(src: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
    """``src[index]``, where an index equal to ``len(src)`` reads a zero row, with a
    gradient that is a gather too. src: [m, d]; index: [r] int64.

    inverse: [m, j] int64, the output rows that read each source row (at most j of them;
    ``r`` fills the unused places). The backward sums those rows of the output gradient
    instead of scattering it with ``index_add``, which runs one row at a time on CPU.
    """
    return _GatherRows.apply(src, index, inverse)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return _with_zero_row(src).index_select(0, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        (inverse,) = ctx.saved_tensors
        picked = _with_zero_row(grad_out.contiguous()).index_select(0, inverse.flatten())
        picked = picked.unflatten(0, inverse.shape)  # [m, j, d]
        grad_src = picked[:, 0] if inverse.shape[1] == 1 else picked.sum(1)
        return grad_src, None, None


def _with_zero_row(x: Tensor) -> Tensor:
    """x [m, d] with one zero row appended: [m + 1, d]."""
    return torch.cat([x, x.new_zeros(1, x.shape[1])])
