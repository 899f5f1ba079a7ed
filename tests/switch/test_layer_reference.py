"""The vectorized layer against the per-token reference: outputs and gradients."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _devices import DEVICES
from _reference import naive_switch
import moeify
from moeify import MoEConfig, SwitchFFN
from moeify.switch import DispatchPath


@st.composite
def layer_cases(draw):
    num_experts = draw(st.integers(2, 6))
    top_k = draw(st.integers(1, min(2, num_experts)))
    groups = draw(st.integers(1, 3))
    tokens = draw(st.integers(1, 9))
    grouped = draw(st.booleans())  # explicit group_size over a [B, S, d] batch
    config = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        capacity_factor=draw(st.floats(0.2, 2.5)),
        eval_capacity_factor=draw(st.floats(0.2, 2.5)),
        min_capacity=draw(st.integers(1, 3)),
        group_size=tokens if grouped else None,
        gate=draw(st.sampled_from(["softmax", "normalized"])),
        jitter_eps=0.0,
        expert_dropout=0.0,
    )
    spec = dict(
        d_model=draw(st.integers(1, 6)),
        d_ff=draw(st.integers(1, 7)),
        activation=draw(st.sampled_from(["relu", "gelu", "gelu_tanh", "silu"])),
        gated=draw(st.booleans()),
        bias=draw(st.booleans()),
    )
    # Input shape: one sequence per group, or (grouped) the same tokens as [B, S].
    shape = (groups, tokens)
    if grouped and (groups * tokens) % 2 == 0 and draw(st.booleans()):
        shape = (2, groups * tokens // 2)
    return config, spec, shape, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


def build(config, spec, seq_len, seed):
    torch.manual_seed(seed)
    layer = SwitchFFN(
        spec["d_model"], spec["d_ff"], config, seq_len=seq_len,
        activation=spec["activation"], gated=spec["gated"], bias=spec["bias"],
        dtype=torch.float64,
    )
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()  # diverse routing and non-trivial biases
    return layer


@pytest.mark.parametrize("path", [DispatchPath.SORTED, DispatchPath.PADDED])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=layer_cases())
def test_layer_matches_per_token_reference(path, case):
    config, spec, shape, training, seed = case
    layer = build(config, spec, shape[1], seed)
    layer.dispatch_path = path
    layer.train(training)
    x = torch.randn(*shape, spec["d_model"], dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn_like(x)

    torch.manual_seed(seed)
    y = layer(x)
    (y * grad_out).sum().backward()
    got = [x.grad] + [p.grad for p in layer.parameters()]

    uniform = None
    if training and config.uses_random_routing:  # replay the layer's GShard random-routing draw
        torch.manual_seed(seed)
        uniform = torch.rand(x.numel() // spec["d_model"], dtype=torch.float64)
        uniform = uniform.view(-1, layer.tokens_per_group)
    x.grad = None
    layer.zero_grad(set_to_none=True)
    y_ref = naive_switch(layer, x, uniform)
    (y_ref * grad_out).sum().backward()
    want = [x.grad] + [p.grad for p in layer.parameters()]

    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    for g, w in zip(got, want):
        if w is None:  # e.g. router weights with the normalized top-1 gate
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_drops_happen_and_dropped_tokens_output_zero():
    config = MoEConfig(num_experts=2, capacity_factor=0.5, eval_capacity_factor=0.5,
                       min_capacity=1, jitter_eps=0.0, expert_dropout=0.0)
    layer = SwitchFFN(4, 8, config, seq_len=8, bias=True).eval()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0  # every token with x[0] > 0 wants expert 0
    x = torch.randn(1, 8, 4)
    x[..., 0] = 1.0  # all eight tokens want expert 0; capacity 2
    for path in DispatchPath:
        layer.dispatch_path = path
        y = layer(x)
        assert layer.expert_capacity == 2
        assert torch.count_nonzero(y[0, 2:]) == 0  # six dropped tokens: exactly 0
        assert torch.count_nonzero(y[0, :2]) > 0
        stats = layer.last_routing
        assert stats.tokens_per_expert.tolist() == [2, 0]
        assert stats.dropped_fraction.item() == pytest.approx(6 / 8)


def test_dispatch_paths_agree_on_a_large_random_layer():
    config = MoEConfig(num_experts=16, top_k=2, capacity_factor=0.5, eval_capacity_factor=0.5,
                       jitter_eps=0.0, expert_dropout=0.0)
    layer = SwitchFFN(32, 64, config, seq_len=256, activation="silu", gated=True, bias=True)
    with torch.no_grad():
        layer.router.weight.normal_()
    layer.eval()
    x = torch.randn(4, 256, 32)
    layer.dispatch_path = DispatchPath.SORTED
    y_sorted = layer(x)
    layer.dispatch_path = DispatchPath.PADDED
    y_padded = layer(x)
    assert 0 < layer.last_routing.dropped_fraction < 0.5  # the case drops whole tokens
    assert layer.last_routing.tokens_per_expert.sum() < 2 * 1024  # and second choices
    torch.testing.assert_close(y_sorted, y_padded, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", [p for p in DEVICES if p != "cpu"])
@pytest.mark.parametrize("path", list(DispatchPath))
@pytest.mark.parametrize("top_k", [1, 2])
def test_layer_on_a_gpu_equals_the_cpu(device, path, top_k):
    """The same float64 layer on a GPU and on the CPU: outputs, routing statistics, aux
    losses and every gradient equal, tokens dropping (eval for top-2: its training draw
    comes from each device's own generator)."""
    config = MoEConfig(num_experts=6, top_k=top_k, capacity_factor=0.75,
                       eval_capacity_factor=0.75, min_capacity=1, jitter_eps=0.0,
                       expert_dropout=0.0)
    spec = dict(d_model=24, d_ff=40, activation="silu", gated=True, bias=True)
    cpu = build(config, spec, 64, seed=3).train(top_k == 1)
    gpu = copy.deepcopy(cpu).to(device)
    cpu.dispatch_path = gpu.dispatch_path = path
    x = torch.randn(5, 64, 24, dtype=torch.float64)
    grad = torch.randn_like(x)
    results = []
    for layer, dev in ((cpu, "cpu"), (gpu, device)):
        xi = x.to(dev).detach().requires_grad_()
        y = layer(xi)
        ((y * grad.to(dev)).sum() + moeify.aux_loss(layer)).backward()
        results.append([y, xi.grad, layer.last_routing.tokens_per_expert,
                        *(p.grad for p in layer.parameters())])
    assert 0 < cpu.last_routing.dropped_fraction < 1
    for got, want in zip(results[1], results[0]):
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0
        else:
            torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-9)
