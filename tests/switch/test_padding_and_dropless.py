"""Dropless routing, padding-aware routing, deterministic evaluation for top-2."""

import pytest
import torch

from moeify import MoEConfig, SwitchFFN
from moeify.switch import DispatchPath

NO_NOISE = dict(jitter_eps=0.0, expert_dropout=0.0)


def layer_with_router(config, d=8, f=16, seq_len=None, seed=0):
    torch.manual_seed(seed)
    layer = SwitchFFN(d, f, config, seq_len=seq_len)
    with torch.no_grad():
        layer.router.weight.normal_(0, 2.0)  # confident routing: capacity matters
    return layer


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_computes_every_routed_choice(top_k):
    config = MoEConfig(num_experts=4, top_k=top_k, dropless=True, min_capacity=1, **NO_NOISE)
    layer = layer_with_router(config).train()
    x = torch.randn(3, 24, 8)
    layer(x)
    record = layer.last_routing
    assert record.dropped_fraction == 0 and record.expert_capacity == 24
    with torch.no_grad():
        layer.eval()(x)  # eval: every second choice kept (training samples them, GShard)
    assert int(layer.last_routing.tokens_per_expert.sum()) == 3 * 24 * top_k
    capped = layer_with_router(config.replace(dropless=False, capacity_factor=0.5)).train()
    capped(x)
    assert capped.last_routing.dropped_fraction > 0  # the same routing drops with a capacity
    assert MoEConfig(dropless=True).capacity(100, training=True) == 100


def test_eval_top2_is_deterministic_and_training_top2_is_random():
    config = MoEConfig(num_experts=4, top_k=2, capacity_factor=4.0, eval_capacity_factor=4.0,
                       **NO_NOISE)
    layer = layer_with_router(config)
    x = torch.randn(2, 32, 8)
    layer.eval()
    with torch.no_grad():
        first, second = layer(x), layer(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert int(layer.last_routing.tokens_per_expert.sum()) == 2 * 32 * 2  # both choices
    layer.train()
    with torch.no_grad():
        kept = {int(layer(x).abs().sum() * 1e3) for _ in range(4)}
    assert len(kept) > 1  # GShard's random second expert: training only


@pytest.mark.parametrize("path", [DispatchPath.SORTED, DispatchPath.PADDED])
def test_padding_takes_no_slot_and_real_tokens_compute_as_unpadded(path):
    """A left- and a right-padded batch give the real tokens what the unpadded sequences
    give them, with tokens dropping; padding gets exactly zero and no statistics."""
    config = MoEConfig(num_experts=4, capacity_factor=1.0, eval_capacity_factor=1.0,
                       min_capacity=1, **NO_NOISE)
    layer = layer_with_router(config).eval()
    layer.dispatch_path = path
    lengths, T = [5, 9, 12], 12
    seqs = [torch.randn(n, 8) for n in lengths]
    with torch.no_grad():
        alone, drops = [], []
        for s in seqs:
            alone.append(layer(s.unsqueeze(0))[0])
            drops.append(float(layer.last_routing.dropped_fraction))
        assert max(drops) > 0  # capacity drops real tokens in this test
        for side in ("left", "right"):
            x = torch.zeros(len(seqs), T, 8)
            mask = torch.zeros(len(seqs), T, dtype=torch.long)
            for i, s in enumerate(seqs):
                where = slice(T - len(s), T) if side == "left" else slice(0, len(s))
                x[i, where], mask[i, where] = s, 1
            x = x + (1 - mask).unsqueeze(-1) * torch.randn(len(seqs), T, 8)  # junk padding
            layer.token_mask = mask
            y = layer(x)
            layer.token_mask = None
            for i, s in enumerate(seqs):
                where = slice(T - len(s), T) if side == "left" else slice(0, len(s))
                torch.testing.assert_close(y[i, where], alone[i], rtol=1e-6, atol=1e-6)
            assert torch.equal(y[mask == 0], torch.zeros_like(y[mask == 0]))
            record = layer.last_routing
            assert record.num_tokens == sum(lengths)
            assert int(record.tokens_per_expert.sum()) <= sum(lengths)


def test_padding_is_left_out_of_the_losses():
    config = MoEConfig(num_experts=4, min_capacity=1, **NO_NOISE)
    layer = layer_with_router(config).train()
    real = torch.randn(1, 6, 8)
    layer(real)
    want_lb, want_z = layer.last_routing.load_balancing_loss, layer.last_routing.z_loss
    padded = torch.cat([real, 50 * torch.randn(1, 4, 8)], dim=1)  # loud padding
    layer.token_mask = torch.tensor([[1] * 6 + [0] * 4])
    layer(padded)
    layer.token_mask = None
    torch.testing.assert_close(layer.last_routing.load_balancing_loss, want_lb)
    torch.testing.assert_close(layer.last_routing.z_loss, want_z)


def test_a_mask_that_does_not_describe_the_input_is_ignored():
    layer = layer_with_router(MoEConfig(num_experts=4, **NO_NOISE)).eval()
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        want = layer(x)
        layer.token_mask = torch.ones(3, 6)  # another batch size
        torch.testing.assert_close(layer(x), want)
        layer.token_mask = torch.tensor([[1] * 9 + [0] * 1, [1] * 10])  # KV cache: past + now
        y = layer(x)
        assert torch.equal(y[0, -1], torch.zeros(8))  # the last column is this step's last token


def test_group_capacities_is_expert_capacity_in_tensor_ops():
    """The per-sequence capacity a padded batch gets equals the Python formula's."""
    from moeify.config import expert_capacity
    from moeify.switch.routing import group_capacities

    tokens = torch.arange(1, 130)
    for E, factor, k, floor in [(4, 1.25, 1, 4), (8, 2.0, 2, 1), (64, 1.0, 1, 4), (3, 0.7, 2, 2)]:
        got = group_capacities(tokens, num_experts=E, capacity_factor=factor, top_k=k,
                               min_capacity=floor).flatten().tolist()
        want = [expert_capacity(int(t), num_experts=E, capacity_factor=factor, top_k=k,
                                min_capacity=floor) for t in tokens]
        assert got == want, (E, factor, k, floor)
    dropless = group_capacities(tokens, num_experts=4, capacity_factor=1.0, top_k=1,
                                min_capacity=4, dropless=True)
    assert dropless.flatten().tolist() == tokens.tolist()
    empty = group_capacities(torch.tensor([0]), num_experts=4, capacity_factor=1.25, top_k=1,
                             min_capacity=4)
    assert empty.item() == 0  # a sequence of padding only: no slot
