"""What each rank runs in the expert-parallel tests (see harness.py)."""

from __future__ import annotations

import copy
import time

import torch

import moeify
from moeify import MoEConfig, SwitchFFN
from moeify.distributed import (
    AllToAllDispatcher,
    ExpertParallelError,
    average_gradients,
    expert_parallel,
    load_expert_parallel,
)
from tests import models

SEQ = 12
# 4 experts, 3 slots per sequence of 12 tokens: tokens drop, counts per rank are uneven
CONFIG = MoEConfig(num_experts=4, capacity_factor=1.0, eval_capacity_factor=1.0,
                   min_capacity=1, noise=0.05, aux_loss_coef=0.01, z_loss_coef=0.001)


def tiny_gpt2(experts: int = 4, top_k: int = 1, shared: int = 0):
    torch.manual_seed(0)
    model = models.gpt2(layers=2)
    config = MoEConfig(**{**CONFIG.to_dict(), "num_experts": experts, "top_k": top_k,
                          "shared_experts": shared, "shared_gate": shared > 0})
    moeify.convert(model, config, seq_len=SEQ)
    return model.eval()  # no dropout: the reference and the ranks see the same function


def global_batch(world: int) -> tuple[torch.Tensor, list[slice]]:
    """Rank r gets r + 1 sequences (uneven batches); the reference sees them all."""
    sizes = [r + 1 for r in range(world)]
    generator = torch.Generator().manual_seed(world)
    ids = torch.randint(2, models.VOCAB, (sum(sizes), SEQ), generator=generator)
    starts = [sum(sizes[:r]) for r in range(world)]
    return ids, [slice(s, s + n) for s, n in zip(starts, sizes)]


def task_loss(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().square().mean()


def equivalence(rank: int, world: int, top_k: int = 1, shared: int = 0) -> dict:
    model = tiny_gpt2(top_k=top_k, shared=shared)
    reference = copy.deepcopy(model)
    ids, slices = global_batch(world)
    # single process, whole batch: loss = mean over ranks of their task losses + aux
    logits = reference(input_ids=ids).logits
    aux_ref = moeify.aux_loss(reference)
    stats_ref = moeify.routing_stats(reference)
    loss = torch.stack([task_loss(logits[s]) for s in slices]).mean() + aux_ref
    loss.backward()

    expert_parallel(model)
    # an ordinary SwitchFFN with the all-to-all dispatcher: the same parameter names
    assert all(type(layer) is SwitchFFN and isinstance(layer.dispatcher, AllToAllDispatcher)
               for _, layer in moeify.switch_layers(model))
    assert list(model.state_dict()) == list(reference.state_dict())
    mine = slices[rank]
    out = model(input_ids=ids[mine]).logits
    aux = moeify.aux_loss(model)
    (task_loss(out) + aux).backward()
    average_gradients(model)

    torch.testing.assert_close(out, logits[mine], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux, aux_ref, rtol=1e-5, atol=1e-7)
    stats = moeify.routing_stats(model)
    assert [s.tokens_per_expert for s in stats] == [s.tokens_per_expert for s in stats_ref]
    for s, r in zip(stats, stats_ref):
        assert abs(s.dropped_fraction - r.dropped_fraction) < 1e-6
        assert s.num_tokens == r.num_tokens
    # capacity drops are exercised: whole tokens at top-1, some of a token's choices at top-k
    assert max(s.dropped_fraction for s in stats_ref) > 0 or any(
        sum(s.tokens_per_expert) < top_k * s.num_tokens for s in stats_ref)
    ref_params = dict(reference.named_parameters())
    checked = 0
    for name, param in model.named_parameters():
        expected = ref_params[name].grad
        if ".experts." in name:
            layer = model.get_submodule(name.rsplit(".experts.", 1)[0])
            r = layer.local_experts
            assert param.shape[0] == len(r) == 4 // world
            expected = expected[r.start:r.stop]
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-6, msg=name)
        checked += 1
    exchanges = [layer.dispatcher.last_exchange for _, layer in moeify.switch_layers(model)]
    shared_names = [n for n, _ in model.named_parameters() if ".shared_experts." in n]
    return {"checked": checked, "rows_sent": [e.rows_sent for e in exchanges],
            "dtype": str(exchanges[0].dtype), "shared": shared_names}


