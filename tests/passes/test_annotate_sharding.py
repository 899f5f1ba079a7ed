import json

import pytest

import moeify
from moeify import MoEConfig
from moeify.compiler.plan import ShardingPlan
from tests import models


def test_plan_shards_expert_weights_and_replicates_the_rest():
    model = models.llama()
    moeify.convert(model, MoEConfig(num_experts=4))
    plan = moeify.plan_of(model).sharding
    names = [name for name, _ in model.named_parameters()]
    assert [p.name for p in plan.params] == names  # every parameter, once
    sharded = {p.name for p in plan.sharded()}
    assert sharded == {n for n in names if ".experts." in n}
    assert all(p.dim == 0 and p.mesh_axis == "expert" and p.shape[0] == 4 for p in plan.sharded())
    assert not any("router" in n for n in sharded)
    again = ShardingPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert list(plan.experts_of_rank(1, 2)) == [2, 3]
    with pytest.raises(moeify.MoEError, match="4 experts, which do not divide over 3 processes"):
        plan.experts_of_rank(0, 3)
