"""Drop-Upcycling (Nakamura et al., ICLR 2025): ``init="drop"`` re-initializes a random
fraction of each copied expert's hidden neurons."""

import math

import pytest
import torch

from moeify import DenseFFNWeights, MoEConfig
from moeify.config import ConfigError
from moeify.switch.upcycle import upcycled_tensors

D, F_, E = 24, 200, 4


def dense_ffn(gated: bool, bias: bool) -> DenseFFNWeights:
    g = torch.Generator().manual_seed(0)
    make = lambda *shape, mean=0.0, std=0.05: torch.randn(*shape, generator=g) * std + mean  # noqa: E731
    return DenseFFNWeights(
        w_in=make(D, F_, mean=0.01), w_out=make(F_, D, std=0.08),
        w_gate=make(D, F_, mean=-0.02, std=0.03) if gated else None,
        b_in=make(F_, mean=0.1, std=0.02) if bias else None,
        b_out=make(D) if bias else None,
        b_gate=make(F_, std=0.04) if gated and bias else None,
    )


def experts_of(dense, ratio, seed=0):
    config = MoEConfig(num_experts=E, init="drop", drop_ratio=ratio, seed=seed)
    return {name.removeprefix("experts."): source.tensor
            for name, source in upcycled_tensors(dense, config, path="h.1.mlp").items()
            if name.startswith("experts.")}


def changed_neurons(experts, dense):
    """Per expert, the hidden neurons whose input weights differ from the dense FFN's."""
    return [set(torch.nonzero((experts["w_in"][e] != dense.w_in).any(0)).flatten().tolist())
            for e in range(E)]


@pytest.mark.parametrize(("gated", "bias"), [(False, False), (False, True), (True, False),
                                             (True, True)])
@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1])
def test_each_expert_reinitializes_its_own_fraction_and_keeps_the_rest_bitwise(gated, bias, ratio):
    dense = dense_ffn(gated, bias)
    experts = experts_of(dense, ratio)
    count = math.floor(ratio * F_ + 0.5)
    dropped = changed_neurons(experts, dense)
    assert [len(s) for s in dropped] == [count] * E  # the fraction, to the neuron
    assert len({frozenset(s) for s in dropped}) == E  # a different subset per expert
    for e, neurons in enumerate(dropped):
        kept = sorted(set(range(F_)) - neurons)
        gone = sorted(neurons)
        # kept neurons: every tensor along the hidden axis equals the dense one bitwise
        assert torch.equal(experts["w_in"][e][:, kept], dense.w_in[:, kept])
        assert torch.equal(experts["w_out"][e][kept], dense.w_out[kept])
        # dropped neurons: fresh in every projection, on the same neurons
        assert (experts["w_out"][e][gone] != dense.w_out[gone]).all(1).all()
        if gated:
            assert torch.equal(experts["w_gate"][e][:, kept], dense.w_gate[:, kept])
            assert (experts["w_gate"][e][:, gone] != dense.w_gate[:, gone]).all()
        if bias:
            assert torch.equal(experts["b_in"][e][kept], dense.b_in[kept])
            assert (experts["b_in"][e][gone] != dense.b_in[gone]).all()
            assert torch.equal(experts["b_out"][e], dense.b_out)  # per output: a copy
            if gated:
                assert torch.equal(experts["b_gate"][e][kept], dense.b_gate[kept])


def test_reinitialized_weights_follow_the_source_statistics():
    dense = dense_ffn(gated=True, bias=True)
    experts = experts_of(dense, 0.5)
    dropped = changed_neurons(experts, dense)
    fresh = {name: [] for name in ("w_in", "w_gate", "w_out", "b_in")}
    for e, neurons in enumerate(dropped):
        gone = sorted(neurons)
        fresh["w_in"].append(experts["w_in"][e][:, gone].flatten())
        fresh["w_gate"].append(experts["w_gate"][e][:, gone].flatten())
        fresh["w_out"].append(experts["w_out"][e][gone].flatten())
        fresh["b_in"].append(experts["b_in"][e][gone])
    for name, values in fresh.items():
        values = torch.cat(values)
        source = getattr(dense, name)
        # N(mean, std) of the whole source tensor: sample statistics within 5 standard errors
        n = values.numel()
        assert abs(values.mean() - source.mean()) < 5 * source.std() / math.sqrt(n), name
        assert abs(values.std() / source.std() - 1) < 5 / math.sqrt(2 * n), name


def test_the_seed_fixes_the_subsets_and_ratio_zero_is_plain_copying():
    dense = dense_ffn(gated=False, bias=False)
    a, b = experts_of(dense, 0.5, seed=1), experts_of(dense, 0.5, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert changed_neurons(experts_of(dense, 0.5, seed=2), dense) != changed_neurons(a, dense)
    none = experts_of(dense, 0.0)
    assert all(torch.equal(none["w_in"][e], dense.w_in) for e in range(E))
    everything = experts_of(dense, 1.0)
    assert [len(s) for s in changed_neurons(everything, dense)] == [F_] * E


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_a_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(ConfigError, match="drop_ratio"):
        MoEConfig(num_experts=4, init="drop", drop_ratio=ratio)