def bfloat16(rank: int, world: int) -> dict:
    model = tiny_gpt2().to(torch.bfloat16)
    expert_parallel(model)
    ids, slices = global_batch(world)
    logits = model(input_ids=ids[slices[rank]]).logits
    (task_loss(logits) + moeify.aux_loss(model)).backward()
    layers = [layer for _, layer in moeify.switch_layers(model)]
    assert all(layer.dispatcher.last_exchange.dtype == torch.bfloat16 for layer in layers)
    assert all(layer.router.weight.dtype == torch.float32 for layer in layers)
    assert all(layer.experts.w_in.grad.dtype == torch.bfloat16 for layer in layers)
    assert torch.isfinite(logits.float()).all()
    # under autocast with float32 weights, activations still cross in bf16
    model32 = expert_parallel(tiny_gpt2())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model32(input_ids=ids[slices[rank]])
    assert all(layer.dispatcher.last_exchange.dtype == torch.bfloat16
               for _, layer in moeify.switch_layers(model32))
    return {"dtype": "bfloat16"}


def indivisible(rank: int, world: int) -> dict:
    """Only rank 0 tries: an error that needed a collective would hang until timeout."""
    if rank == 0:
        model = tiny_gpt2(experts=3)
        start = time.monotonic()
        try:
            expert_parallel(model)
        except moeify.MoEError as error:
            return {"message": str(error), "seconds": time.monotonic() - start}
        raise AssertionError("3 experts over 2 processes were accepted")
    return {}


def dies(rank: int, world: int) -> dict:
    model = expert_parallel(tiny_gpt2())
    if rank == world - 1:
        raise RuntimeError("this rank fails before its forward")
    ids, slices = global_batch(world)
    start = time.monotonic()
    try:
        model(input_ids=ids[slices[rank]])
    except ExpertParallelError as error:
        return {"message": str(error), "seconds": time.monotonic() - start}
    raise AssertionError("the forward finished although a peer died")


def sharded_checkpoint(rank: int, world: int, path: str) -> dict:
    from moeify.io.shards import ShardReader

    whole = ShardReader.get

    def no_whole_experts(self, name):
        assert ".experts." not in name, f"rank {rank} read all of {name}"
        return whole(self, name)

    ShardReader.get = no_whole_experts
    model = load_expert_parallel(path)
    reference = moeify.load(path)
    ids, slices = global_batch(world)
    out = model(input_ids=ids[slices[rank]]).logits
    torch.testing.assert_close(out, reference(input_ids=ids).logits[slices[rank]],
                               rtol=1e-5, atol=1e-5)
    sizes = {tuple(layer.experts.w_in.shape) for _, layer in moeify.switch_layers(model)}
    return {"expert_shapes": sorted(sizes)}


# --- parallelize on a (dp, ep) mesh ---------------------------------------------------------

STEPS, ROWS_PER_RANK, LR = 3, 2, 1e-3
LAYOUTS = [((2, 2), True), ((2, 2), False), ((1, 4), True), ((1, 4), False), ((4, 1), True),
           ((4, 1), False)]


def dense_gpt2():
    """No dropout anywhere and no router jitter: training is deterministic, so one process
    and the mesh can be compared step by step."""
    torch.manual_seed(0)
    return models.gpt2(layers=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def train_gpt2(experts: int = 4):
    model = dense_gpt2()
    config = MoEConfig(**{**CONFIG.to_dict(), "num_experts": experts, "jitter_eps": 0.0})
    moeify.convert(model, config, seq_len=SEQ)
    return model.train()


def batches(world: int) -> list[torch.Tensor]:
    """One global batch per step, ``ROWS_PER_RANK`` sequences for each rank."""
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(2, models.VOCAB, (ROWS_PER_RANK * world, SEQ), generator=generator)
            for _ in range(STEPS)]


