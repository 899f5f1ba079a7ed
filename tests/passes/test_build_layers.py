"""BuildSwitchLayers: one Switch layer per selected site, from the site's dense FFN."""

import pytest
import torch

import moeify
from moeify import MoEConfig, SwitchFFN
from moeify.passes import BuildSwitchLayers
from moeify.compiler.pipeline import Pipeline, analysis_pipeline
from moeify.compiler.program import Program
from tests import models


def analysed(model, config):
    program = Program(model, config)
    analysis_pipeline()(program)
    return program


def test_builds_upcycled_layers_without_touching_the_model():
    model = models.llama().train()
    program = analysed(model, MoEConfig(num_experts=4))
    BuildSwitchLayers()(program)
    assert set(program.layers) == {s.path for s in program.selected} and len(program.layers) == 2
    assert not moeify.switch_layers(model)  # built, not inserted
    for site in program.selected:
        layer = program.layers[site.path]
        dense = site.dense_weights(model)
        assert isinstance(layer, SwitchFFN) and layer.training
        assert all(torch.equal(layer.experts.w_in[e], dense.w_in) for e in range(4))
        assert torch.equal(layer.experts.w_gate[3], dense.w_gate)


def test_lazy_builds_on_meta_and_keeps_the_dense_weights():
    model = models.gpt2()
    program = analysed(model, MoEConfig(num_experts=4))
    BuildSwitchLayers(lazy=True)(program)
    for site in program.selected:
        assert all(p.is_meta for p in program.layers[site.path].parameters())
        assert torch.equal(program.dense[site.path].w_out, site.dense_weights(model).w_out)


def test_partition_that_does_not_divide_names_the_site_and_its_width():
    model = models.t5()  # d_ff 40
    program = analysed(model, MoEConfig(num_experts=3, init="partition"))
    with pytest.raises(moeify.MoEError, match=r"BuildSwitchLayers: .* d_ff of "
                       r"encoder\.block\.1\.layer\.1\.DenseReluDense \(40\)"):
        Pipeline([BuildSwitchLayers()])(program)


def test_requires_selected_sites():
    with pytest.raises(moeify.MoEError, match="BuildSwitchLayers: no selected sites"):
        BuildSwitchLayers()(Program(models.gpt2(), MoEConfig()))
