"""Expert parallelism on gloo: equal to one process, bf16 on the wire, bounded failures."""

from __future__ import annotations

import pytest

import moeify
from tests.distributed import harness, workers


@pytest.mark.parametrize("world, top_k", [(2, 1), (4, 1), (2, 3)])
def test_forward_aux_losses_and_gradients_equal_one_process(world, top_k, tmp_path):
    values = harness.all_ok(harness.run(workers.equivalence, world, top_k, tmp=tmp_path))
    assert all(v["checked"] > 10 and v["dtype"] == "torch.float32" for v in values)
    sent = [tuple(rows) for v in values for rows in v["rows_sent"]]
    assert len(set(sent)) > 1  # ranks send uneven counts


def test_shared_experts_are_replicated_and_their_gradients_average(tmp_path):
    """Shared experts (gated) run on each rank's own tokens, whole on every rank: the
    outputs and every gradient, theirs included, equal one process's."""
    values = harness.all_ok(harness.run(workers.equivalence, 2, 1, 2, tmp=tmp_path))
    # per layer: ffn w_in, w_out, b_in, b_out (GPT-2 has biases) and the gate row
    assert all(len(v["shared"]) == 5 for v in values)


def test_exchanged_activations_are_bfloat16_in_a_bfloat16_model(tmp_path):
    harness.all_ok(harness.run(workers.bfloat16, 2, tmp=tmp_path))


def test_experts_that_do_not_divide_fail_before_any_collective(tmp_path):
    first, _ = harness.all_ok(harness.run(workers.indivisible, 2, tmp=tmp_path))
    assert "3 experts, which do not divide over 2 processes" in first["message"]
    assert first["seconds"] < 5


def test_a_rank_that_dies_fails_the_others_within_the_timeout(tmp_path):
    results = harness.run(workers.dies, 2, tmp=tmp_path, collective_timeout_s=10,
                          deadline_s=120)
    assert not results[1]["ok"] and "fails before its forward" in results[1]["message"]
    assert results[0]["ok"], results[0]
    assert "failed on rank 0" in results[0]["value"]["message"]
    assert results[0]["value"]["seconds"] < 30


def test_checkpoint_loads_straight_into_the_sharded_form(tmp_path):
    model = workers.tiny_gpt2()
    moeify.save(model, tmp_path / "ckpt")
    (expert_shapes,), _ = [v["expert_shapes"] for v in harness.all_ok(
        harness.run(workers.sharded_checkpoint, 2, str(tmp_path / "ckpt"), tmp=tmp_path))]
    assert expert_shapes[0] == 2  # 4 experts over 2 ranks


def test_without_a_process_group_the_error_says_how_to_start_one():
    with pytest.raises(moeify.MoEError, match="init_process_group"):
        from moeify.distributed import expert_parallel

        expert_parallel(workers.tiny_gpt2())
