"""RegisterAuxLossHook: each forward's records replace the previous forward's."""

import pytest
import torch

import moeify
from moeify import MoEConfig
from moeify.passes import RegisterAuxLossHook
from moeify.program import Program
from tests import models


def test_a_forward_clears_records_of_layers_it_did_not_run():
    model = models.t5()
    moeify.convert(model, MoEConfig(num_experts=4))
    ids = torch.randint(2, models.VOCAB, (1, 6))
    model(input_ids=ids, decoder_input_ids=ids)
    ran = {n for n, l in moeify.switch_layers(model) if l.last_routing is not None}
    assert any(n.startswith("encoder") for n in ran) and any(n.startswith("decoder") for n in ran)
    encoder_out = model.encoder(input_ids=ids)
    model(encoder_outputs=encoder_out, decoder_input_ids=ids)  # the encoder does not run
    ran = {n for n, l in moeify.switch_layers(model) if l.last_routing is not None}
    assert ran and all(n.startswith("decoder") for n in ran)
    decoder_only = torch.stack([l.config.aux_loss_coef * l.last_routing.load_balancing_loss
                                + l.config.z_loss_coef * l.last_routing.z_loss
                                for n, l in moeify.switch_layers(model) if n in ran]).mean()
    torch.testing.assert_close(moeify.aux_loss(model), decoder_only)


def test_requires_switch_layers_in_the_model():
    with pytest.raises(moeify.MoEError, match="RegisterAuxLossHook: the model has no Switch"):
        RegisterAuxLossHook()(Program(models.gpt2(), MoEConfig()))
