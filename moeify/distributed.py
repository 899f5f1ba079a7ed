"""Expert parallelism over torch.distributed: the sharding plan, executed.

`expert_parallel(model, group)` gives every Switch layer of a converted model an
`AllToAllDispatcher`: each of the group's W ranks keeps the ``E / W`` experts
`moeify.switch.expert_block` gives it (contiguous blocks: rank r holds experts
``r*E/W .. (r+1)*E/W - 1``) and every other parameter stays replicated. A forward then
runs, on every rank:

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

Data x expert parallelism (`parallelize`, TorchTitan's layout on PyTorch's own engine)::

    mesh = init_device_mesh("cpu", (dp, ep), mesh_dim_names=("dp", "ep"))   # N = dp x ep

                 ep 0         ep 1            experts: DTensors [Replicate(), Shard(0)]
    dp 0   rank 0: E0-1   rank 1: E2-3   <- an ep group: tokens cross by all-to-all here
    dp 1   rank 2: E0-1   rank 3: E2-3   <- another, holding the same experts
            `-- a dp group: expert gradients all-reduced here

    dense parameters (attention, embeddings, norms, routers): FSDP2 over all N ranks
    (the mesh flattened), or replicated with ``shard_dense=False``

- the same `AllToAllDispatcher`, its exchange group the rank's ``ep`` row and its
  statistics group the whole job (aux losses and `routing_stats` stay global);
- expert gradients: each rank's all-to-all backward sums its ep group's contributions; a
  tensor hook on each expert weight all-reduces them over ``dp`` and divides by N;
- dense gradients: FSDP2's reduce-scatter (its mean over N ranks), or a hook that
  all-reduces each over all N ranks and divides by N when replicated; so every gradient
  is that of ``mean_r(loss_r)``: one process on the concatenated batch when every rank
  holds as many rows, with no call between ``backward()`` and ``optimizer.step()``;
- `save` / `load` write and read ordinary moeify checkpoints from every rank, each rank
  touching only its own experts' rows; `load_optimizer` reshards the optimizer state
  (`torch.distributed.checkpoint`) to any layout or to one process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from moeify.api import switch_layers
from moeify.checkpoint import (
    atomic_directory,
    checkpoint_meta,
    hf_source_of,
    load_skeleton,
    read_meta,
)
from moeify.config import RouterKind
from moeify.errors import MoEError
from moeify.conversion import conversion_of
from moeify.io.shards import (
    DEFAULT_SHARD_BYTES,
    PART_SEPARATOR,
    Entry,
    ShardPlan,
    ShardReader,
    group_entries,
    nbytes,
    part_entries,
    row_blocks,
    split_entries,
    stored_digest,
    stored_entries,
    write_files,
    write_index,
)
from moeify.sources import CHECKPOINT_FILE, Source
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

__all__ = [
    "ExchangeRecord",
    "AllToAllDispatcher",
    "ExpertParallelError",
    "ParallelLayout",
    "average_gradients",
    "expert_parallel",
    "is_expert_parallel",
    "load",
    "load_expert_parallel",
    "load_optimizer",
    "parallelize",
    "parallel_layout",
    "save",
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
        rank, world = _check(group)
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
        # local sums: the per-group loss summed over groups, z summed over tokens
        lb_sum = record.load_balancing_loss * groups
        z_sum = record.z_loss * tokens
        reached = routing.kept.any(dim=-1).sum()
        stats = torch.cat([
            torch.stack([lb_sum.detach().double(), z_sum.detach().double()]),
            torch.tensor([groups, tokens], dtype=torch.float64), reached.double().view(1),
            record.tokens_per_expert.to(torch.float64),
        ])
        _collective("statistics all_reduce", self.layer_name, self.rank, dist.all_reduce,
                    stats, group=self.stats_group)
        total_lb, total_z, total_groups, total_tokens, total_reached = stats[:5].tolist()
        W = self.stats_world_size

        def global_mean(local: Tensor, total: float, count: float) -> Tensor:
            # value: the group-wide mean; gradient: this rank's share, times W (averaged
            # over ranks later, as DDP does)
            return (W * local - (W - 1) * local.detach() + (total - local.detach())) / max(count, 1)

        return RoutingRecord(
            load_balancing_loss=global_mean(lb_sum, total_lb, total_groups),
            z_loss=global_mean(z_sum, total_z, total_tokens),
            tokens_per_expert=stats[5:].round().long(),
            dropped_fraction=torch.tensor(1.0 - total_reached / max(total_tokens, 1)),
            expert_capacity=record.expert_capacity,
            num_tokens=int(total_tokens),
        )

    def extra_repr(self) -> str:
        r = self.experts_range
        return f"experts {r.start}..{r.stop - 1} on rank {self.rank} of {self.world_size}"


def is_expert_parallel(module: nn.Module) -> bool:
    """Whether ``module`` is a Switch layer whose experts are spread over processes."""
    return isinstance(module, SwitchFFN) and isinstance(module.dispatcher, AllToAllDispatcher)


def _spread_experts(model: nn.Module, group, *, stats_group=None) -> None:
    """Every Switch layer of ``model`` -> the same layer (router, configuration, mode)
    holding only this rank's block of experts, with an `AllToAllDispatcher` over
    ``group``; parameters may be on the meta device."""
    for name, layer in switch_layers(model):
        dispatcher = AllToAllDispatcher(group, num_experts=layer.config.num_experts, name=name,
                                        stats_group=stats_group)
        sharded = SwitchFFN(layer.d_model, layer.d_ff, layer.config,
                            seq_len=layer.tokens_per_group, router=layer.router,
                            experts=_local_experts(layer.experts, dispatcher.experts_range),
                            dispatcher=dispatcher)
        sharded.train(layer.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, sharded)


def _exchange_dtype(x: Tensor) -> torch.dtype:
    """The dtype activations cross processes in: the compute dtype (bf16 under autocast)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _check_experts_divide(layers: list[tuple[str, SwitchFFN]], parts: int, over: str,
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
    _, world = _check(group)
    layers = switch_layers(model)
    if not layers:
        raise MoEError("the model has no Switch layers: convert it with moeify.convert first")
    _check_experts_divide(layers, world, f"{world} processes", "a world size")
    _spread_experts(model, group)
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
    rank, world = _check(group)
    if parallel_layout(model) is not None:
        raise MoEError("this model was made by moeify.distributed.parallelize, which "
                       "synchronizes gradients during backward: do not call average_gradients")
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
    _load_local(skeleton, weights, path)
    return skeleton.eval()


def predicted_dispatch_bytes(tokens: int, d_model: int, dtype: torch.dtype, world: int,
                             kept_fraction: float = 1.0, top_k: int = 1) -> float:
    """Expected bytes one rank sends to other ranks per all-to-all under uniform routing:
    ``tokens * k * kept * (W - 1) / W * d * itemsize``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return tokens * top_k * kept_fraction * (world - 1) / world * d_model * itemsize


# --- data x expert parallelism on a (dp, ep) device mesh ------------------------------------

DP, EP = "dp", "ep"
_LAYOUT_ATTR = "_moeify_parallel_layout"


@dataclass
class ParallelLayout:
    """How `parallelize` laid a model out; kept on the model (`parallel_layout`).

    mesh:        the user's ``(dp, ep)`` `DeviceMesh`.
    flat:        the same ranks as one dimension (``dp x ep``): FSDP2's mesh for the
                 dense parameters, the group of the routing statistics and of saving.
    dp, ep:      the mesh's sizes; ``dp_rank``, ``ep_rank``: this rank's coordinates.
    shard_dense: dense parameters sharded by FSDP2 (else replicated, hooks average them).
    expert_ids:  ``id`` of every expert parameter (DTensors on ``mesh``).
    source:      the architecture's `Source` (recorded before FSDP2 renames the class).
    """

    mesh: Any
    flat: Any
    dp: int
    ep: int
    dp_rank: int
    ep_rank: int
    shard_dense: bool
    expert_ids: set[int] = field(default_factory=set)
    source: Source | None = None

    @property
    def world(self) -> int:
        return self.dp * self.ep

    @property
    def rank(self) -> int:
        """This rank's index in ``flat``."""
        return self.flat.get_local_rank()

    @property
    def flat_group(self):
        return self.flat.get_group()

    def global_rank(self, flat_rank: int) -> int:
        return int(self.flat.mesh.flatten()[flat_rank])

    def writer_of_block(self, block: int) -> int:
        """The flat rank that writes expert block ``block`` (the replica at dp 0)."""
        return self.flat.mesh.flatten().tolist().index(int(self._coords_to_rank(0, block)))

    def _coords_to_rank(self, dp_index: int, ep_index: int) -> int:
        names = self.mesh.mesh_dim_names
        index = [0, 0]
        index[names.index(DP)], index[names.index(EP)] = dp_index, ep_index
        return int(self.mesh.mesh[tuple(index)])

    def placements(self) -> list:
        """The expert weights' placements on ``mesh``: replicated over dp, split over ep."""
        return [Replicate() if n == DP else Shard(0) for n in self.mesh.mesh_dim_names]


def parallel_layout(model: nn.Module) -> ParallelLayout | None:
    """The layout `parallelize` or `load` gave ``model`` (None for any other model)."""
    return model.__dict__.get(_LAYOUT_ATTR)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _check_mesh(mesh) -> tuple[int, int]:
    """(dp, ep) of a mesh with exactly the two named dimensions; no collective."""
    from torch.distributed.device_mesh import DeviceMesh

    if not dist.is_available() or not dist.is_initialized():
        raise MoEError("moeify.distributed needs torch.distributed: call "
                       "torch.distributed.init_process_group(...) first (gloo on CPU, nccl on "
                       "GPU) and build the mesh with init_device_mesh")
    names = getattr(mesh, "mesh_dim_names", None) if isinstance(mesh, DeviceMesh) else None
    if names is None or mesh.ndim != 2 or sorted(names) != sorted((DP, EP)):
        described = (f"a mesh with dimensions {names}" if isinstance(mesh, DeviceMesh)
                     else f"a {type(mesh).__name__}")
        raise MoEError(f"parallelize needs a two-dimensional DeviceMesh named ('dp', 'ep'), got "
                       f"{described}: init_device_mesh(device, (dp, ep), "
                       "mesh_dim_names=('dp', 'ep'))")
    return mesh.size(names.index(DP)), mesh.size(names.index(EP))


def _check_layers(model: nn.Module, ep: int) -> None:
    """Converted, not yet parallel, every layer's experts dividing over ``ep``; no
    collective (every rank sees the same model, so every rank raises the same line)."""
    if not isinstance(model, nn.Module):
        raise MoEError(f"expected a converted torch.nn.Module, got {type(model).__name__}")
    layers = switch_layers(model)
    if not layers:
        raise MoEError("the model has no Switch layers: convert it with moeify.convert first")
    if parallel_layout(model) is not None:
        raise MoEError("the model is already parallelized")
    _check_experts_divide(layers, ep, f"ep={ep}", "an ep size")


def _make_layout(mesh, shard_dense: bool, source: Source | None) -> ParallelLayout:
    dp, ep = _check_mesh(mesh)
    names = mesh.mesh_dim_names
    flat_name = "_".join(names)
    flat = mesh._flatten(flat_name)  # one group over all ranks, created once per mesh
    return ParallelLayout(mesh, flat, dp, ep, mesh.get_local_rank(DP), mesh.get_local_rank(EP),
                          shard_dense, source=source)


def _shard_experts(model: nn.Module, layout: ParallelLayout) -> None:
    """Every Switch layer's experts spread over this rank's ``ep`` group (statistics
    over the whole job); parameters may still be on the meta device."""
    _spread_experts(model, layout.mesh.get_group(EP), stats_group=layout.flat_group)


def _blocks(module: nn.Module) -> Iterator[nn.Module]:
    """The elements of the outermost ``nn.ModuleList`` s: a Transformer's blocks, FSDP2's
    units (one all-gather and one reduce-scatter each)."""
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            yield from child
        else:
            yield from _blocks(child)


def _gradient_hook(group, scale: float, what: str, rank: int) -> Callable[[Tensor], Tensor]:
    """A tensor hook: the gradient of this backward, scaled and summed over ``group``
    (None: scaled only). It runs before the gradient is accumulated into ``.grad``, so
    accumulating several backward passes stays correct."""

    def hook(grad: Tensor) -> Tensor:
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        out = local * scale
        if group is not None:
            _collective(what, "", rank, dist.all_reduce, out, group=group)
        if isinstance(grad, DTensor):
            return DTensor.from_local(out, grad.device_mesh, grad.placements, run_check=False,
                                      shape=grad.shape, stride=grad.stride())
        return out

    return hook


def _distribute(model: nn.Module, layout: ParallelLayout) -> None:
    """Experts -> DTensors on the mesh (replicated over dp, split over ep) with a hook
    averaging their gradient over dp; dense parameters -> FSDP2 over the flat mesh, or
    replicated with a hook averaging their gradient over every rank."""
    from torch.distributed.fsdp import fully_shard

    mesh, N = layout.mesh, layout.world
    placements = layout.placements()
    experts: set[nn.Parameter] = set()
    for _, layer in switch_layers(model):
        E = layer.config.num_experts
        for pname, param in list(layer.experts.named_parameters(recurse=False)):
            shape = (E, *param.shape[1:])
            stride = torch.empty(shape, device="meta").stride()
            local = DTensor.from_local(param.detach(), mesh, placements, run_check=False,
                                       shape=shape, stride=stride)
            wrapped = nn.Parameter(local, requires_grad=param.requires_grad)
            setattr(layer.experts, pname, wrapped)
            experts.add(wrapped)
    layout.expert_ids = {id(p) for p in experts}
    dp_group = layout.mesh.get_group(DP) if layout.dp > 1 else None
    for param in experts:
        if param.requires_grad:
            # summed over the ep group by the all-to-all backward; over dp here; / N
            param.register_hook(_gradient_hook(dp_group, 1.0 / N, "expert gradient all_reduce",
                                               layout.rank))
    dense = [p for p in model.parameters() if id(p) not in layout.expert_ids]
    if layout.shard_dense:
        for block in _blocks(model):
            if any(id(p) not in layout.expert_ids for p in block.parameters()):
                fully_shard(block, mesh=layout.flat, ignored_params=experts)
        fully_shard(model, mesh=layout.flat, ignored_params=experts)
    elif N > 1:
        for param in dense:
            if param.requires_grad:
                param.register_hook(_gradient_hook(layout.flat_group, 1.0 / N,
                                                   "gradient all_reduce", layout.rank))
    model.__dict__[_LAYOUT_ATTR] = layout


def parallelize(model: nn.Module, mesh, *, shard_dense: bool = True) -> nn.Module:
    """Data x expert parallelism on a ``(dp, ep)`` `DeviceMesh`, in place.

    ``mesh = init_device_mesh(device, (dp, ep), mesh_dim_names=("dp", "ep"))``. Every
    Switch layer's experts are split over ``ep`` in contiguous blocks (the sharding
    plan's: ep rank e holds experts ``e*E/ep .. (e+1)*E/ep - 1``) and replicated over
    ``dp``; tokens cross processes only within an ``ep`` group (ranks sharing a dp
    index). Expert weights become DTensors on ``mesh`` (``[Replicate(), Shard(0)]``).
    The other parameters are sharded with FSDP2 (``fully_shard``, one unit per block of
    the outermost ``nn.ModuleList`` s plus the root) over all ``dp x ep`` ranks, or, with
    ``shard_dense=False``, stay replicated.

    Gradients are synchronized during ``backward()`` (FSDP2's reduce-scatter for sharded
    dense parameters, tensor hooks for the rest), averaged over the ``N = dp x ep``
    ranks: with every rank's loss the mean over its own rows plus `moeify.aux_loss`
    (global over the job), each gradient equals that of one process on the concatenated
    batch when ranks hold equal row counts. The loop stays forward, backward, optimizer
    step. Do not call `average_gradients` on such a model.

    Checked before any collective, with the same one-line `MoEError` on every rank: the
    mesh (two dimensions named dp and ep), the model (converted, not yet parallel, no
    expert-choice layer), and every layer's expert count dividing by ``ep``. Start every
    rank from the same weights (same seed or checkpoint). Returns ``model`` (its class
    renamed by FSDP2 when ``shard_dense``).
    """
    _, ep = _check_mesh(mesh)
    _check_layers(model, ep)
    layout = _make_layout(mesh, shard_dense, hf_source_of(model))
    _shard_experts(model, layout)
    _distribute(model, layout)
    return model


# --- distributed checkpoints ----------------------------------------------------------------

OPTIMIZER_DIR = "optimizer"


@dataclass(frozen=True)
class _SaveLayout:
    """Which rank writes which shard files: computed identically on every rank from shapes
    alone, so no file list needs exchanging."""

    shards: ShardPlan
    writers: tuple[int, ...]  # flat rank writing each file of ``shards``
    whole_writer: dict[str, int]  # tensor -> flat rank that writes all of it (hashes it)


def _save_layout(dense: dict[str, Tensor], experts: dict[str, Tensor], layout: ParallelLayout,
                 limit: int) -> _SaveLayout:
    """Dense tensors in files of the writer of block 0; each expert weight as one row
    block per ep rank (``E / ep`` experts, cut further to fit ``limit``), in files of the
    rank writing that block."""
    dense_writer = layout.writer_of_block(0)
    writers: list[tuple[int, list[Entry]]] = [(dense_writer, split_entries(dense, limit))]
    whole_writer = dict.fromkeys(dense, dense_writer)
    ep = layout.ep
    blocks: dict[str, list[int]] = {}
    for name, spec in experts.items():
        E = spec.shape[0]
        blocks[name] = row_blocks(name, (E // ep, *spec.shape[1:]), spec.dtype, limit,
                                  widest=f"{name}{PART_SEPARATOR}{E}")
        if ep == 1:
            whole_writer[name] = layout.writer_of_block(0)
    for e in range(ep):
        entries = []
        for name, spec in experts.items():
            rows = blocks[name]
            if ep == 1 and len(rows) == 1:  # all of it, one entry
                entries.append(Entry(name, name, tuple(spec.shape), spec.dtype, nbytes(spec)))
            else:
                entries += part_entries(name, spec.shape, spec.dtype, rows, first=e * len(rows))
        writers.append((layout.writer_of_block(e), entries))
    groups = [(writer, group) for writer, entries in writers
              for group in group_entries(entries, limit)]
    return _SaveLayout(ShardPlan.of([group for _, group in groups]),
                       tuple(writer for writer, _ in groups), whole_writer)


def _next_tensor(tensors: Iterator[tuple[str, Tensor]]) -> Callable[[str], list[Tensor]]:
    """``write_files``' chunks from ``tensors``, pulled in the order the files first need
    them (the order of the collectives that gather them)."""
    def chunks(name: str) -> list[Tensor]:
        got, tensor = next(tensors)
        if got != name:
            raise MoEError(f"internal: expected {name}, got {got}")
        return [tensor]
    return chunks


def _all_ok(layout: ParallelLayout, error: BaseException | None, what: str) -> None:
    """Collective: raise on every rank (one line) when ``error`` happened on any."""
    errors: list[Any] = [None] * layout.world
    message = None if error is None else f"rank {layout.rank}: {_one_line(error)}"
    dist.all_gather_object(errors, message, group=layout.flat_group)
    failed = [m for m in errors if m is not None]
    if failed:
        raise MoEError(f"{what} failed on {failed[0]}" + (
            f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""))


def _model_tensors(model: nn.Module, layout: ParallelLayout
                   ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, str]]:
    """(dense tensors, expert parameters, aliases) of a parallelized model's state dict,
    tied duplicates (the same parameter under several names) as aliases."""
    dense: dict[str, Tensor] = {}
    experts: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            aliases[name] = seen[id(tensor)]
            continue
        seen[id(tensor)] = name
        (experts if id(tensor) in layout.expert_ids else dense)[name] = tensor
    return dense, experts, aliases


def _spec(tensor: Tensor) -> Tensor:
    return torch.empty(tuple(tensor.shape), dtype=tensor.dtype, device="meta")


def save(model: nn.Module, path: str | os.PathLike, *, optimizer=None, force: bool = False,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES, source: Source | None = None) -> Path:
    """Write a parallelized model as an ordinary moeify checkpoint, from every rank at once.

    Call on every rank of the mesh. Each expert weight is stored as row blocks
    (``NAME::partJ`` entries, listed under ``metadata.parts`` in the index, as
    `moeify.save` stores a tensor larger than a shard): the replica at dp index 0 of each
    ep rank writes its own experts' blocks into its own shard files, so no rank ever
    holds other ranks' experts; the dense tensors are gathered one at a time (FSDP2
    shards) and written once, by the rank at mesh coordinate (0, 0), which also writes
    ``model.safetensors.index.json`` and ``moeify.json`` (plan, source, aliases, sha256
    digests of every tensor; those of tensors split over ranks are hashed back from the
    files, spread over the ranks) once every shard is written. ``moeify.load`` reads the
    result in one process, `load` under any other (dp, ep) layout.

    ``optimizer``: its state goes to ``optimizer/`` inside the checkpoint through
    `torch.distributed.checkpoint` (sharded as the parameters are: every rank writes its
    own shards; replicated state once), for `load_optimizer`.

    The directory is assembled under a temporary name and renamed into place by rank 0
    when every rank succeeded (a shared file system for all ranks is assumed); a failure
    on any rank raises the same one-line `MoEError` on every rank and leaves no output.
    """
    layout = parallel_layout(model)
    if layout is None:
        raise MoEError("moeify.distributed.save writes a model made by parallelize or "
                       "moeify.distributed.load; use moeify.save for any other model")
    plan = conversion_of(model)
    if plan is None:
        raise MoEError("the model is not converted: run moeify.convert before saving")
    source = source or layout.source
    dense, experts, aliases = _model_tensors(model, layout)
    specs = {name: _spec(t) for name, t in {**dense, **experts}.items()}
    specs = {name: specs[name] for name in model.state_dict(keep_vars=True) if name in specs}
    save_layout = _save_layout({n: specs[n] for n in dense}, {n: specs[n] for n in experts},
                               layout, max_shard_bytes)
    rank, root = layout.rank, layout.global_rank(0)
    need = sum(nbytes(t) for t in specs.values())

    # rank 0 takes the destination (lock, free space, temporary directory)
    target: list[Any] = [None]
    context = atomic_directory(path, force=force, need=need) if rank == 0 else None
    if context is not None:
        try:
            target[0] = str(context.__enter__())
        except BaseException as error:  # noqa: BLE001 - sent to every rank below
            target[0] = MoEError(_one_line(error))
    dist.broadcast_object_list(target, src=root, group=layout.flat_group)
    if isinstance(target[0], BaseException):
        raise target[0]
    tmp = Path(target[0])
    closed = False
    try:
        # 1. every rank writes its files; dense tensors are gathered in the same order
        #    on all ranks (FSDP2 shards: full_tensor is a collective)
        def dense_tensors() -> Iterator[tuple[str, Tensor]]:
            for name, tensor in dense.items():
                with torch.no_grad():
                    full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
                yield name, full.detach()

        mine = [file for file, writer in zip(save_layout.shards.files, save_layout.writers)
                if writer == rank]
        written: dict[str, str] = {}
        error: BaseException | None = None
        stream = dense_tensors()
        try:
            local = {name: (t.to_local() if isinstance(t, DTensor) else t).detach()
                     for name, t in experts.items()}
            dense_files = [f for f in mine if f.entries[0].tensor in dense]
            expert_files = [f for f in mine if f.entries[0].tensor not in dense]
            written.update(write_files(tmp, dense_files, _next_tensor(stream)))
            written.update(write_files(tmp, expert_files, lambda name: [local[name]]))
        except BaseException as failure:  # noqa: BLE001 - every rank learns of it
            error = failure
        for _ in stream:  # the gathers the writer did not reach
            pass
        _all_ok(layout, error, "writing the checkpoint shards")
        digests = {n: d for n, d in written.items() if save_layout.whole_writer.get(n) == rank}
        # 2. digests of tensors split over ranks, hashed back from the files
        split = [n for n in specs if n not in save_layout.whole_writer]
        locations = stored_entries(save_layout.shards.index())
        error = None
        try:
            for i, name in enumerate(split):
                if i % layout.world == rank:
                    digests[name], _ = stored_digest(tmp, locations[name])
        except BaseException as failure:  # noqa: BLE001
            error = failure
        _all_ok(layout, error, "hashing the checkpoint shards")
        gathered: list[Any] = [None] * layout.world
        dist.all_gather_object(gathered, digests, group=layout.flat_group)
        # 3. the optimizer state (collective: every rank its own shards)
        if optimizer is not None:
            _save_optimizer(model, optimizer, tmp / OPTIMIZER_DIR, layout)
        # 4. rank 0: the index and moeify.json, then the rename
        error = None
        if rank == 0:
            try:
                all_digests: dict[str, str] = {}
                for d in gathered:
                    all_digests.update(d)
                ordered = {n: all_digests[n] for n in specs}
                write_index(tmp, save_layout.shards)
                meta = checkpoint_meta(plan, source, aliases, specs, ordered)
                (tmp / CHECKPOINT_FILE).write_text(json.dumps(meta, indent=1))
                closed = True
                context.__exit__(None, None, None)
            except BaseException as failure:  # noqa: BLE001
                error = failure
        _all_ok(layout, error, "committing the checkpoint")
    except BaseException as error:
        if context is not None and not closed:
            context.__exit__(type(error), error, error.__traceback__)
        raise
    return Path(path)


def _optimizer_state(model: nn.Module, optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


def _save_optimizer(model: nn.Module, optimizer, directory: Path,
                    layout: ParallelLayout) -> None:
    import torch.distributed.checkpoint as dcp

    state = _optimizer_state(model, optimizer)
    dcp.save({"optimizer": state}, checkpoint_id=str(directory),
             process_group=layout.flat_group)


def load_optimizer(path: str | os.PathLike, model: nn.Module, optimizer) -> None:
    """Load the optimizer state `save` stored with a checkpoint into ``optimizer`` (built
    over ``model``'s parameters), under any (dp, ep) layout or in one process (a model
    from ``moeify.load``): `torch.distributed.checkpoint` reshards it. Call on every rank.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    directory = Path(path) / OPTIMIZER_DIR
    if not (directory / ".metadata").exists():
        raise MoEError(f"checkpoint {path} holds no optimizer state (save it with "
                       "moeify.distributed.save(model, path, optimizer=...))")
    layout = parallel_layout(model)
    state = _optimizer_state(model, optimizer)
    wrapped = {"optimizer": state}
    if layout is not None:
        dcp.load(wrapped, checkpoint_id=str(directory), process_group=layout.flat_group)
    else:
        dcp.load(wrapped, checkpoint_id=str(directory),
                 no_dist=not (dist.is_available() and dist.is_initialized()))
    set_optimizer_state_dict(model, optimizer, wrapped["optimizer"])


def load(path: str | os.PathLike, model_or_builder: nn.Module | Callable[[], nn.Module] | None,
         mesh, *, shard_dense: bool = True) -> nn.Module:
    """Load a moeify checkpoint straight into the `parallelize` layout of ``mesh``.

    ``model_or_builder``: the dense model of the checkpoint's architecture, a callable
    returning one, or None to build it from the checkpoint's source (what ``model=`` is to
    `moeify.load`). The architecture is rebuilt on meta parameters, its experts split for
    ``mesh``, and each rank reads only its own experts' rows (safetensors slices of the
    stored row blocks) plus the dense tensors, which FSDP2 then shards. Any checkpoint
    loads, whatever layout (or single process) wrote it. Returns the model in eval mode;
    call ``.train()`` to resume training and `load_optimizer` for the optimizer state.
    """
    _, ep = _check_mesh(mesh)
    model = model_or_builder
    if model is not None and not isinstance(model, nn.Module):
        model = model()
    skeleton, weights = load_skeleton(path, model=model)
    _check_layers(skeleton, ep)
    layout = _make_layout(mesh, shard_dense, read_meta(path).source)
    _shard_experts(skeleton, layout)
    _load_local(skeleton, weights, path)
    _distribute(skeleton, layout)
    return skeleton.eval()


def _load_local(skeleton: nn.Module, weights: ShardReader, path) -> None:
    """Assign the replicated tensors and this rank's expert rows to a sharded skeleton."""
    state: dict[str, Any] = {}
    for name, module in skeleton.named_modules():
        if is_expert_parallel(module):
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
