"""Expert parallelism over torch.distributed: the sharding plan, executed.

`expert_parallel(model, group)` turns every Switch layer of a converted model into an
`ExpertParallelSwitchFFN`: each of the group's W ranks keeps the ``E / W`` experts the
sharding plan gives it (contiguous blocks: rank r holds experts ``r*E/W .. (r+1)*E/W - 1``)
and every other parameter stays replicated. A forward then runs, on every rank:

1. route its own tokens with the replicated float32 router: groups are sequences, so
   capacities and drops are exactly those of a single process seeing the whole batch;
2. sort the kept assignments by expert and exchange per-expert row counts
   (``all_to_all_single`` of ``E`` ints), then the rows themselves (uneven splits), in the
   model's compute dtype (bf16 when the model runs in bf16 or under bf16 autocast);
3. compute its local experts on the rows it received (occupied rows only);
4. send the results back with the inverse all-to-all and combine them per token.

The backward of each all-to-all is the all-to-all with the splits swapped, so expert
gradients reach the rank that owns the expert. Auxiliary losses use global routing
statistics: one ``all_reduce`` of a small vector per layer (loss sums, group and token
counts, tokens per expert) makes the load-balancing and z-losses, their values, and
`moeify.routing_stats` equal to the single-process ones. Their gradients are scaled for
averaging over ranks (the DDP convention): with ``loss_r = task_loss_r + aux`` on every
rank and gradients averaged with `average_gradients` (replicated parameters all-reduced,
expert gradients divided by W), every gradient equals that of one process computing
``mean_r(task_loss_r) + aux`` on the concatenated batch.

Collective failures (a peer that died, raised, or missed the collective past the process
group's timeout) surface as `ExpertParallelError` naming the layer and the rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moeify.api import switch_layers
from moeify.checkpoint import load_skeleton
from moeify.errors import MoEError
from moeify.conversion import conversion_of
from moeify.switch.dispatch import (
    combine_sorted,
    dispatch_sorted,
    gather_rows,
    sort_by_expert,
)
from moeify.switch.experts import Experts
from moeify.switch.layer import RoutingRecord, SwitchFFN, _is_tracing
from moeify.switch.losses import load_balancing_loss, router_z_loss

__all__ = [
    "ExchangeRecord",
    "ExpertParallelError",
    "ExpertParallelSwitchFFN",
    "average_gradients",
    "expert_parallel",
    "load_expert_parallel",
]


class ExpertParallelError(MoEError):
    """A collective of the expert-parallel exchange failed (peer died, raised, timed out)."""


@dataclass(frozen=True)
class ExchangeRecord:
    """What crossed processes in the last forward of one layer (dispatch + combine).

    dtype:            the dtype of the exchanged activations.
    rows_sent:        rows this rank sent to each rank in the dispatch (its own included).
    rows_received:    rows it received from each rank in the dispatch.
    bytes_per_row:    ``d_model * dtype size``.
    """

    dtype: torch.dtype
    rows_sent: tuple[int, ...]
    rows_received: tuple[int, ...]
    bytes_per_row: int
    rank: int

    @property
    def remote_bytes_sent(self) -> int:
        """Bytes that left this process in the dispatch all-to-all (the combine returns
        as many)."""
        remote = sum(n for r, n in enumerate(self.rows_sent) if r != self.rank)
        return remote * self.bytes_per_row


def _check(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise MoEError(
            "expert parallelism needs torch.distributed: call "
            "torch.distributed.init_process_group(...) first (gloo on CPU, nccl on GPU)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _collective(what: str, layer: str, rank: int, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as error:
        raise ExpertParallelError(
            f"expert-parallel {what} in {layer or 'a Switch layer'} failed on rank {rank}: a "
            f"peer process died, raised, or did not reach the collective within the "
            f"process group's timeout ({str(error).splitlines()[0]})"
        ) from error


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; backward sends gradients back."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group, where: tuple) -> Tensor:
        ctx.send, ctx.recv, ctx.group, ctx.where = send, recv, group, where
        out = x.new_empty((sum(recv), *x.shape[1:]))
        _collective(*where, dist.all_to_all_single, out, x.contiguous(), recv, send,
                    group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        what, layer, rank = ctx.where
        _collective(f"{what} (backward)", layer, rank, dist.all_to_all_single, out,
                    grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None, None


def _local_experts(experts: Experts, experts_range: range) -> Experts:
    """The experts in ``experts_range`` as a module of their own (meta stays meta)."""
    w = experts.w_in
    local = Experts(
        len(experts_range), experts.d_model, experts.d_ff, activation=experts.activation,
        gated=experts.gated, bias=experts.b_in is not None, dropout=experts.dropout,
        device="meta", dtype=w.dtype,
    )
    block = slice(experts_range.start, experts_range.stop)
    for name, param in experts.named_parameters(recurse=False):
        setattr(local, name, nn.Parameter(param.detach()[block].clone(),
                                          requires_grad=param.requires_grad))
    local.train(experts.training)
    return local


class ExpertParallelSwitchFFN(SwitchFFN):
    """A `SwitchFFN` whose experts are spread over the ranks of a process group.

    Holds the replicated router and this rank's ``E / W`` experts (``self.experts`` has
    ``E / W`` of them; ``self.local_experts`` says which). Eager execution only: tracing,
    compiling and ONNX export need the single-process layer.
    """

    def __init__(self, layer: SwitchFFN, group=None, *, name: str = "",
                 experts_range: range | None = None) -> None:
        nn.Module.__init__(self)
        rank, world = _check(group)
        E = layer.config.num_experts
        if E % world:
            raise MoEError(f"{E} experts do not divide over {world} processes: use a world size "
                           "that divides num_experts")
        if experts_range is None:
            per_rank = E // world
            experts_range = range(rank * per_rank, (rank + 1) * per_rank)
        self.config = layer.config
        self.d_model, self.d_ff = layer.d_model, layer.d_ff
        self.dispatch_path = layer.dispatch_path
        self.router = layer.router
        self.experts = _local_experts(layer.experts, experts_range)
        self.set_tokens_per_group(layer.tokens_per_group)
        self.last_routing: RoutingRecord | None = None
        self.last_exchange: ExchangeRecord | None = None
        self.group, self.rank, self.world_size = group, rank, world
        self.local_experts = experts_range
        self.layer_name = name
        self.train(layer.training)

    def forward(self, hidden_states: Tensor) -> Tensor:
        if _is_tracing(hidden_states):
            raise MoEError("an expert-parallel Switch layer runs eagerly only: trace, compile "
                           "or export the single-process model")
        self._check_input(hidden_states)
        sizes = self._sizes(self.tokens_per_group or hidden_states.shape[-2])
        E, W, n_local = sizes.num_experts, self.world_size, len(self.local_experts)
        x = hidden_states.reshape(-1, sizes.tokens_per_group, self.d_model)  # [G, T, d]
        routing = self.route(x, sizes.expert_capacity)
        x_flat = x.flatten(0, 1)
        assignments = sort_by_expert(routing, sizes)
        dtype = _exchange_dtype(x_flat)
        rows = dispatch_sorted(x_flat, assignments, sizes.top_k).to(dtype)  # by global expert
        where = ("dispatch", self.layer_name, self.rank)
        # 1. how many rows each rank sends to each of this rank's experts
        counts = torch.tensor(assignments.counts, dtype=torch.int64)  # [E], experts in order
        incoming = torch.empty_like(counts)  # [W * n_local]: from rank r, for local expert j
        _collective("count exchange", self.layer_name, self.rank, dist.all_to_all_single,
                    incoming, counts, group=self.group)
        send = counts.view(W, n_local).sum(1).tolist()
        incoming = incoming.view(W, n_local)
        recv = incoming.sum(1).tolist()
        # 2. the rows, grouped by source rank then expert -> regrouped by local expert
        received = _AllToAll.apply(rows, send, recv, self.group, where)
        expert_of_row = torch.arange(n_local).repeat(W).repeat_interleave(incoming.flatten())
        order = torch.argsort(expert_of_row, stable=True)
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel())
        # permutations both ways; gather_rows makes each one's gradient a gather too
        out = self.experts.forward_sorted(gather_rows(received, order, back.unsqueeze(1)),
                                          incoming.sum(0).tolist())
        out = gather_rows(out.to(dtype), back, order.unsqueeze(1))  # source order again
        # 3. results back to the ranks that own the tokens
        expert_out = _AllToAll.apply(out, recv, send, self.group,
                                     ("combine", self.layer_name, self.rank))
        y = combine_sorted(expert_out, routing, assignments, x_flat)
        self.last_exchange = ExchangeRecord(dtype, tuple(send), tuple(recv),
                                            self.d_model * rows.element_size(), self.rank)
        self.last_routing = self._global_record(routing, assignments.counts,
                                                sizes.expert_capacity)
        return y.reshape_as(hidden_states).to(hidden_states.dtype)

    def _global_record(self, routing, counts: Sequence[int], capacity: int) -> RoutingRecord:
        """Losses and statistics over the whole group's batch (one all_reduce)."""
        E = self.config.num_experts
        groups, tokens = routing.router_probs.shape[0], routing.router_probs[..., 0].numel()
        # local sums: the per-group loss summed over groups, z summed over tokens
        lb_sum = load_balancing_loss(routing.router_probs, routing.expert_index[..., 0],
                                     num_experts=E) * groups
        z_sum = router_z_loss(routing.router_logits) * tokens
        reached = routing.kept.any(dim=-1).sum()
        stats = torch.cat([
            torch.stack([lb_sum.detach().double(), z_sum.detach().double()]),
            torch.tensor([groups, tokens], dtype=torch.float64), reached.double().view(1),
            torch.tensor(list(counts), dtype=torch.float64),
        ])
        _collective("statistics all_reduce", self.layer_name, self.rank, dist.all_reduce,
                    stats, group=self.group)
        total_lb, total_z, total_groups, total_tokens, total_reached = stats[:5].tolist()
        W = self.world_size

        def global_mean(local: Tensor, total: float, count: float) -> Tensor:
            # value: the group-wide mean; gradient: this rank's share, times W (averaged
            # over ranks later, as DDP does)
            return (W * local - (W - 1) * local.detach() + (total - local.detach())) / count

        return RoutingRecord(
            load_balancing_loss=global_mean(lb_sum, total_lb, total_groups),
            z_loss=global_mean(z_sum, total_z, total_tokens),
            tokens_per_expert=stats[5:].round().long(),
            dropped_fraction=torch.tensor(1.0 - total_reached / total_tokens),
            expert_capacity=capacity,
            num_tokens=int(total_tokens),
        )

    def extra_repr(self) -> str:
        r = self.local_experts
        return (f"{super().extra_repr()}, experts {r.start}..{r.stop - 1} on rank "
                f"{self.rank} of {self.world_size}")


