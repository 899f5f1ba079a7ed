"""FixCapacity: the declared length fixes every layer's capacity as a Python int."""

import pytest
import torch

import moeify
from moeify import MoEConfig
from moeify.passes import FixCapacity
from moeify.compiler.program import Program
from tests import models


@pytest.mark.parametrize(("seq_len", "group_size", "tokens", "train", "eval_"), [
    (32, None, 32, 10, 16),  # ceil(1.25 * 32 / 4) = 10; ceil(2.0 * 32 / 4) = 16
    (None, 16, 16, 5, 8),  # a group size declares the length on its own
    (None, None, None, None, None),  # undeclared: capacity per call in eager mode
])
def test_declares_the_length_on_every_layer(seq_len, group_size, tokens, train, eval_):
    model = models.gpt2()
    config = MoEConfig(num_experts=4, min_capacity=1, group_size=group_size)
    moeify.convert(model, config, seq_len=seq_len)
    for _, layer in moeify.switch_layers(model):
        assert layer.tokens_per_group == tokens
        assert (layer.train_capacity, layer.eval_capacity) == (train, eval_)
    if seq_len is not None:
        with pytest.raises(moeify.MoEError, match="built for sequences of 32 tokens"):
            model(torch.randint(2, models.VOCAB, (1, 8)))


def test_requires_layers():
    with pytest.raises(moeify.MoEError, match="FixCapacity: no Switch layers"):
        FixCapacity()(Program(models.gpt2(), MoEConfig()))
