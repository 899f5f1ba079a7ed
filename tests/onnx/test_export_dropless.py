"""A dropless model exports with a static capacity of the group's length, and says so."""

from __future__ import annotations

import numpy as np
import torch

import moeify
from moeify import MoEConfig
from moeify.onnx import OnnxRunner
from tests import models

SEQ = 12


def test_dropless_model_exports_with_capacity_the_group_length_and_its_cost(tmp_path):
    torch.manual_seed(0)
    model = models.gpt2(layers=2).eval()
    moeify.convert(model, MoEConfig(num_experts=4, dropless=True), seq_len=SEQ)
    for _, layer in moeify.switch_layers(model):  # confident routing: a capacity would drop
        torch.nn.init.normal_(layer.router.weight, std=2.0)
    path = tmp_path / "m.onnx"
    metadata = moeify.export_onnx(model, path, seq_len=SEQ)
    assert metadata["expert_capacity"] == str(SEQ)
    assert metadata["dropless"].startswith(f"capacity = the group's {SEQ} tokens")
    assert "4x the expert work" in metadata["dropless"]
    runner = OnnxRunner(path)
    assert runner.metadata["dropless"] == metadata["dropless"]
    ids = torch.randint(2, models.VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits.numpy()
    assert all(s.dropped_fraction == 0 for s in moeify.routing_stats(model))
    assert max(max(s.tokens_per_expert) for s in moeify.routing_stats(model)) > SEQ * 3 // 4
    assert np.abs(runner.run(input_ids=ids) - expected).max() <= 1e-4
