"""Expert parallelism over one process group: the all-to-all dispatcher, the
experts-per-rank split and gradient averaging (the package docstring, `moeify.distributed`,
describes the whole design)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from moeify.config import RouterKind
from moeify.errors import MoEError
from moeify.switch import switch_layers
from moeify.switch.dispatch import (
    Sizes,
    combine_sorted,
    dispatch_sorted,
    gather_rows,
    sort_by_expert,
)
from moeify.switch.dispatchers import Dispatcher, expert_block
from moeify.switch.experts import Experts
from moeify.switch.layer import SwitchFFN
from moeify.switch.router import RoutingRecord
from moeify.switch.routing import Routing

if TYPE_CHECKING:
    from moeify.distributed.mesh import ParallelLayout



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


def check(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise MoEError(
            "expert parallelism needs torch.distributed: call "
            "torch.distributed.init_process_group(...) first (gloo on CPU, nccl on GPU)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def collective(what: str, layer: str, rank: int, fn, *args, **kwargs):
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
        collective(*where, dist.all_to_all_single, out, x.contiguous(), recv, send,
                    group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        what, layer, rank = ctx.where
        collective(f"{what} (backward)", layer, rank, dist.all_to_all_single, out,
                    grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None, None


@contextmanager
def _local_parameters(module: nn.Module):
    """Within the block, ``module``'s DTensor parameters read as their local shards
    (`DTensor.to_local`, differentiable: the gradient reaches the DTensor parameter)."""
    swapped = {name: p for name, p in module._parameters.items() if isinstance(p, DTensor)}
    try:
        for name, param in swapped.items():
            module._parameters[name] = param.to_local()
        yield module
    finally:
        module._parameters.update(swapped)


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


class AllToAllDispatcher(Dispatcher):
    """Token choice with the layer's experts spread over the ranks of a process group.

    Each rank keeps the block of experts `moeify.switch.expert_block` gives it
    (``local_experts``); the layer's ``experts`` hold only those. A forward sorts this
    rank's kept assignments by expert, exchanges per-expert row counts and then the rows
    (all-to-all), computes the local experts on the rows received and sends the results
    back (see the module docs). Eager execution only: tracing, compiling and ONNX export
    need the single-process layer.

    ``last_exchange`` describes what crossed processes in the last forward.
    """

    def __init__(self, group=None, *, num_experts: int, name: str = "",
                 stats_group=None) -> None:
        """``group``: the ranks that split the experts and exchange tokens;
        ``stats_group``: the ranks whose routing statistics and auxiliary losses are
        combined (default: ``group``; `parallelize` passes the whole job); ``name``: the
        layer's path in its model, for error messages."""
        super().__init__()
        rank, world = check(group)
        self.experts_range = expert_block(num_experts, rank, world)
        self.group, self.rank, self.world_size = group, rank, world
        self.stats_group = group if stats_group is None else stats_group
        self.stats_world_size = dist.get_world_size(self.stats_group)
        self.layer_name = name
        self.last_exchange: ExchangeRecord | None = None

    def local_experts(self, num_experts: int) -> range:
        return self.experts_range

    def forward(self, x: Tensor, routing: Routing, sizes: Sizes, experts: Experts, *,
                tracing: bool) -> tuple[Tensor, list[int]]:
        if tracing:
            raise MoEError("an expert-parallel Switch layer runs eagerly only: trace, compile "
                           "or export the single-process model")
        W, n_local = self.world_size, len(self.experts_range)
        x_flat = x.flatten(0, 1)
        assignments = sort_by_expert(routing, sizes)
        dtype = _exchange_dtype(x_flat)
        rows = dispatch_sorted(x_flat, assignments, sizes.top_k).to(dtype)  # by global expert
        where = ("dispatch", self.layer_name, self.rank)
        # 1. how many rows each rank sends to each of this rank's experts
        counts = torch.tensor(assignments.counts, dtype=torch.int64)  # [E], experts in order
        incoming = torch.empty_like(counts)  # [W * n_local]: from rank r, for local expert j
        collective("count exchange", self.layer_name, self.rank, dist.all_to_all_single,
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
        with _local_parameters(experts):
            out = experts.forward_sorted(gather_rows(received, order, back.unsqueeze(1)),
                                         incoming.sum(0).tolist())
        out = gather_rows(out.to(dtype), back, order.unsqueeze(1))  # source order again
        # 3. results back to the ranks that own the tokens
        expert_out = _AllToAll.apply(out, recv, send, self.group,
                                     ("combine", self.layer_name, self.rank))
        y = combine_sorted(expert_out, routing, assignments, x_flat)
        self.last_exchange = ExchangeRecord(dtype, tuple(send), tuple(recv),
                                            x.shape[-1] * rows.element_size(), self.rank)
        return y, assignments.counts

    def batch_record(self, record: RoutingRecord, routing: Routing) -> RoutingRecord:
        """Losses and statistics over the whole statistics group's batch (one all_reduce)."""
        valid = routing.valid
        if valid is None:
            groups, tokens = routing.router_probs.shape[0], routing.router_probs[..., 0].numel()
        else:  # groups with real tokens, real tokens
            groups, tokens = int(valid.any(dim=1).sum()), int(valid.sum())
        # local sums: the per-group loss summed over groups, z summed over tokens, the
        # sequence-wise loss over sequences (a rank holds whole sequences)
        lb_sum = record.load_balancing_loss * groups
        z_sum = record.z_loss * tokens
        seq_sum = record.seq_balance_loss * record.num_sequences
        reached = routing.kept.any(dim=-1).sum()
        stats = torch.cat([
            torch.stack([lb_sum.detach().double(), z_sum.detach().double(),
                         seq_sum.detach().double()]),
            torch.tensor([groups, tokens, record.num_sequences], dtype=torch.float64),
            reached.double().view(1), record.tokens_per_expert.to(torch.float64),
        ])
        collective("statistics all_reduce", self.layer_name, self.rank, dist.all_reduce,
                    stats, group=self.stats_group)
        (total_lb, total_z, total_seq, total_groups, total_tokens, total_sequences,
         total_reached) = stats[:7].tolist()
        W = self.stats_world_size

        def global_mean(local: Tensor, total: float, count: float) -> Tensor:
            # value: the group-wide mean; gradient: this rank's share, times W (averaged
            # over ranks later, as DDP does)
            return (W * local - (W - 1) * local.detach() + (total - local.detach())) / max(count, 1)

        return RoutingRecord(
            load_balancing_loss=global_mean(lb_sum, total_lb, total_groups),
            z_loss=global_mean(z_sum, total_z, total_tokens),
            seq_balance_loss=global_mean(seq_sum, total_seq, total_sequences),
            tokens_per_expert=stats[7:].round().long(),
            dropped_fraction=torch.tensor(1.0 - total_reached / max(total_tokens, 1)),
            expert_capacity=record.expert_capacity,
            num_tokens=int(total_tokens),
            num_sequences=int(total_sequences),
        )

    def extra_repr(self) -> str:
        r = self.experts_range
        return f"experts {r.start}..{r.stop - 1} on rank {self.rank} of {self.world_size}"


def is_expert_parallel(module: nn.Module) -> bool:
    """Whether ``module`` is a Switch layer whose experts are spread over processes."""
    return isinstance(module, SwitchFFN) and isinstance(module.dispatcher, AllToAllDispatcher)


def spread_experts(model: nn.Module, group, *, stats_group=None) -> None:
    """Every Switch layer of ``model`` -> the same layer (router, shared experts,
    configuration, mode) holding only this rank's block of experts, with an
    `AllToAllDispatcher` over ``group``; parameters may be on the meta device."""
    for name, layer in switch_layers(model):
        dispatcher = AllToAllDispatcher(group, num_experts=layer.config.num_experts, name=name,
                                        stats_group=stats_group)
        sharded = SwitchFFN(layer.d_model, layer.d_ff, layer.config,
                            seq_len=layer.tokens_per_group, router=layer.router,
                            experts=_local_experts(layer.experts, dispatcher.experts_range),
                            dispatcher=dispatcher, shared_experts=layer.shared_experts)
        sharded.train(layer.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, sharded)


def _exchange_dtype(x: Tensor) -> torch.dtype:
    """The dtype activations cross processes in: the compute dtype (bf16 under autocast)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def check_experts_divide(layers: list[tuple[str, SwitchFFN]], parts: int, over: str,
                          fix: str) -> None:
    """Every layer not yet expert-parallel, routing by token choice, its experts dividing
    into ``parts`` (`expert_block`). The exchange sends each token to the experts it
    chose; under expert choice the experts choose, which it does not implement."""
    for name, layer in layers:
        if is_expert_parallel(layer):
            raise MoEError(f"{name} is already expert-parallel")
        if layer.config.router == RouterKind.EXPERT_CHOICE:
            raise MoEError(f"{name} routes by expert choice, which expert parallelism does not "
                           "run (its exchange sends each token to the experts the token "
                           "chose): train expert-choice models in one process")
        expert_block(layer.config.num_experts, 0, parts, who=name, over=over, fix=fix)


def expert_parallel(model: nn.Module, group=None) -> nn.Module:
    """Shard every Switch layer's experts over ``group`` (default: the world), in place.

    Checks that every layer's expert count divides over the group, and that none routes
    by expert choice, before any collective runs. Returns ``model``. Replicated
    parameters are not synchronized here: start all ranks from the same weights (same
    seed or checkpoint) and average gradients with `average_gradients` (or DDP over the
    replicated parameters).
    """
    _, world = check(group)
    layers = switch_layers(model)
    if not layers:
        raise MoEError("the model has no Switch layers: convert it with moeify.convert first")
    check_experts_divide(layers, world, f"{world} processes", "a world size")
    spread_experts(model, group)
    return model


def _is_expert_param(model: nn.Module) -> dict[int, bool]:
    expert_ids = {id(p) for m in model.modules() if is_expert_parallel(m)
                  for p in m.experts.parameters()}
    return {id(p): id(p) in expert_ids for p in model.parameters()}


@torch.no_grad()
def average_gradients(model: nn.Module, group=None) -> None:
    """Average gradients over the group after ``backward()`` (the DDP convention).

    Replicated parameters: all-reduced and divided by W. Expert parameters: already the
    sum over every rank's tokens (the all-to-all backward delivers them), divided by W.
    """
    rank, world = check(group)
    if parallel_layout(model) is not None:
        raise MoEError("this model was made by moeify.distributed.parallelize, which "
                       "synchronizes gradients during backward: do not call average_gradients")
    is_expert = _is_expert_param(model)
    replicated = [p for p in model.parameters()
                  if p.grad is not None and not is_expert[id(p)]]
    if replicated:
        flat = torch.cat([p.grad.flatten().double() for p in replicated])
        collective("gradient all_reduce", "", rank, dist.all_reduce, flat, group=group)
        offset = 0
        for p in replicated:
            n = p.grad.numel()
            p.grad.copy_((flat[offset:offset + n] / world).view_as(p.grad))
            offset += n
    for p in model.parameters():
        if p.grad is not None and is_expert[id(p)]:
            p.grad.div_(world)


LAYOUT_ATTR = "_moeify_parallel_layout"


def parallel_layout(model: nn.Module) -> ParallelLayout | None:
    """The layout `parallelize` or `load` gave ``model`` (None for any other model)."""
    return model.__dict__.get(LAYOUT_ATTR)


def predicted_dispatch_bytes(tokens: int, d_model: int, dtype: torch.dtype, world: int,
                             kept_fraction: float = 1.0, top_k: int = 1) -> float:
    """Expected bytes one rank sends to other ranks per all-to-all under uniform routing:
    ``tokens * k * kept * (W - 1) / W * d * itemsize``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return tokens * top_k * kept_fraction * (world - 1) / world * d_model * itemsize
