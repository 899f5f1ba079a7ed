"""ReplaceModules: module surgery, the rest of the model's code and class untouched."""

import pytest
import torch

import moeify
from moeify import MoEConfig, SwitchFFN
from moeify.passes import BuildSwitchLayers, Bypass, ReplaceModules
from moeify.compiler.pipeline import analysis_pipeline
from moeify.compiler.program import Program
from tests import models


def test_first_module_becomes_the_layer_the_rest_pass_through():
    torch.manual_seed(0)
    model = models.bert()  # each FFN spans intermediate and output.dense
    before = dict(model.named_modules())
    program = Program(model, MoEConfig(num_experts=4))
    analysis_pipeline()(program)
    BuildSwitchLayers()(program)
    ReplaceModules()(program)
    model.eval()
    assert type(model).__name__ == "BertModel"
    h = torch.randn(2, 12, 16)
    replaced = set()
    for site in program.selected:
        first, rest = site.replace  # encoder.layer.i.intermediate, encoder.layer.i.output.dense
        layer = program.layers[site.path]
        assert isinstance(layer, SwitchFFN) and model.get_submodule(first) is layer
        assert isinstance(model.get_submodule(rest), Bypass)
        replaced |= {first, rest}
        # BertLayer's FFN half (intermediate, then output: dense, dropout, LayerNorm of the
        # residual sum) now gives LayerNorm(switch(h) + h): output.dense passes the Switch
        # layer's output through untouched
        block = model.get_submodule(first.rpartition(".")[0])
        with torch.no_grad():
            got = block.output(block.intermediate(h), h)
            want = block.output.LayerNorm(layer(h) + h)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(replaced) == 2 * len(program.selected) == 4  # layers 1 and 3 of 4
    # every module outside the replaced ones is the very object it was (layers 0 and 2
    # keep their dense FFN modules)
    for name, module in before.items():
        if not any(name == path or name.startswith(f"{path}.") for path in replaced):
            assert model.get_submodule(name) is module, name


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
