"""The Switch recipe in the training loop: aux losses, capacities, dropout, precision."""

from __future__ import annotations

import copy

import pytest
import torch

import moeify
from moeify import MoEConfig
from tests import models

SEQ = 12
RECIPE = MoEConfig(num_experts=4, capacity_factor=1.25, noise=0.01, aux_loss_coef=0.01,
                   z_loss_coef=0.001)


def rule_batch(generator, size=8, vocab=models.VOCAB):
    """Sequences following next = (5 * token + 3) mod vocab: learnable in a few steps."""
    tokens = [torch.randint(2, vocab, (size,), generator=generator)]
    for _ in range(SEQ - 1):
        tokens.append((5 * tokens[-1] + 3) % vocab)
    return torch.stack(tokens, dim=1)


def train(model, forward, steps=30, lr=1e-2):
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    routers = {n: l.router.weight.detach().clone() for n, l in moeify.switch_layers(model)}
    used = {n: torch.zeros(l.config.num_experts, dtype=torch.long)
            for n, l in moeify.switch_layers(model)}
    losses, auxes = [], []
    model.train()
    for _ in range(steps):
        task = forward(model, rule_batch(generator))
        aux = moeify.aux_loss(model)
        (task + aux).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(task.item())
        auxes.append(aux.item())
        for stats in moeify.routing_stats(model):
            used[stats.name] += torch.tensor(stats.tokens_per_expert)
    return losses, auxes, routers, used


def gpt2_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def t5_loss(model, ids):
    return model(input_ids=ids, labels=ids.roll(1, dims=1)).loss


@pytest.mark.parametrize("build, forward", [(models.gpt2, gpt2_loss), (models.t5, t5_loss)])
def test_converted_models_train(build, forward):
    torch.manual_seed(0)
    model = build(layers=2)
    moeify.convert(model, RECIPE, seq_len=SEQ)
    losses, auxes, routers, used = train(model, forward)
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
    assert all(torch.isfinite(torch.tensor(auxes))) and min(auxes) > 0
    for name, layer in moeify.switch_layers(model):
        assert not torch.equal(layer.router.weight, routers[name]), f"{name}'s router is frozen"
        assert (used[name] > 0).all(), f"{name} starved an expert: {used[name].tolist()}"


def test_aux_loss_is_added_to_outputs_loss_when_asked():
    torch.manual_seed(0)
    plain = models.gpt2(layers=2).eval()  # no dropout: both models compute the same
    hooked = copy.deepcopy(plain)
    moeify.convert(plain, RECIPE, seq_len=SEQ)
    moeify.convert(hooked, RECIPE, seq_len=SEQ, add_aux_loss_to_output=True)
    ids = rule_batch(torch.Generator().manual_seed(0))
    expected = plain(input_ids=ids, labels=ids).loss + moeify.aux_loss(plain)
    out = hooked(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, expected)
    assert hooked(input_ids=ids).loss is None  # no labels, nothing to add
    stats = moeify.routing_stats(hooked)  # per-layer values for logging
    assert all(s.load_balancing_loss >= 1.0 - 1e-6 and s.z_loss > 0 for s in stats)
    handle = moeify.add_aux_loss_to_output(hooked)  # idempotent: the same hook
    handle.remove()
    torch.testing.assert_close(hooked(input_ids=ids, labels=ids).loss,
                               plain(input_ids=ids, labels=ids).loss)


def test_train_and_eval_capacity_follow_the_mode():
    model = models.gpt2(layers=2)
    moeify.convert(model, MoEConfig(num_experts=4, capacity_factor=1.0,
                                    eval_capacity_factor=2.0, min_capacity=1), seq_len=SEQ)
    ids = rule_batch(torch.Generator().manual_seed(0))
    model.train()(input_ids=ids)
    assert {s.expert_capacity for s in moeify.routing_stats(model)} == {3}
    model.eval()(input_ids=ids)
    assert {s.expert_capacity for s in moeify.routing_stats(model)} == {6}


def test_expert_dropout_applies_inside_the_experts_only():
    torch.manual_seed(0)
    model = models.gpt2(layers=2)
    moeify.convert(model, RECIPE, seq_len=SEQ)
    moeify.set_expert_dropout(model, 0.4)
    for _, layer in moeify.switch_layers(model):
        assert layer.experts.dropout == 0.4 and layer.config.expert_dropout == 0.4
    assert model.transformer.h[0].attn.attn_dropout.p == 0.1  # the rest is untouched
    layer = moeify.switch_layers(model)[0][1].experts.train()
    hidden = layer._hidden(torch.ones(1000, layer.d_ff), None)
    assert 0.3 < (hidden == 0).float().mean().item() < 0.5  # dropped at rate 0.4
    with pytest.raises(moeify.MoEError, match="within \\[0, 1\\)"):
        moeify.set_expert_dropout(model, 1.0)


def test_bfloat16_model_keeps_the_router_in_float32_and_trains():
    torch.manual_seed(0)
    model = models.gpt2(layers=2)
    moeify.convert(model, RECIPE, seq_len=SEQ)
    model.to(torch.bfloat16)
    layer = moeify.switch_layers(model)[0][1]
    assert layer.router.weight.dtype == torch.float32
    assert layer.experts.w_in.dtype == torch.bfloat16
    ids = rule_batch(torch.Generator().manual_seed(0))
    loss = gpt2_loss(model.train(), ids) + moeify.aux_loss(model)
    assert torch.isfinite(loss)
    logits = layer.router(torch.randn(2, SEQ, 16, dtype=torch.bfloat16))
    assert logits.dtype == torch.float32
    loss.backward()
    assert layer.router.weight.grad.dtype == torch.float32


def test_bfloat16_autocast_step():
    torch.manual_seed(0)
    model = models.t5(layers=2)
    moeify.convert(model, RECIPE, seq_len=SEQ)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = rule_batch(torch.Generator().manual_seed(0))
    seen = {}
    layer = moeify.switch_layers(model)[0][1]
    hook = layer.router.register_forward_hook(lambda m, a, out: seen.update(router=out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = t5_loss(model.train(), ids) + moeify.aux_loss(model)
    hook.remove()
    assert seen["router"] == torch.float32 and torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
