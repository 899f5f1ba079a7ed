"""Distributed checkpoints: `save` and `load` of ordinary moeify checkpoints from every
rank, each rank touching only its own experts' rows, and `load_optimizer` (resharded
with torch.distributed.checkpoint)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from moeify.compiler.plan import plan_of
from moeify.distributed.expert_parallel import expert_parallel, is_expert_parallel, parallel_layout
from moeify.distributed.mesh import (
    ParallelLayout,
    check_layers,
    check_mesh,
    distribute,
    make_layout,
    one_line,
    shard_experts,
)
from moeify.errors import MoEError
from moeify.io.checkpoint import (
    atomic_directory,
    checkpoint_meta,
    load_skeleton,
    read_meta,
)
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
from moeify.io.sources import CHECKPOINT_FILE, Source

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
    message = None if error is None else f"rank {layout.rank}: {one_line(error)}"
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
    plan = plan_of(model)
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
            target[0] = MoEError(one_line(error))
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
    _, ep = check_mesh(mesh)
    model = model_or_builder
    if model is not None and not isinstance(model, nn.Module):
        model = model()
    skeleton, weights = load_skeleton(path, model=model)
    check_layers(skeleton, ep)
    layout = make_layout(mesh, shard_dense, read_meta(path).source)
    shard_experts(skeleton, layout)
    load_local(skeleton, weights, path)
    distribute(skeleton, layout)
    return skeleton.eval()


def load_local(skeleton: nn.Module, weights: ShardReader, path) -> None:
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


def load_expert_parallel(path: str | Path, group=None, *, model: nn.Module | None = None
                         ) -> nn.Module:
    """Load a moeify checkpoint straight into the sharded form.

    The architecture is rebuilt on meta parameters, sharded, and then each rank reads
    the replicated weights and only the slices of the expert weights it keeps
    (safetensors slices: no rank ever holds another rank's experts).
    """
    skeleton, weights = load_skeleton(path, model=model)
    expert_parallel(skeleton, group)
    load_local(skeleton, weights, path)
    return skeleton.eval()
