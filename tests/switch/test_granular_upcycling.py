"""Granular upcycling (MoEConfig.granularity): slices, router rows, dense identity."""

from __future__ import annotations

import copy

import pytest
import torch

import moeify
from moeify import MoEConfig
from moeify.config import ConfigError
from tests import models

GRANULAR = dict(num_experts=8, top_k=2, granularity=2, eval_capacity_factor=8.0)


def outputs(model, ids):
    kwargs = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        out = model(input_ids=ids, **kwargs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("gate", ["softmax", "normalized"])
@pytest.mark.parametrize("name, build", [
    ("t5 relu", lambda: models.t5(layers=2)),
    ("bert gelu", lambda: models.bert(layers=2)),
    ("gpt2 gelu_new, biases", lambda: models.gpt2(layers=2)),
    ("llama swiglu", lambda: models.llama(layers=2)),
    ("t5 gated-gelu", lambda: models.t5(gated=True, layers=2)),
])
def test_the_converted_layer_is_the_dense_ffn_at_init(name, build, gate):
    torch.manual_seed(0)
    dense = build().eval()
    moe = copy.deepcopy(dense)
    moeify.convert(moe, MoEConfig(gate=gate, **GRANULAR))
    ids = torch.randint(2, models.VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    expected = outputs(dense, ids)
    got = outputs(moe, ids)
    assert max(float(s.dropped_fraction) for s in moeify.routing_stats(moe)) == 0
    assert (got - expected).abs().max() <= 1e-5
    # not by accident: every token reaches both slices of one copy (tied router rows)
    for stats in moeify.routing_stats(moe):
        counts = list(stats.tokens_per_expert)
        assert sum(counts) == 2 * stats.num_tokens
        assert counts[0::2] == counts[1::2]


def test_experts_are_slices_of_the_dense_ffn_and_router_rows_repeat_per_copy():
    torch.manual_seed(0)
    dense = models.llama(layers=2).eval()
    site_model = copy.deepcopy(dense)
    result = moeify.convert(site_model, MoEConfig(**GRANULAR))
    (path, layer), = moeify.switch_layers(site_model)
    site = next(s for s in result.plan.selected_sites if s.path == path)
    weights = site.dense_weights(dense)
    f = weights.w_in.shape[1]
    assert layer.experts.d_ff == f // 2 and layer.config.num_experts == 8
    for e in range(8):
        part = slice((e % 2) * f // 2, (e % 2 + 1) * f // 2)
        assert torch.equal(layer.experts.w_in[e], weights.w_in[:, part])
        assert torch.equal(layer.experts.w_gate[e], weights.w_gate[:, part])
        assert torch.equal(layer.experts.w_out[e], 2 * weights.w_out[part])
    rows = layer.router.weight
    assert all(torch.equal(rows[2 * c], rows[2 * c + 1]) for c in range(4))
    assert len({tuple(rows[2 * c].tolist()) for c in range(4)}) == 4  # copies differ
    # parameters: the same expert FFN parameters per token as the dense FFN (top-2 halves)
    assert "granular: 4 copies x 2 slices of d_ff/2" in str(result.report)


def test_training_moves_the_slices_apart():
    torch.manual_seed(0)
    model = models.gpt2(layers=2)
    moeify.convert(model, MoEConfig(**GRANULAR))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(2, models.VOCAB, (4, 12))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss + moeify.aux_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    (_, layer), = moeify.switch_layers(model)
    rows = layer.router.weight
    assert not torch.equal(rows[0], rows[1])  # the router learns to split a copy's slices


@pytest.mark.parametrize("changes, fragment", [
    (dict(granularity=2, top_k=1), "needs top_k a multiple of it"),
    (dict(granularity=3, top_k=2), "needs top_k a multiple of it"),
    (dict(granularity=2, top_k=2, init="partition"), "needs MoEConfig.init='copy'"),
    (dict(granularity=2, top_k=2, num_experts=7), "must be a multiple of"),
    (dict(granularity=0), "granularity=0 must be an integer >= 1"),
])
def test_configs_granular_upcycling_cannot_honour_are_refused(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        MoEConfig(**{"num_experts": 8, **changes})


def test_a_hidden_width_the_granularity_does_not_divide_is_refused():
    model = models.gpt2(layers=2, n_inner=41)
    with pytest.raises(moeify.MoEError, match="d_ff of .* \\(41\\) is not divisible by it"):
        moeify.convert(model, MoEConfig(**GRANULAR))


def test_save_and_load_keep_the_granular_layer(tmp_path):
    torch.manual_seed(0)
    model = models.t5(gated=True, layers=2).eval()
    moeify.convert(model, MoEConfig(**GRANULAR), seq_len=12)
    moeify.save(model, tmp_path / "ck")
    loaded = moeify.load(tmp_path / "ck")
    ids = torch.randint(2, models.VOCAB, (2, 12))
    assert torch.equal(outputs(model, ids), outputs(loaded, ids))
    (_, layer), *_ = moeify.switch_layers(loaded)
    assert layer.experts.d_ff == 20 and layer.config.granularity == 2


def test_distill_joins_the_slices_back_into_the_dense_ffn():
    torch.manual_seed(0)
    dense = models.llama(layers=2).eval()
    moe = copy.deepcopy(dense)
    moeify.convert(moe, MoEConfig(**GRANULAR))
    student = moeify.distill(moe)
    for name, tensor in dense.state_dict().items():
        assert torch.equal(student.state_dict()[name], tensor), name  # bitwise: x2 then /2
    ids = torch.randint(2, models.VOCAB, (2, 12))
    outputs(moe, ids)
    usage = moeify.distill(moe, rule="usage")  # copies weighted by their slices' tokens
    assert torch.allclose(outputs(usage, ids), outputs(dense, ids), atol=1e-6)


@pytest.mark.parametrize("experts, top_k, G", [(16, 4, 4), (64, 8, 8), (32, 8, 4)])
def test_any_granularity_is_the_dense_ffn_at_init_and_picks_whole_copies(experts, top_k, G):
    """He et al.'s fine-grained recipe (e.g. 64 experts, top-8, G = 8): a token's top-k
    takes k / G whole copies (all G slices of each), with weights renormalized over the k,
    so each slice's output scaled by G gives back the dense FFN."""
    torch.manual_seed(0)
    dense = models.llama(layers=2).eval()  # d_ff 40: slices of 10 or 5
    moe = copy.deepcopy(dense)
    moeify.convert(moe, MoEConfig(num_experts=experts, top_k=top_k, granularity=G,
                                  dropless=True))
    ids = torch.randint(2, models.VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    assert (outputs(moe, ids) - outputs(dense, ids)).abs().max() <= 1e-5
    for stats in moeify.routing_stats(moe):
        counts = torch.tensor(stats.tokens_per_expert).view(experts // G, G)
        assert int(counts.sum()) == top_k * stats.num_tokens
        assert (counts == counts[:, :1]).all()  # every slice of a copy, or none
