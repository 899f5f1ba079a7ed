"""RegisterAuxLossHook: each forward's records replace the previous forward's."""

import copy

import pytest
import torch

import moeify
from moeify import MoEConfig
from moeify.passes import RegisterAuxLossHook
from moeify.compiler.program import Program
from tests import models


def test_a_forward_clears_records_of_layers_it_did_not_run():
    torch.manual_seed(0)
    model = models.t5().eval()
    moeify.convert(model, MoEConfig(num_experts=4))
    fresh = copy.deepcopy(model)  # has run nothing: no record to clear
    ids = torch.randint(2, models.VOCAB, (1, 6))
    with torch.no_grad():
        model(input_ids=ids, decoder_input_ids=ids)
        ran = {n for n, l in moeify.switch_layers(model) if l.last_routing is not None}
        assert {n.split(".")[0] for n in ran} == {"encoder", "decoder"}
        both = moeify.aux_loss(model)
        encoder_out = model.encoder(input_ids=ids)
        model(encoder_outputs=encoder_out, decoder_input_ids=ids)  # the encoder does not run
        ran = {n for n, l in moeify.switch_layers(model) if l.last_routing is not None}
        assert ran and all(n.startswith("decoder") for n in ran)
        # the same decoder-only forward of a model that never ran its encoder
        fresh(encoder_outputs=encoder_out, decoder_input_ids=ids)
    assert moeify.aux_loss(model) == moeify.aux_loss(fresh) != both


def test_requires_switch_layers_in_the_model():
    with pytest.raises(moeify.MoEError, match="RegisterAuxLossHook: the model has no Switch"):
        RegisterAuxLossHook()(Program(models.gpt2(), MoEConfig()))
