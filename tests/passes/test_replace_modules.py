"""ReplaceModules: module surgery, the rest of the model's code and class untouched."""

import pytest
import torch

import moeify
from moeify import MoEConfig, SwitchFFN
from moeify.passes import BuildSwitchLayers, Bypass, ReplaceModules
from moeify.pipeline import analysis_pipeline
from moeify.program import Program
from tests import models


def test_first_module_becomes_the_layer_the_rest_pass_through():
    model = models.bert()  # each FFN spans intermediate and output.dense
    program = Program(model, MoEConfig(num_experts=4))
    analysis_pipeline()(program)
    BuildSwitchLayers()(program)
    ReplaceModules()(program)
    for site in program.selected:
        assert len(site.replace) == 2
        assert model.get_submodule(site.replace[0]) is program.layers[site.path]
        assert isinstance(model.get_submodule(site.replace[1]), Bypass)
    assert type(model).__name__ == "BertModel"
    assert isinstance(model.encoder.layer[0].intermediate, torch.nn.Module)
    assert not isinstance(model.encoder.layer[0].intermediate, SwitchFFN)  # not selected


def test_activation_attributes_become_pass_throughs_and_the_fast_path_is_off():
    model = models.torch_encoder(norm_first=False)
    x = torch.randn(2, 12, 16)
    moeify.convert(model, MoEConfig(num_experts=4), example_inputs=(x,))
    layer = model.layers[1]
    assert layer.activation(torch.tensor([-1.0])).item() == -1.0  # pass-through
    assert layer.activation_relu_or_gelu is False


def test_requires_built_layers():
    program = Program(models.gpt2(), MoEConfig())
    analysis_pipeline()(program)
    with pytest.raises(moeify.MoEError, match="ReplaceModules: no Switch layer"):
        ReplaceModules()(program)
