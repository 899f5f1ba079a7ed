import pytest
import torch

import moeify
from moeify import MoEConfig
from moeify.passes import select_sites
from moeify.compiler.plan import FFNSite
from moeify.config import Activation
from moeify.compiler.trace import Projection, ProjectionKind
from tests import models

P = Projection("p", ProjectionKind.LINEAR, 4, 8, False)


def stack(n, name="s"):
    return [FFNSite(f"{name}.{i}", (f"{name}.{i}",), P, P, Activation.RELU, stack=name, index=i)
            for i in range(n)]


def idx(sites):
    return [(s.stack, s.index) for s in sites]


def test_every_other_takes_odd_indices_of_each_stack():
    sites = stack(6, "enc") + stack(4, "dec")
    assert idx(select_sites(sites, 2, None)) == [("enc", 1), ("enc", 3), ("enc", 5),
                                                 ("dec", 1), ("dec", 3)]
    assert idx(select_sites(sites, 3, None)) == [("enc", 2), ("enc", 5), ("dec", 2)]
    assert len(select_sites(sites, 1, None)) == 10


def test_explicit_layers_and_a_layer_that_does_not_exist():
    sites = stack(6, "enc") + stack(4, "dec")
    assert idx(select_sites(sites, 2, (0, 4))) == [("enc", 0), ("enc", 4), ("dec", 0)]
    with pytest.raises(ValueError, match="names layer 6, 9, which no FFN stack has"):
        select_sites(sites, 2, (1, 6, 9))


def test_convert_errors_name_the_problem():
    with pytest.raises(moeify.MoEError, match="SelectSites: MoEConfig.layers names layer 7"):
        moeify.convert(models.gpt2(), MoEConfig(num_experts=4, layers=(7,)))
    model = models.gpt2()
    moeify.convert(model, MoEConfig(num_experts=4))
    with pytest.raises(moeify.MoEError, match="already converted"):
        moeify.convert(model, MoEConfig(num_experts=4))
    with pytest.raises(moeify.MoEError, match="no FFN found in the model(.|\n)*examined"):
        moeify.convert(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(moeify.MoEError, match="converts a torch.nn.Module"):
        moeify.convert("gpt2")
