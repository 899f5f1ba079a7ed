"""Sigmoid scores, a selection bias, a routed scaling and the raw gate in ONNX graphs: the
static form computes them as PyTorch does; the export says why ONNX Runtime's MoE
operator leaves sigmoid and biased layers to the static form (tests/onnx/test_moe_op.py
runs the operator with the raw gate and a routed scaling)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import moeify
from moeify import MoEConfig
from moeify.onnx import OnnxRunner
from moeify.onnx.moe_op import unsupported
from tests import models
from tests.onnx._cases import SEQ


def trained_bias(model) -> None:
    """Router weights that overflow the capacities and a nonzero selection bias."""
    generator = torch.Generator().manual_seed(3)
    for _, layer in moeify.switch_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=2.0, generator=generator)
        if layer.router.bias_balancing:
            layer.router.expert_bias.copy_(torch.randn(4, generator=generator))


def logits_of(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.numpy()


@pytest.mark.parametrize("top_k, gate", [(2, "softmax"), (3, "raw")])
def test_static_graph_with_sigmoid_bias_and_scaling_equals_pytorch(top_k, gate, tmp_path):
    torch.manual_seed(0)
    model = models.llama(layers=2).eval()
    config = MoEConfig(num_experts=4, top_k=top_k, gate=gate, scoring="sigmoid",
                       bias_balancing=True, routed_scaling=2.5, eval_capacity_factor=1.0,
                       min_capacity=1)
    moeify.convert(model, config, seq_len=SEQ)
    trained_bias(model)
    path = tmp_path / "m.onnx"
    metadata = moeify.export_onnx(model, path, seq_len=SEQ)
    ids = torch.randint(2, models.VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    expected = logits_of(model, ids)
    stats = moeify.routing_stats(model)
    assert any(sum(s.tokens_per_expert) < top_k * s.num_tokens for s in stats)  # drops
    assert np.abs(OnnxRunner(path).run(input_ids=ids) - expected).max() <= 1e-4
    # the bias is part of the function: without it the logits differ
    for _, layer in moeify.switch_layers(model):
        layer.router.expert_bias.zero_()
    assert np.abs(logits_of(model, ids) - expected).max() > 1e-3
    assert metadata["moe_op"] == "static"


@pytest.mark.parametrize("options, reason", [
    ({"scoring": "sigmoid"}, "sigmoid scoring: the operator's scores are the softmax"),
    ({"bias_balancing": True}, ("a selection bias (bias balancing): the operator selects "
                                "by the softmax of the router logits alone")),
])
def test_sigmoid_and_biased_layers_keep_the_static_form_and_say_why(options, reason, tmp_path):
    torch.manual_seed(0)
    model = models.llama(layers=2).eval()
    moeify.convert(model, MoEConfig(num_experts=4, dropless=True, **options), seq_len=SEQ)
    layer = moeify.switch_layers(model)[0][1]
    assert unsupported(layer).startswith(reason)
    with pytest.raises(moeify.MoEError, match="no expert layer can be written as "
                                              r"com.microsoft.MoE \(" + re.escape(reason)):
        moeify.export_onnx(model, tmp_path / "m.onnx", seq_len=SEQ, moe_op="ort")
    plain = models.llama(layers=2).eval()
    moeify.convert(plain, MoEConfig(num_experts=4, dropless=True, routed_scaling=2.0,
                                    gate="raw", top_k=3), seq_len=SEQ)
    assert unsupported(moeify.switch_layers(plain)[0][1]) is None
