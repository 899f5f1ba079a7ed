"""What each rank runs in the expert-parallel tests (see harness.py)."""

from __future__ import annotations

import copy
import time

import torch

import moeify
from moeify import MoEConfig
from moeify.distributed import (
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


def tiny_gpt2(experts: int = 4):
    torch.manual_seed(0)
    model = models.gpt2(layers=2)
    config = MoEConfig(**{**CONFIG.to_dict(), "num_experts": experts})
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


def equivalence(rank: int, world: int) -> dict:
    model = tiny_gpt2()
    reference = copy.deepcopy(model)
    ids, slices = global_batch(world)
    # single process, whole batch: loss = mean over ranks of their task losses + aux
    logits = reference(input_ids=ids).logits
    aux_ref = moeify.aux_loss(reference)
    stats_ref = moeify.routing_stats(reference)
    loss = torch.stack([task_loss(logits[s]) for s in slices]).mean() + aux_ref
    loss.backward()

    expert_parallel(model)
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
    assert max(s.dropped_fraction for s in stats_ref) > 0  # capacity drops are exercised
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
    exchanges = [layer.last_exchange for _, layer in moeify.switch_layers(model)]
    return {"checked": checked, "rows_sent": [e.rows_sent for e in exchanges],
            "dtype": str(exchanges[0].dtype)}


def bfloat16(rank: int, world: int) -> dict:
    model = tiny_gpt2().to(torch.bfloat16)
    expert_parallel(model)
    ids, slices = global_batch(world)
    logits = model(input_ids=ids[slices[rank]]).logits
    (task_loss(logits) + moeify.aux_loss(model)).backward()
    layers = [layer for _, layer in moeify.switch_layers(model)]
    assert all(layer.last_exchange.dtype == torch.bfloat16 for layer in layers)
    assert all(layer.router.weight.dtype == torch.float32 for layer in layers)
    assert all(layer.experts.w_in.grad.dtype == torch.bfloat16 for layer in layers)
    assert torch.isfinite(logits.float()).all()
    # under autocast with float32 weights, activations still cross in bf16
    model32 = expert_parallel(tiny_gpt2())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model32(input_ids=ids[slices[rank]])
    assert all(layer.last_exchange.dtype == torch.bfloat16
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
    from moeify.checkpoint import CheckpointWeights

    whole = CheckpointWeights.get

    def no_whole_experts(self, name):
        assert ".experts." not in name, f"rank {rank} read all of {name}"
        return whole(self, name)

    CheckpointWeights.get = no_whole_experts
    model = load_expert_parallel(path)
    reference = moeify.load(path)
    ids, slices = global_batch(world)
    out = model(input_ids=ids[slices[rank]]).logits
    torch.testing.assert_close(out, reference(input_ids=ids).logits[slices[rank]],
                               rtol=1e-5, atol=1e-5)
    sizes = {tuple(layer.experts.w_in.shape) for _, layer in moeify.switch_layers(model)}
    return {"expert_shapes": sorted(sizes)}