def rows_of(rank: int) -> slice:
    return slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)


def step(model, optimizer, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids).loss + moeify.aux_loss(model)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def reference_run(world: int):
    """One process, the concatenated batch: the model and optimizer after ``STEPS``."""
    model = train_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    dropped = []
    for ids in batches(world):
        step(model, optimizer, ids)
        dropped.append(max(s.dropped_fraction for s in moeify.routing_stats(model)))
    assert min(dropped) > 0, dropped  # capacity drops happen in every step
    return model, optimizer


def _full(tensor: torch.Tensor, param, layout) -> torch.Tensor:
    """The whole tensor on every rank (collective for FSDP shards) or this rank's
    expert block; returned with the slice of the reference it matches."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        if id(param) in layout.expert_ids:
            return tensor.to_local()
        return tensor.full_tensor()
    return tensor


def _expert_block(model, name: str):
    layer = model.get_submodule(name.rsplit(".experts.", 1)[0])
    return slice(layer.local_experts.start, layer.local_experts.stop)


def compare_parameters(model, reference) -> float:
    """Max |parameter - reference| over every parameter (experts: this rank's block)."""
    from moeify.distributed import parallel_layout

    layout = parallel_layout(model)
    expected = dict(reference.named_parameters())
    worst = 0.0
    for name, param in model.named_parameters():
        mine = _full(param.detach(), param, layout)
        ref = expected[name].detach()
        if id(param) in layout.expert_ids:
            ref = ref[_expert_block(model, name)]
        assert mine.shape == ref.shape, name
        worst = max(worst, (mine - ref).abs().max().item())
    return worst


def compare_optimizer(model, optimizer, reference, ref_optimizer) -> float:
    from moeify.distributed import parallel_layout

    layout = parallel_layout(model)
    expected = {name: ref_optimizer.state[p] for name, p in reference.named_parameters()}
    worst = 0.0
    for name, param in model.named_parameters():
        state, ref_state = optimizer.state[param], expected[name]
        assert set(state) == set(ref_state), name
        for key, value in state.items():
            mine = _full(value, param, layout).detach()
            ref = ref_state[key]
            if id(param) in layout.expert_ids and ref.dim():
                ref = ref[_expert_block(model, name)]
            worst = max(worst, (mine.double() - ref.double()).abs().max().item())
    return worst


class AllToAllBytes:
    """Counts what every ``all_to_all_single`` of this process sends and receives, by the
    global ranks of its group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.calls: list[tuple[tuple[int, ...], int, int]] = []
        self.original = dist.all_to_all_single

        def counting(output, input, output_split_sizes=None, input_split_sizes=None,
                     group=None, async_op=False):
            ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
            me = ranks.index(dist.get_rank())
            row = input[0].numel() * input.element_size() if input.numel() else 0
            sent = sum(n for r, n in enumerate(input_split_sizes or [input.shape[0] // len(ranks)]
                                                * len(ranks)) if r != me) * row
            got = sum(n for r, n in enumerate(output_split_sizes or
                                               [output.shape[0] // len(ranks)] * len(ranks))
                      if r != me) * row
            self.calls.append((ranks, sent, got))
            return self.original(output, input, output_split_sizes, input_split_sizes,
                                 group=group, async_op=async_op)

        dist.all_to_all_single = counting

    def stop(self) -> None:
        import torch.distributed as dist

        dist.all_to_all_single = self.original


def bad_inputs(rank: int, world: int) -> dict:
    """The three bad inputs, each one line before any collective: rank 0 tries them alone
    first (a collective would hang it until the timeout), then every rank."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from moeify.distributed import parallelize

    unnamed = init_device_mesh("cpu", (2, 2))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    cases = [("unnamed mesh", lambda: parallelize(train_gpt2(), unnamed)),
             ("3 experts over ep=2", lambda: parallelize(train_gpt2(experts=3), mesh)),
             ("not converted", lambda: parallelize(dense_gpt2(), mesh))]
    messages, seconds = {}, 0.0
    for passes in (["alone"] if rank == 0 else []) + ["all"]:
        if passes == "all":
            dist.barrier()
        for what, call in cases:
            start = time.monotonic()
            try:
                call()
            except moeify.MoEError as error:
                messages[what] = str(error)
            else:
                raise AssertionError(f"{what} was accepted")
            seconds = max(seconds, time.monotonic() - start)
    return {"messages": messages, "seconds": seconds}


def mesh_training(rank: int, world: int, out: str) -> dict:
    """Every layout x shard_dense: 3 AdamW steps equal one process on the concatenated
    batch; the all-to-all bytes by group; then the (2, 2) model and optimizer saved and
    loaded under (1, 4), reading only this rank's experts."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from moeify.distributed import load, load_optimizer, parallelize, save
    from moeify.io.shards import ShardReader

    reference, ref_optimizer = reference_run(world)
    data = batches(world)
    meshes = {shape: init_device_mesh("cpu", shape, mesh_dim_names=("dp", "ep"))
              for shape in {s for s, _ in LAYOUTS}}
    results: dict = {"diff": {}, "bytes": {}}
    saved = None
    for shape, shard_dense in LAYOUTS:
        model = parallelize(train_gpt2(), meshes[shape], shard_dense=shard_dense)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        counter = AllToAllBytes()
        try:
            for ids in data:
                step(model, optimizer, ids[rows_of(rank)])
        finally:
            counter.stop()
        key = f"{shape[0]}x{shape[1]} shard_dense={shard_dense}"
        results["diff"][key] = compare_parameters(model, reference)
        results["bytes"][key] = counter.calls
        if shape == (2, 2) and shard_dense:
            saved = f"{out}/ckpt"
            save(model, saved, optimizer=optimizer)
    # resume under (1, 4): only this rank's expert rows are read
    whole, part = ShardReader.get, ShardReader.get_slice
    reads = []

    def no_whole_experts(self, name):
        assert ".experts." not in name, f"rank {rank} read all of {name}"
        return whole(self, name)

    def own_rows_only(self, name, start, stop):
        reads.append((name, start, stop))
        return part(self, name, start, stop)

    ShardReader.get, ShardReader.get_slice = no_whole_experts, own_rows_only
    try:
        model = load(saved, dense_gpt2, meshes[(1, 4)])
    finally:
        ShardReader.get, ShardReader.get_slice = whole, part
    assert reads and all((a, b) == (rank, rank + 1) for _, a, b in reads), reads
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    load_optimizer(saved, model, optimizer)
    results["loaded_params"] = compare_parameters(model, reference)
    results["loaded_optimizer"] = compare_optimizer(model, optimizer, reference, ref_optimizer)
    ids = data[0][rows_of(rank)]
    reference.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
        expected = reference(input_ids=ids).logits
    results["loaded_outputs"] = (out - expected).abs().max().item()
    # a step after resuming still equals one process (every rank: its rows of batch 0)
    model.train()
    reference.train()
    step(model, optimizer, ids)
    step(reference, ref_optimizer, data[0])
    results["resumed_step"] = compare_parameters(model, reference)
    dist.barrier()
    return results


def mesh_job(rank: int, world: int, out: str) -> dict:
    """One launch for the parallelize tests (process start-up is most of their cost)."""
    return {"bad_inputs": bad_inputs(rank, world), **mesh_training(rank, world, out)}


def dies_on_mesh(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from moeify.distributed import parallelize

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    model = parallelize(train_gpt2(), mesh)
    if rank == world - 1:
        raise RuntimeError("this rank fails before its forward")
    start = time.monotonic()
    try:
        model(input_ids=batches(world)[0][rows_of(rank)])
    except Exception as error:  # noqa: BLE001 - FSDP2's all-gather or the token exchange
        return {"message": str(error).splitlines()[0], "type": type(error).__name__,
                "seconds": time.monotonic() - start}
    raise AssertionError("the forward finished although a peer died")
