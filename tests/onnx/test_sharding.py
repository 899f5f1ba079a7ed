"""Sharding annotations: written on expert-weight consumers, validated by moeify, run by ORT."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

import moeify
from moeify import MoEConfig
from moeify.onnx import OnnxRunner
from moeify.onnx.sharding import annotate_expert_sharding, check_sharding, sharding_problems
from tests import models

SEQ = 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = models.bert(layers=2).eval()
    moeify.convert(model, MoEConfig(num_experts=4), seq_len=SEQ)
    path = tmp_path_factory.mktemp("onnx") / "sharded.onnx"
    metadata = moeify.export_onnx(model, path, seq_len=SEQ, shard_experts=2)
    return model, path, metadata


def test_expert_weights_are_annotated_and_the_graph_still_runs(exported):
    model, path, metadata = exported
    proto = onnx.load(str(path))
    assert [(c.name, c.num_devices) for c in proto.configuration] == [("moeify-expert-parallel", 2)]
    annotated = [n for n in proto.graph.node if n.device_configurations]
    assert len(annotated) == int(metadata["sharded_nodes"]) > 0
    names = {s.tensor_name for n in annotated for c in n.device_configurations
             for s in c.sharding_spec}
    assert names and all(".experts." in name for name in names)
    spec = annotated[0].device_configurations[0].sharding_spec[0]
    assert spec.sharded_dim[0].axis == 0 and spec.sharded_dim[0].simple_sharding[0].num_shards == 2
    assert sharding_problems(proto) == []
    onnx.checker.check_model(proto, full_check=True)
    runner = OnnxRunner(path)
    ids = torch.randint(2, models.VOCAB, (2, SEQ))
    mask = torch.ones(2, SEQ, dtype=torch.long)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    assert np.abs(runner.run(input_ids=ids, attention_mask=mask) - expected).max() <= 1e-4


def _first_spec(proto):
    node = next(n for n in proto.graph.node if n.device_configurations)
    return node, node.device_configurations[0], node.device_configurations[0].sharding_spec[0]


@pytest.mark.parametrize("break_it, message", [
    (lambda node, config, spec: setattr(spec, "tensor_name", "no_such_tensor"),
     "is not one of its tensors"),
    (lambda node, config, spec: setattr(spec.sharded_dim[0], "axis", 7), "axis 7 out of range"),
    (lambda node, config, spec: setattr(spec.sharded_dim[0].simple_sharding[0], "num_shards", 3),
     "3 shards do not divide axis 0 (4)"),
    (lambda node, config, spec: setattr(config, "configuration_id", "missing"),
     "configuration 'missing' does not exist"),
    (lambda node, config, spec: spec.device.append(5), "devices [5] not in configuration"),
])
def test_broken_annotations_are_caught(exported, break_it, message):
    proto = onnx.load(str(exported[1]))
    broken = copy.deepcopy(proto)
    break_it(*_first_spec(broken))
    assert any(message in p for p in sharding_problems(broken)), sharding_problems(broken)
    with pytest.raises(moeify.MoEError, match="invalid sharding annotations"):
        check_sharding(broken)
    onnx.checker.check_model(broken)  # ONNX's own checker does not notice


def test_experts_that_do_not_divide_over_the_devices_are_refused(exported):
    proto = onnx.load(str(exported[1]))
    del proto.configuration[:]
    with pytest.raises(moeify.MoEError, match="4 experts, which do not divide over 3 devices"):
        annotate_expert_sharding(proto, 3, moeify.plan_of(exported[0]).sharding)
