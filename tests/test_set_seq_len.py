"""moeify.set_seq_len: a model-level switch between declared and per-call capacity."""

from __future__ import annotations

import pytest
import torch

import moeify
from moeify import MoEConfig
from tests import models

SEQ = 12


def declared_gpt2(config: MoEConfig = MoEConfig(num_experts=4)):
    torch.manual_seed(0)
    model = models.gpt2(layers=2).eval()
    moeify.convert(model, config, seq_len=SEQ)
    return model


def test_a_declared_model_refuses_generate_until_switched_to_per_call_capacity():
    model = declared_gpt2()
    prompt = torch.randint(2, models.VOCAB, (1, 4))
    with pytest.raises(moeify.MoEError, match="built for sequences of 12 tokens"):
        model.generate(input_ids=prompt, max_new_tokens=2, do_sample=False)
    moeify.set_seq_len(model, None)
    assert all(layer.tokens_per_group is None and layer.expert_capacity is None
               for _, layer in moeify.switch_layers(model))
    assert moeify.plan_of(model).seq_len is None
    out = model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_declaring_another_length_updates_layers_plan_and_checkpoint(tmp_path):
    model = declared_gpt2()
    moeify.set_seq_len(model, 8)
    config = moeify.plan_of(model).config
    for _, layer in moeify.switch_layers(model):
        assert layer.tokens_per_group == 8
        assert layer.eval_capacity == config.capacity(8, training=False)
        assert layer.train_capacity == config.capacity(8, training=True)
    x = torch.randint(2, models.VOCAB, (2, 8))
    with torch.no_grad():
        expected = model(input_ids=x).logits
    with pytest.raises(moeify.MoEError, match="built for sequences of 8 tokens"):
        model(input_ids=torch.randint(2, models.VOCAB, (2, SEQ)))
    plan = moeify.plan_of(model)
    assert plan.seq_len == 8 and plan.capacity(training=False) == config.capacity(8, training=False)
    moeify.save(model, tmp_path / "ckpt")
    again = moeify.load(tmp_path / "ckpt")
    assert moeify.plan_of(again).seq_len == 8
    assert all(layer.tokens_per_group == 8 for _, layer in moeify.switch_layers(again))
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, expected)


def test_a_config_group_size_is_kept():
    model = declared_gpt2(MoEConfig(num_experts=4, group_size=6))
    moeify.set_seq_len(model, None)
    assert all(layer.tokens_per_group == 6 for _, layer in moeify.switch_layers(model))
    assert moeify.plan_of(model).tokens_per_group == 6


def test_refusals():
    with pytest.raises(moeify.MoEError, match="no Switch layers"):
        moeify.set_seq_len(models.gpt2(layers=2), None)
    model = declared_gpt2()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(moeify.MoEError, match="seq_len must be an int >= 1 or None"):
            moeify.set_seq_len(model, bad)
    assert moeify.plan_of(model).seq_len == SEQ  # nothing changed
    assert "set_seq_len" in moeify.__all__
