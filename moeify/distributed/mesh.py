"""Data x expert parallelism on a (dp, ep) device mesh: `parallelize` and the
`ParallelLayout` it records on the model (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from moeify.distributed.expert_parallel import (
    LAYOUT_ATTR,
    check_experts_divide,
    collective,
    parallel_layout,
    spread_experts,
)
from moeify.errors import MoEError
from moeify.io.checkpoint import (
    hf_source_of,
)
from moeify.io.sources import Source
from moeify.switch import switch_layers

DP, EP = "dp", "ep"


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


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def check_mesh(mesh) -> tuple[int, int]:
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


def check_layers(model: nn.Module, ep: int) -> None:
    """Converted, not yet parallel, every layer's experts dividing over ``ep``; no
    collective (every rank sees the same model, so every rank raises the same line)."""
    if not isinstance(model, nn.Module):
        raise MoEError(f"expected a converted torch.nn.Module, got {type(model).__name__}")
    layers = switch_layers(model)
    if not layers:
        raise MoEError("the model has no Switch layers: convert it with moeify.convert first")
    if parallel_layout(model) is not None:
        raise MoEError("the model is already parallelized")
    check_experts_divide(layers, ep, f"ep={ep}", "an ep size")


def make_layout(mesh, shard_dense: bool, source: Source | None) -> ParallelLayout:
    dp, ep = check_mesh(mesh)
    names = mesh.mesh_dim_names
    flat_name = "_".join(names)
    flat = mesh._flatten(flat_name)  # one group over all ranks, created once per mesh
    return ParallelLayout(mesh, flat, dp, ep, mesh.get_local_rank(DP), mesh.get_local_rank(EP),
                          shard_dense, source=source)


def shard_experts(model: nn.Module, layout: ParallelLayout) -> None:
    """Every Switch layer's experts spread over this rank's ``ep`` group (statistics
    over the whole job); parameters may still be on the meta device."""
    spread_experts(model, layout.mesh.get_group(EP), stats_group=layout.flat_group)


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
            collective(what, "", rank, dist.all_reduce, out, group=group)
        if isinstance(grad, DTensor):
            return DTensor.from_local(out, grad.device_mesh, grad.placements, run_check=False,
                                      shape=grad.shape, stride=grad.stride())
        return out

    return hook


def distribute(model: nn.Module, layout: ParallelLayout) -> None:
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
    model.__dict__[LAYOUT_ATTR] = layout


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
    _, ep = check_mesh(mesh)
    check_layers(model, ep)
    layout = make_layout(mesh, shard_dense, hf_source_of(model))
    shard_experts(model, layout)
    distribute(model, layout)
    return model
