"""SwitchFFN behaviour: upcycling identity, precision, jitter, gradients, statistics."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moeify
from moeify import DenseFFNWeights, MoEConfig, SwitchFFN
from moeify.switch import DispatchPath

from _devices import DEVICES
from _op_recorder import record_ops

NO_NOISE = dict(jitter_eps=0.0, expert_dropout=0.0)


class DenseFFN(nn.Module):
    def __init__(self, d, f, *, gated=False, bias=True, act=F.gelu):
        super().__init__()
        self.up = nn.Linear(d, f, bias=bias)
        self.gate = nn.Linear(d, f, bias=bias) if gated else None
        self.down = nn.Linear(f, d, bias=bias)
        self.act = act

    def forward(self, x):
        h = self.act(self.up(x)) if self.gate is None else self.act(self.gate(x)) * self.up(x)
        return self.down(h)

    def weights(self):
        return DenseFFNWeights.from_linears(self.up, self.down, self.gate)


@pytest.mark.parametrize(
    ("gated", "act", "name"),
    [(False, F.relu, "relu"), (False, F.gelu, "gelu"), (True, F.silu, "silu"),
     (True, lambda v: F.gelu(v, approximate="tanh"), "gelu_tanh")],
)
@pytest.mark.parametrize("path", list(DispatchPath))
def test_upcycled_layer_is_gate_times_dense_ffn(gated, act, name, path):
    torch.manual_seed(0)
    dense = DenseFFN(16, 40, gated=gated, act=act)
    x = torch.randn(3, 12, 16)
    for gate in ("softmax", "normalized"):
        # capacity factor E: every expert can take the whole group, nothing drops
        config = MoEConfig(num_experts=4, top_k=1, capacity_factor=4.0, eval_capacity_factor=4.0,
                           gate=gate, **NO_NOISE)
        layer = SwitchFFN.from_dense(dense.weights(), config, seq_len=12, activation=name).eval()
        layer.dispatch_path = path
        with torch.no_grad():
            layer.router.weight.normal_()  # non-uniform routing: every token picks for real
            y = layer(x)
            probs = torch.softmax(x @ layer.router.weight.T, -1)
        assert layer.last_routing.dropped_fraction == 0
        expected = dense(x) if gate == "normalized" else probs.amax(-1, keepdim=True) * dense(x)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_upcycled_top2_normalized_is_dense_ffn():
    torch.manual_seed(1)
    dense = DenseFFN(8, 24, gated=True, act=F.silu, bias=False)
    config = MoEConfig(num_experts=4, top_k=2, capacity_factor=2.0, eval_capacity_factor=2.0,
                       gate="normalized", **NO_NOISE)
    layer = SwitchFFN.from_dense(dense.weights(), config, seq_len=10, activation="silu").eval()
    x = torch.randn(2, 10, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)


def test_from_dense_init_modes():
    torch.manual_seed(2)
    dense = DenseFFN(8, 16, bias=True, act=F.relu)
    base = dict(num_experts=4, **NO_NOISE)
    copy = SwitchFFN.from_dense(dense.weights(), MoEConfig(**base), seq_len=4)
    for e in range(4):
        torch.testing.assert_close(copy.experts.w_in[e], dense.up.weight.T)
        torch.testing.assert_close(copy.experts.b_out[e], dense.down.bias)
    noisy = SwitchFFN.from_dense(dense.weights(), MoEConfig(noise=0.01, **base), seq_len=4)
    diff = noisy.experts.w_in - dense.up.weight.T
    assert 0 < diff.std() < 0.02 * dense.up.weight.std()
    assert not torch.equal(noisy.experts.w_in[0], noisy.experts.w_in[1])
    part = SwitchFFN.from_dense(dense.weights(), MoEConfig(init="partition", **base), seq_len=4)
    assert part.experts.w_in.shape == (4, 8, 4)
    # the partitions together are the dense FFN: summing every expert's hidden share
    x = torch.randn(5, 8)
    with torch.no_grad():
        parts = sum(
            F.relu(x @ part.experts.w_in[e] + part.experts.b_in[e]) @ part.experts.w_out[e]
            for e in range(4)
        )
        torch.testing.assert_close(parts + dense.down.bias, dense(x), rtol=1e-5, atol=1e-6)
    rand = SwitchFFN.from_dense(dense.weights(), MoEConfig(init="random", **base), seq_len=4)
    assert not torch.allclose(rand.experts.w_in[0], dense.up.weight.T)
    with pytest.raises(moeify.MoEError, match="hidden width 10 into 4 experts, which does not divide"):
        SwitchFFN.from_dense(
            DenseFFN(8, 10).weights(), MoEConfig(init="partition", **base), seq_len=4
        )


def test_same_seed_same_weights():
    dense = DenseFFN(8, 16)
    a = SwitchFFN.from_dense(dense.weights(), MoEConfig(noise=0.1, seed=7), seq_len=4)
    b = SwitchFFN.from_dense(dense.weights(), MoEConfig(noise=0.1, seed=7), seq_len=4)
    c = SwitchFFN.from_dense(dense.weights(), MoEConfig(noise=0.1, seed=8), seq_len=4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.router.weight, c.router.weight)


def test_router_init_uses_the_papers_reduced_scale():
    torch.manual_seed(3)
    layer = SwitchFFN(1024, 8, MoEConfig(num_experts=64), seq_len=4)
    w = layer.router.weight
    std = math.sqrt(0.1 / 1024)
    assert w.dtype == torch.float32
    assert w.abs().max() <= 2 * std
    # a normal truncated at 2 std has std 0.880 of the untruncated one
    assert w.std().item() == pytest.approx(0.880 * std, rel=0.02)


def test_jitter_is_training_only_multiplicative_and_never_in_place():
    config = MoEConfig(num_experts=4, jitter_eps=0.1, expert_dropout=0.0)
    layer = SwitchFFN(8, 16, config, seq_len=6)
    x = torch.randn(2, 6, 8)
    before = x.clone()
    logits = layer.router(x)
    assert torch.equal(x, before)  # the caller's activations are untouched
    clean = x @ layer.router.weight.T
    bound = 0.1 * (x.abs() @ layer.router.weight.abs().T)
    assert not torch.allclose(logits, clean)
    assert ((logits - clean).abs() <= bound + 1e-6).all()
    layer(x)
    assert torch.equal(x, before)
    layer.eval()
    torch.testing.assert_close(layer.router(x), clean)


def test_router_is_float32_under_bf16_autocast_and_with_bf16_parameters():
    torch.manual_seed(4)
    layer = SwitchFFN(16, 32, MoEConfig(num_experts=4, **NO_NOISE), seq_len=8).eval()
    x = torch.randn(2, 8, 16)
    want = x @ layer.router.weight.T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.router(x)
        y = layer(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, want)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert layer.last_routing.z_loss.dtype == torch.float32

    layer.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    logits = layer.router(xb)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, xb.float() @ layer.router.weight.float().T)
    assert layer(xb).dtype == torch.bfloat16
    assert layer.last_routing.load_balancing_loss.dtype == torch.float32


@pytest.mark.parametrize("path", list(DispatchPath))
@pytest.mark.parametrize("top_k", [1, 2])
def test_gradcheck_float64(path, top_k):
    torch.manual_seed(5)
    config = MoEConfig(num_experts=3, top_k=top_k, capacity_factor=0.7, min_capacity=1,
                       **NO_NOISE)
    layer = SwitchFFN(3, 4, config, seq_len=5, activation="gelu", gated=True, bias=True,
                      dtype=torch.float64)
    layer.dispatch_path = path
    layer.eval()  # deterministic routing (no random second choice) for finite differences
    with torch.no_grad():
        layer.router.weight.normal_()
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    names, params = zip(*layer.named_parameters())

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    inputs = (x, *[p.detach().clone().requires_grad_() for p in params])
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_top2_keeps_second_expert_with_probability_twice_its_weight():
    # Every token has the same router probabilities, so every second choice has the
    # same keep probability q = 2 * p2 / (p1 + p2). With n = 8192 Bernoulli draws the
    # kept fraction has standard deviation sqrt(q (1 - q) / n) < 0.0056; the tolerance
    # 0.025 is ~4.5 of those, and the fixed seed makes the test deterministic.
    torch.manual_seed(6)
    config = MoEConfig(num_experts=3, top_k=2, capacity_factor=3.0, **NO_NOISE)
    layer = SwitchFFN(3, 4, config, seq_len=1024).train()
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0, 0], [0.3, 0, 0], [-2.0, 0, 0]]))
    x = torch.zeros(8, 1024, 3)
    x[..., 0] = 1.0
    probs = torch.softmax(torch.tensor([1.0, 0.3, -2.0]), 0)
    q = (2 * probs[1] / (probs[0] + probs[1])).item()
    layer(x)
    counts = layer.last_routing.tokens_per_expert.tolist()
    assert counts[0] == 8 * 1024 and counts[2] == 0
    assert counts[1] / (8 * 1024) == pytest.approx(q, abs=0.025)
    layer.eval()  # evaluation keeps every second choice
    layer(x)
    assert layer.last_routing.tokens_per_expert.tolist() == [8192, 8192, 0]


def test_train_and_eval_capacity_are_fixed_python_ints():
    config = MoEConfig(num_experts=8, capacity_factor=1.25, eval_capacity_factor=2.0)
    layer = SwitchFFN(8, 16, config, seq_len=512)
    assert (layer.train_capacity, layer.eval_capacity) == (80, 128)
    assert layer.train().expert_capacity == 80
    assert layer.eval().expert_capacity == 128
    layer.set_tokens_per_group(1024)
    assert layer.expert_capacity == 256
    grouped = SwitchFFN(8, 16, config.replace(group_size=64), seq_len=512)
    assert grouped.tokens_per_group == 64 and grouped.eval().expert_capacity == 16


def test_capacity_does_not_depend_on_batch_size():
    torch.manual_seed(7)
    config = MoEConfig(num_experts=4, capacity_factor=0.5, eval_capacity_factor=0.5,
                       min_capacity=1, **NO_NOISE)
    layer = SwitchFFN(8, 16, config, seq_len=10).eval()
    with torch.no_grad():
        layer.router.weight.normal_()
    x = torch.randn(6, 10, 8)
    whole = layer(x)
    for b in range(6):  # each sequence is its own group: same output alone or batched
        torch.testing.assert_close(layer(x[b : b + 1]), whole[b : b + 1])


def test_bad_inputs_name_the_problem():
    layer = SwitchFFN(8, 16, MoEConfig(), seq_len=10)
    with pytest.raises(moeify.MoEError, match="built for sequences of 10 tokens"):
        layer(torch.randn(2, 12, 8))
    with pytest.raises(moeify.MoEError, match=r"expects inputs \[\.\.\., 8\]"):
        layer(torch.randn(2, 10, 4))
    grouped = SwitchFFN(8, 16, MoEConfig(group_size=4), seq_len=None)
    with pytest.raises(moeify.MoEError, match="not a multiple"):
        grouped(torch.randn(2, 3, 8))
    with pytest.raises(moeify.MoEError, match="one sequence per group"):
        SwitchFFN(8, 16, MoEConfig())(torch.randn(8))


def test_undeclared_length_takes_each_inputs_capacity_in_eager_mode():
    torch.manual_seed(9)
    config = MoEConfig(num_experts=4, capacity_factor=1.0, min_capacity=1, **NO_NOISE)
    free = SwitchFFN(8, 16, config).eval()
    assert free.expert_capacity is None and "per call" in repr(free)
    for seq_len in (1, 3, 10):
        fixed = SwitchFFN(8, 16, config, seq_len=seq_len).eval()
        fixed.load_state_dict(free.state_dict())
        x = torch.randn(2, seq_len, 8)
        torch.testing.assert_close(free(x), fixed(x))  # same function as a declared length
        assert free.last_routing.expert_capacity == fixed.eval_capacity
    with pytest.raises(moeify.MoEError, match="no declared sequence length"):
        torch.fx.symbolic_trace(free)


def test_losses_and_statistics_are_recorded_each_forward():
    torch.manual_seed(8)
    config = MoEConfig(num_experts=4, capacity_factor=1.0, min_capacity=1, aux_loss_coef=0.01,
                       z_loss_coef=0.001, **NO_NOISE)
    model = nn.Sequential(
        SwitchFFN(8, 16, config, seq_len=6), nn.Identity(), SwitchFFN(8, 16, config, seq_len=6)
    )
    with pytest.raises(moeify.MoEError, match="no Switch layer has run yet"):
        moeify.aux_loss(model)
    x = torch.randn(3, 6, 8, requires_grad=True)
    y = model(x)
    records = [m.last_routing for m in (model[0], model[2])]
    want = sum(0.01 * r.load_balancing_loss + 0.001 * r.z_loss for r in records) / 2
    loss = moeify.aux_loss(model)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert model[0].router.weight.grad.abs().sum() > 0  # the loss trains the router
    stats = moeify.routing_stats(model)
    assert [s.name for s in stats] == ["0", "2"]
    for s, r in zip(stats, records):
        assert sum(s.tokens_per_expert) == 18 - round(s.dropped_fraction * 18)
        assert s.expert_capacity == 2 and s.num_tokens == 18
    assert y.shape == x.shape
    with pytest.raises(moeify.MoEError, match="no Switch layers"):
        moeify.aux_loss(nn.Linear(2, 2))


def test_expert_dropout_acts_between_the_matmuls_in_training_only():
    # w_in = I and w_out = ones / f: the hidden layer is the (positive) input itself and
    # every output element is the mean of the hidden layer. Dropout between the matmuls
    # therefore changes that mean but keeps all of a token's output elements equal;
    # dropout anywhere after w_out would zero some elements and not others.
    d = f = 64
    config = MoEConfig(num_experts=2, capacity_factor=2.0, eval_capacity_factor=2.0,
                       gate="normalized", jitter_eps=0.0, expert_dropout=0.5)
    dense = DenseFFNWeights(w_in=torch.eye(d), w_out=torch.full((f, d), 1.0 / f))
    layer = SwitchFFN.from_dense(dense, config, seq_len=4)
    x = torch.rand(1, 4, d) + 0.5
    with torch.no_grad():
        clean = x.mean(-1, keepdim=True).expand_as(x)
        torch.testing.assert_close(layer.eval()(x), clean)
        torch.manual_seed(0)
        y = layer.train()(x)
    torch.testing.assert_close(y, y[..., :1].expand_as(y))  # equal within each token
    assert not torch.allclose(y, clean)
    # inverted dropout keeps the expectation: the hidden mean stays near the clean one
    assert (y[..., 0] / clean[..., 0]).mean().item() == pytest.approx(1.0, abs=0.3)


def test_auto_dispatch_follows_the_measured_cost_table():
    from moeify.switch import BATCHED_COST, LocalDispatcher
    from moeify.switch.dispatch import SortedAssignments

    layer = SwitchFFN(8, 16, MoEConfig(num_experts=4, capacity_factor=1.0, **NO_NOISE),
                      seq_len=256).train()
    x = torch.randn(2, 256, 8)  # G=2 groups, C=64: 128 padded rows per expert, 512 in all
    sizes = layer._sizes(256)
    full = SortedAssignments(None, None, None, [128] * 4)  # every slot occupied
    high = SortedAssignments(None, None, None, [120] * 4)  # 94% of the slots
    low = SortedAssignments(None, None, None, [40] * 4)  # 31%

    def padded(assignments):
        return layer.dispatcher.use_padded(x, assignments, sizes, layer.experts)

    assert isinstance(layer.dispatcher, LocalDispatcher)
    assert layer.dispatch_path == DispatchPath.AUTO
    assert BATCHED_COST["cpu", torch.float32] >= 1.0  # float32: bmm never beats per-expert calls
    for assignments in (full, high, low):
        assert not padded(assignments)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # would cast every expert's weights
        assert not layer.experts.batched_matmul_ok()
        assert not padded(full)
    layer.to(torch.bfloat16)  # bf16 weights: padded where occupancy beats bmm's cost
    assert layer.experts.batched_matmul_ok() and BATCHED_COST["cpu", torch.bfloat16] < 0.94
    assert padded(high) and not padded(low)
    layer.dispatch_path = DispatchPath.SORTED
    assert layer.dispatcher.path == DispatchPath.SORTED and not padded(full)
    layer.dispatch_path = DispatchPath.PADDED
    assert padded(low)
    assert set(layer.state_dict()) == {"router.weight", "experts.w_in", "experts.w_out"}


@pytest.mark.parametrize("device", [p for p in DEVICES if p != "cpu"])
def test_auto_dispatch_on_a_gpu_pads_where_one_bmm_beats_the_launches(device):
    """On a GPU one bmm replaces E kernel launches: padding pays from lower occupancy than
    on the CPU (float32 above BATCHED_COST's 0.7, bfloat16 weights above 0.25)."""
    from moeify.switch.dispatch import SortedAssignments

    layer = SwitchFFN(8, 16, MoEConfig(num_experts=4, capacity_factor=1.0, **NO_NOISE),
                      seq_len=256, device=device).train()
    x = torch.randn(2, 256, 8, device=device)
    sizes = layer._sizes(256)
    high = SortedAssignments(None, None, None, [120] * 4)  # 94% of the 128 slots
    low = SortedAssignments(None, None, None, [40] * 4)  # 31%

    def padded(assignments):
        return layer.dispatcher.use_padded(x, assignments, sizes, layer.experts)

    assert padded(high) and not padded(low)
    layer.to(torch.bfloat16)
    assert padded(low)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", list(DispatchPath))
def test_autocast_runs_experts_like_nn_linear_per_expert(path, device):
    """Under bf16 autocast the expert matmuls run in bf16 (router in float32), no
    full-size bf16 copy of the expert weights is made, and output and gradients match
    an nn.Linear-per-expert reference under the same autocast, tokens dropping; on the
    CPU and on a GPU."""
    torch.manual_seed(5)
    d, f, E, T = 16, 40, 5, 24
    config = MoEConfig(num_experts=E, capacity_factor=1.0, min_capacity=1, **NO_NOISE)
    layer = SwitchFFN(d, f, config, seq_len=T, activation="relu", device=device).train()
    layer.dispatch_path = path
    with torch.no_grad():
        layer.router.weight.normal_()
    x = torch.randn(3, T, d, device=device, requires_grad=True)
    grad = torch.randn(3, T, d, device=device)

    def run():
        with torch.autocast(device, dtype=torch.bfloat16):
            y = layer(x)
        y.backward(grad)
        return y

    y, calls = record_ops(run)
    assert 0 < layer.last_routing.dropped_fraction < 1
    matmuls = [c for c in calls if c[0] in ("mm", "addmm", "bmm", "baddbmm")]
    expert = [c for c in matmuls if f in c[2]]  # every matmul with the hidden width
    router = [c for c in matmuls if c[2][-1] == E]
    assert expert and all(set(dtypes) == {torch.bfloat16} for _, dtypes, _, _ in expert)
    assert router and all(set(dtypes) == {torch.float32} for _, dtypes, _, _ in router)
    assert not [c for c in calls if c[2] in ((E, d, f), (E, f, d)) and c[3] == torch.bfloat16]
    assert layer.experts.w_in.grad.dtype == torch.float32

    # reference: the same routing, one nn.Linear pair per expert, HF-style loop
    ref_x = x.detach().clone().requires_grad_()
    ups = [nn.Linear(d, f, bias=False, device=device) for _ in range(E)]
    downs = [nn.Linear(f, d, bias=False, device=device) for _ in range(E)]
    router = nn.Linear(d, E, bias=False, device=device)
    with torch.no_grad():
        router.weight.copy_(layer.router.weight)
        for e in range(E):
            ups[e].weight.copy_(layer.experts.w_in[e].T)
            downs[e].weight.copy_(layer.experts.w_out[e].T)
    with torch.autocast(device, dtype=torch.bfloat16):
        with torch.autocast(device, enabled=False):
            logits = router(ref_x.reshape(-1, d))
        probs = torch.softmax(logits, -1)
        gate, index = probs.max(-1)
        position = (F.one_hot(index.view(3, T), E).cumsum(1) * F.one_hot(index.view(3, T), E)
                    ).sum(-1).flatten() - 1
        kept = position < layer.expert_capacity
        out = torch.zeros(3 * T, d, device=device)
        flat = ref_x.reshape(-1, d)
        for e in range(E):
            rows = torch.nonzero(kept & (index == e)).flatten()
            h = downs[e](F.relu(ups[e](flat[rows])))
            out = out.index_add(0, rows, (h * gate[rows, None].to(h.dtype)).float())
    out.view(3, T, d).backward(grad)
    tol = dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(y, out.view(3, T, d), **tol)
    torch.testing.assert_close(x.grad, ref_x.grad, **tol)
    torch.testing.assert_close(layer.router.weight.grad, router.weight.grad, **tol)
    for e in range(E):
        torch.testing.assert_close(layer.experts.w_in.grad[e], ups[e].weight.grad.T, **tol)
        torch.testing.assert_close(layer.experts.w_out.grad[e], downs[e].weight.grad.T, **tol)


def test_casting_the_model_keeps_the_router_weight_exact():
    layer = SwitchFFN(16, 32, MoEConfig(num_experts=4, **NO_NOISE), seq_len=8)
    with torch.no_grad():
        layer.router.weight.normal_()
    before = layer.router.weight.detach().clone()
    layer.to(torch.bfloat16)
    assert layer.experts.w_in.dtype == torch.bfloat16
    assert layer.router.weight.dtype == torch.float32
    assert torch.equal(layer.router.weight, before)  # not rounded through bfloat16
    layer.half().float()
    assert torch.equal(layer.router.weight, before)


def test_the_layer_composes_a_router_a_dispatcher_and_experts():
    """Token choice and expert choice differ in their router and dispatcher only; the
    parameters (and state_dict keys) are the same, and a mismatched part is refused."""
    from moeify.switch import (
        ExpertChoiceDispatcher,
        ExpertChoiceRouter,
        LocalDispatcher,
        Router,
        TokenChoiceRouter,
    )

    token = SwitchFFN(8, 16, MoEConfig(num_experts=4, top_k=2), seq_len=6)
    expert = SwitchFFN(8, 16, MoEConfig(num_experts=4, router="expert-choice"), seq_len=6)
    assert isinstance(token.router, TokenChoiceRouter) and token.router.top_k == 2
    assert isinstance(token.dispatcher, LocalDispatcher)
    assert isinstance(expert.router, ExpertChoiceRouter)
    assert isinstance(expert.dispatcher, ExpertChoiceDispatcher)
    assert list(token.state_dict()) == list(expert.state_dict()) == [
        "router.weight", "experts.w_in", "experts.w_out"]
    assert token.local_experts == expert.local_experts == range(4)
    with pytest.raises(moeify.MoEError, match="expert-choice layer routes with "
                                              "ExpertChoiceRouter, got TokenChoiceRouter"):
        SwitchFFN(8, 16, expert.config, seq_len=6, router=token.router)
    with pytest.raises(moeify.MoEError, match="routes with TokenChoiceRouter, got Router"):
        SwitchFFN(8, 16, token.config, seq_len=6, router=Router(8, 4))
    with pytest.raises(moeify.MoEError, match=r"experts \(4, 8, 16\) != \(4, 8, 32\)"):
        SwitchFFN(8, 32, token.config, seq_len=6, experts=token.experts)
    with pytest.raises(moeify.MoEError, match="ExpertChoiceDispatcher, which has no dispatch_path"):
        expert.dispatch_path  # noqa: B018
    with pytest.raises(moeify.MoEError, match="dispatch_path applies to one process's"):
        expert.dispatch_path = DispatchPath.SORTED


def test_a_new_config_reconfigures_the_router_and_keeps_the_sizes():
    """The layer's config is the one statement of its options: assigning one reaches the
    router (the normalized gate gives an upcycled layer the dense output) and the experts'
    dropout; the number of experts and the router kind stay those it was built with."""
    torch.manual_seed(0)
    dense = DenseFFNWeights(w_in=torch.randn(8, 16), w_out=torch.randn(16, 8))
    layer = SwitchFFN.from_dense(dense, MoEConfig(num_experts=4, eval_capacity_factor=4.0),
                                 seq_len=6).eval()
    x = torch.randn(2, 6, 8)
    expected = torch.relu(x @ dense.w_in) @ dense.w_out
    assert not torch.allclose(layer(x), expected, atol=1e-5)  # softmax gate: p * FFN(x)
    layer.config = layer.config.replace(gate="normalized", top_k=2, expert_dropout=0.3)
    assert (layer.router.gate.value, layer.router.top_k, layer.experts.dropout) == (
        "normalized", 2, 0.3)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(moeify.MoEError, match="keeps its num_experts, router"):
        layer.config = layer.config.replace(num_experts=8, top_k=1, gate="softmax",
                                            router="expert-choice")
