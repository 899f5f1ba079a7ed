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

from moeify.distributed.checkpoint import (
    OPTIMIZER_DIR,
    load,
    load_expert_parallel,
    load_optimizer,
    save,
)
from moeify.distributed.expert_parallel import (
    AllToAllDispatcher,
    ExchangeRecord,
    ExpertParallelError,
    average_gradients,
    expert_parallel,
    is_expert_parallel,
    parallel_layout,
    predicted_dispatch_bytes,
)
from moeify.distributed.mesh import ParallelLayout, parallelize

__all__ = [
    "ExchangeRecord",
    "OPTIMIZER_DIR",
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
    "predicted_dispatch_bytes",
    "save",
]
