"""Bias balancing on gloo: the loads are summed over the ranks, so every rank's replicated
routers take the step one process takes on the concatenated batch, with data parallelism
alone and with expert parallelism (whose aux losses, the sequence-wise one included, are
global too); distributed checkpoints keep the trained biases."""

from __future__ import annotations

import pytest
import torch

import moeify
import moeify.distributed
from moeify import MoEConfig
from moeify.distributed import expert_parallel, parallelize
from tests import models
from tests.distributed import harness, workers

STEPS = 3
CONFIG = MoEConfig(num_experts=4, top_k=2, scoring="sigmoid", bias_balancing=True,
                   bias_update_rate=0.01, seq_aux_loss_coef=0.01, jitter_eps=0.0,
                   random_routing=False, capacity_factor=1.0, min_capacity=1)


def balanced_llama():
    torch.manual_seed(0)
    model = models.llama(layers=2)
    moeify.convert(model, CONFIG, seq_len=workers.SEQ)
    return model.train()  # no dropout in the tiny Llama: every process computes alike


def run_steps(model, ids) -> dict:
    """``STEPS`` optimizer steps (lr 0: only the biases move) on ``ids``; the biases after
    each step and the aux loss of each forward."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    moeify.balance_experts(model, optimizer)
    biases, aux = [], []
    for _ in range(STEPS):
        model(input_ids=ids)
        aux.append(moeify.aux_loss(model).item())
        optimizer.step()
        biases.append([layer.router.expert_bias.tolist()
                       for _, layer in moeify.switch_layers(model)])
    return {"biases": biases, "aux": aux}


def balance(rank: int, world: int) -> dict:
    ids, slices = workers.global_batch(world)
    mine = ids[slices[rank]]
    data_parallel = run_steps(balanced_llama(), mine)
    sharded = expert_parallel(balanced_llama())
    return {"dp": data_parallel, "ep": run_steps(sharded, mine)}


def test_biases_follow_the_global_loads_on_every_rank(tmp_path):
    values = harness.all_ok(harness.run(balance, 2, tmp=tmp_path))
    ids, _ = workers.global_batch(2)
    reference = run_steps(balanced_llama(), ids)
    assert reference["biases"][-1] != reference["biases"][0]  # the biases moved
    for value in values:
        for kind in ("dp", "ep"):
            assert value[kind]["biases"] == reference["biases"], kind
        # expert parallelism: every loss global, as one process computes it
        assert value["ep"]["aux"] == pytest.approx(reference["aux"], rel=1e-5)


def parallel_checkpoint(rank: int, world: int, path: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "ep"))
    model = parallelize(balanced_llama(), mesh)
    ids, slices = workers.global_batch(world)
    trained = run_steps(model, ids[slices[rank]])["biases"][-1]
    moeify.distributed.save(model, path)
    loaded = moeify.distributed.load(path, None, mesh)
    return {"trained": trained, "loaded": [layer.router.expert_bias.tolist()
                                           for _, layer in moeify.switch_layers(loaded)]}


def test_a_parallel_models_trained_biases_are_saved_and_loaded(tmp_path):
    path = tmp_path / "ckpt"
    values = harness.all_ok(harness.run(parallel_checkpoint, 2, str(path), tmp=tmp_path))
    ids, _ = workers.global_batch(2)
    trained = run_steps(balanced_llama(), ids)["biases"][-1]
    in_one_process = [layer.router.expert_bias.tolist()
                      for _, layer in moeify.switch_layers(moeify.load(path))]
    assert in_one_process == trained
    assert all(v["trained"] == v["loaded"] == trained for v in values)