def _exchange_dtype(x: Tensor) -> torch.dtype:
    """The dtype activations cross processes in: the compute dtype (bf16 under autocast)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _plan_ranges(model: nn.Module, rank: int, world: int) -> range | None:
    plan = conversion_of(model)
    sharding = None if plan is None else plan.sharding
    return None if sharding is None else sharding.experts_of_rank(rank, world)


def expert_parallel(model: nn.Module, group=None) -> nn.Module:
    """Shard every Switch layer's experts over ``group`` (default: the world), in place.

    Checks that every layer's expert count divides over the group before any collective
    runs. Returns ``model``. Replicated parameters are not synchronized here: start all
    ranks from the same weights (same seed or checkpoint) and average gradients with
    `average_gradients` (or DDP over the replicated parameters).
    """
    rank, world = _check(group)
    layers = switch_layers(model)
    if not layers:
        raise MoEError("the model has no Switch layers: convert it with moeify.convert first")
    for name, layer in layers:
        if isinstance(layer, ExpertParallelSwitchFFN):
            raise MoEError(f"{name} is already expert-parallel")
        if layer.config.num_experts % world:
            raise MoEError(
                f"{name} has {layer.config.num_experts} experts, which do not divide over "
                f"{world} processes: use a world size that divides num_experts"
            )
    experts_range = _plan_ranges(model, rank, world)
    for name, layer in layers:
        sharded = ExpertParallelSwitchFFN(layer, group, name=name, experts_range=experts_range)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, sharded)
    return model


def _is_expert_param(model: nn.Module) -> dict[int, bool]:
    expert_ids = {id(p) for m in model.modules() if isinstance(m, ExpertParallelSwitchFFN)
                  for p in m.experts.parameters()}
    return {id(p): id(p) in expert_ids for p in model.parameters()}


@torch.no_grad()
def average_gradients(model: nn.Module, group=None) -> None:
    """Average gradients over the group after ``backward()`` (the DDP convention).

    Replicated parameters: all-reduced and divided by W. Expert parameters: already the
    sum over every rank's tokens (the all-to-all backward delivers them), divided by W.
    """
    rank, world = _check(group)
    is_expert = _is_expert_param(model)
    replicated = [p for p in model.parameters()
                  if p.grad is not None and not is_expert[id(p)]]
    if replicated:
        flat = torch.cat([p.grad.flatten().double() for p in replicated])
        _collective("gradient all_reduce", "", rank, dist.all_reduce, flat, group=group)
        offset = 0
        for p in replicated:
            n = p.grad.numel()
            p.grad.copy_((flat[offset:offset + n] / world).view_as(p.grad))
            offset += n
    for p in model.parameters():
        if p.grad is not None and is_expert[id(p)]:
            p.grad.div_(world)


def load_expert_parallel(path: str | Path, group=None, *, model: nn.Module | None = None
                         ) -> nn.Module:
    """Load a moeify checkpoint straight into the sharded form.

    The architecture is rebuilt on meta parameters, sharded, and then each rank reads
    the replicated weights and only the slices of the expert weights it keeps
    (safetensors slices: no rank ever holds another rank's experts).
    """
    skeleton, weights = load_skeleton(path, model=model)
    expert_parallel(skeleton, group)
    state: dict[str, Any] = {}
    for name, module in skeleton.named_modules():
        if isinstance(module, ExpertParallelSwitchFFN):
            r = module.local_experts
            for pname, _ in module.experts.named_parameters():
                key = f"{name}.experts.{pname}"
                state[key] = weights.get_slice(key, r.start, r.stop)
    for key in skeleton.state_dict():
        if key not in state:
            state[key] = weights.get(key)
    try:
        skeleton.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise MoEError(f"checkpoint {path} does not match its architecture: {error}") from None
    if hasattr(skeleton, "tie_weights"):
        skeleton.tie_weights()
    return skeleton.eval()


def predicted_dispatch_bytes(tokens: int, d_model: int, dtype: torch.dtype, world: int,
                             kept_fraction: float = 1.0, top_k: int = 1) -> float:
    """Expected bytes one rank sends to other ranks per all-to-all under uniform routing:
    ``tokens * k * kept * (W - 1) / W * d * itemsize``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return tokens * top_k * kept_fraction * (world - 1) / world * d_model * itemsize
