"""Data x expert parallelism on a (dp, ep) mesh (gloo, 4 processes): equal to one process,
tokens exchanged within ep groups only, checkpoints resharded between layouts."""

from __future__ import annotations

import json

import pytest
import torch

import moeify
from moeify.distributed import load_optimizer
from moeify.io.shards import tensor_digest
from tests.distributed import harness, workers

WORLD = 4


@pytest.fixture(scope="module")
def mesh_job(tmp_path_factory):
    """One 4-process launch runs every check below (start-up dominates their cost)."""
    tmp = tmp_path_factory.mktemp("mesh")
    results = harness.run(workers.mesh_job, WORLD, str(tmp), tmp=tmp, deadline_s=420)
    return tmp, results


def values(mesh_job) -> list[dict]:
    return harness.all_ok(mesh_job[1])


def test_bad_input_is_one_line_on_every_rank_before_any_collective(mesh_job):
    for v in values(mesh_job):
        messages = v["bad_inputs"]["messages"]
        assert "two-dimensional DeviceMesh named ('dp', 'ep')" in messages["unnamed mesh"]
        assert "3 experts, which do not divide over ep=2" in messages["3 experts over ep=2"]
        assert "no Switch layers" in messages["not converted"]
        assert all("\n" not in m for m in messages.values())
        assert v["bad_inputs"]["seconds"] < 10  # rank 0 alone: a collective would hang


def test_three_adamw_steps_equal_one_process_in_every_layout(mesh_job):
    for rank, v in enumerate(values(mesh_job)):
        assert len(v["diff"]) == 6
        for layout, diff in v["diff"].items():
            assert diff <= 1e-5, (rank, layout, diff)


@pytest.mark.parametrize("layout, groups", [
    ("2x2", [(0, 1), (2, 3)]), ("1x4", [(0, 1, 2, 3)]), ("4x1", [(0,), (1,), (2,), (3,)]),
])
def test_all_to_all_bytes_stay_within_ep_groups(mesh_job, layout, groups):
    for shard_dense in (True, False):
        key = f"{layout} shard_dense={shard_dense}"
        calls = [(rank, call) for rank, v in enumerate(values(mesh_job))
                 for call in v["bytes"][key]]
        assert calls
        for rank, (ranks, _, _) in calls:  # every exchange is within the rank's ep group
            assert rank in ranks and ranks in groups, (rank, ranks)
        for group in groups:
            sent = sum(s for _, (ranks, s, _) in calls if ranks == group)
            received = sum(g for _, (ranks, _, g) in calls if ranks == group)
            assert sent == received  # what left a member arrived at a member
            assert (sent > 0) == (len(group) > 1), (group, sent)


def test_checkpoint_saved_under_2x2_resumes_under_1x4(mesh_job):
    for v in values(mesh_job):
        assert v["loaded_params"] <= 1e-5
        assert v["loaded_optimizer"] <= 1e-5
        assert v["loaded_outputs"] <= 1e-5
        assert v["resumed_step"] <= 1e-5


def test_checkpoint_saved_under_2x2_loads_in_one_process(mesh_job):
    tmp, _ = mesh_job
    values(mesh_job)
    path = tmp / "ckpt"
    model = moeify.load(path)
    reference, ref_optimizer = workers.reference_run(WORLD)
    expected = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert (param - expected[name]).abs().max() <= 1e-5, name
    ids = workers.batches(WORLD)[0]
    reference.eval()
    with torch.no_grad():
        assert (model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max() <= 1e-5
    optimizer = torch.optim.AdamW(model.parameters(), lr=workers.LR)
    load_optimizer(path, model, optimizer)
    ref_state = {name: ref_optimizer.state[p] for name, p in reference.named_parameters()}
    for name, param in model.named_parameters():
        for key, value in optimizer.state[param].items():
            torch.testing.assert_close(value, ref_state[name][key], rtol=0, atol=1e-5)
    # an ordinary moeify checkpoint: experts in row blocks, one per ep rank; digests of
    # every stored tensor, those of the blocks written by two ranks included
    meta = json.loads((path / "moeify.json").read_text())
    index = json.loads((path / "model.safetensors.index.json").read_text())
    parts = index["metadata"]["parts"]
    assert parts and all(len(p) == 2 and ".experts." in name for name, p in parts.items())
    state = model.state_dict()
    assert set(meta["digests"]) == set(state) - set(meta["aliases"])
    for name, digest in meta["digests"].items():
        assert digest == tensor_digest(state[name]), name


def test_a_rank_that_dies_fails_the_others_within_the_timeout(tmp_path):
    results = harness.run(workers.dies_on_mesh, WORLD, tmp=tmp_path, collective_timeout_s=10,
                          deadline_s=120)
    assert not results[-1]["ok"] and "fails before its forward" in results[-1]["message"]
    for r in results[:-1]:
        assert r["ok"], r
        assert r["value"]["seconds"] < 30, r["value"]
