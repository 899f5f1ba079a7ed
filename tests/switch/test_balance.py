"""Sigmoid routers, auxiliary-loss-free bias balancing and the sequence-wise balance loss."""

from __future__ import annotations

import json
from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moeify
from moeify import MoEConfig, SwitchFFN
from moeify.switch.balance import bias_update
from tests import models

SEQ = 8


def balanced_layer(**options) -> SwitchFFN:
    config = MoEConfig(**{"num_experts": 4, "top_k": 2, "scoring": "sigmoid",
                          "bias_balancing": True, "random_routing": False, "jitter_eps": 0.0,
                          "dropless": True, **options})
    torch.manual_seed(0)
    return SwitchFFN(16, 32, config, seq_len=SEQ)


def test_bias_selects_but_the_weights_and_the_gradient_ignore_it():
    layer = balanced_layer(gate="raw")
    x = torch.randn(3, SEQ, 16)
    layer(x)
    before = layer.router.route(x.reshape(-1, SEQ, 16), layer.sizes)
    layer.router.expert_bias.copy_(torch.tensor([5.0, 5.0, -5.0, -5.0]))
    after = layer.router.route(x.reshape(-1, SEQ, 16), layer.sizes)
    assert (after.expert_index.sort(-1).values == torch.tensor([0, 1])).all()
    assert not torch.equal(before.expert_index, after.expert_index)
    # weights: each choice's own unbiased score (raw gate), not score + bias
    scores = torch.sigmoid(after.router_logits)
    torch.testing.assert_close(after.combine_weights, scores.gather(-1, after.expert_index))
    torch.testing.assert_close(after.router_probs, scores)
    # the bias is a buffer outside autograd; the router weight learns
    assert "router.expert_bias" not in dict(layer.named_parameters())
    layer(x).square().sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0 and layer.router.expert_bias.grad is None
    assert layer.router.expert_bias.dtype == torch.float32


def test_the_update_is_the_rate_times_the_sign_of_mean_load_minus_load():
    load = torch.tensor([6.0, 2.0, 4.0, 4.0])  # mean 4: expert 2 and 3 exactly at it
    assert bias_update(load, 0.01).tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])
    layer = balanced_layer(bias_update_rate=0.25)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    handle = moeify.balance_experts(layer, optimizer)
    assert layer.router.expert_load.tolist() == [0.0] * 4
    layer.router.expert_load.copy_(load)
    optimizer.step()  # the hook runs after the step
    assert layer.router.expert_bias.tolist() == [-0.25, 0.25, 0.0, 0.0]
    assert layer.router.expert_load.tolist() == [0.0] * 4  # cleared for the next step
    optimizer.step()  # nothing counted: no change
    assert layer.router.expert_bias.tolist() == [-0.25, 0.25, 0.0, 0.0]
    handle.remove()
    assert layer.router.expert_load is None
    layer.train()(torch.randn(2, SEQ, 16))  # detached: nothing counted, nothing moves
    optimizer.step()
    assert layer.router.expert_bias.tolist() == [-0.25, 0.25, 0.0, 0.0]


def test_loads_count_the_top_k_choices_of_real_tokens_in_training_only():
    layer = balanced_layer(dropless=False, capacity_factor=0.5)  # choices drop: still counted
    moeify.balance_experts(layer, torch.optim.SGD(layer.parameters(), lr=0.0))
    x = torch.randn(2, SEQ, 16)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, 5:] = 0  # three padding tokens
    layer.token_mask = mask
    layer.train()
    layer(x)
    layer(x)
    assert layer.last_routing.dropped_fraction > 0
    layer.eval()  # the same selection (no jitter, no random routing), not counted
    routing = layer.router.route(x, layer.sizes, valid=mask.bool())
    chosen = F.one_hot(routing.expert_index, 4) * mask.bool()[..., None, None]
    expected = 2 * chosen.sum(dim=(0, 1, 2)).float()
    assert expected.sum() == 2 * (2 * SEQ - 3) * 2  # two forwards, k choices per real token
    assert layer.router.expert_load.tolist() == expected.tolist()
    layer(x)
    assert layer.router.expert_load.tolist() == expected.tolist()


@pytest.fixture
def one_thread():
    """Tiny matmuls in a loop: one intra-op thread is faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bias_balancing_evens_a_router_that_sends_most_tokens_to_one_expert(one_thread):
    """The acceptance test: aux loss off, a router initialized towards expert 0; 300 steps
    of bias balancing bring the max / mean load (over the last 20 steps) below 1.5, and
    without it the load stays collapsed on expert 0."""

    def train(bias_balancing: bool) -> tuple[float, float]:
        torch.manual_seed(0)
        E, d = 8, 16
        config = MoEConfig(num_experts=E, top_k=2, scoring="sigmoid", dropless=True,
                           bias_balancing=bias_balancing, bias_update_rate=0.01,
                           aux_loss_coef=0.0, z_loss_coef=0.0, jitter_eps=0.0,
                           random_routing=False)
        model = nn.Sequential(SwitchFFN(d, 32, config, seq_len=SEQ), nn.Linear(d, d))
        direction = torch.randn(d)
        with torch.no_grad():  # every token's inputs lean towards expert 0's row
            model[0].router.weight[0] = 2 * direction / direction.norm()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if bias_balancing:
            moeify.balance_experts(model, optimizer)
        target = nn.Linear(d, d)
        loads = []
        for _ in range(300):
            x = torch.randn(16, SEQ, d) + direction
            loss = F.mse_loss(model(x), target(x).detach()) + moeify.aux_loss(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loads.append(torch.tensor(moeify.routing_stats(model)[0].tokens_per_expert))
        return max_over_mean(loads[0]), max_over_mean(sum(loads[-20:]))

    first, last = train(True)
    assert first > 3.5  # expert 0 is every token's choice at the start (4 = E / k)
    assert last < 1.5
    assert train(False)[1] > 3.5


def max_over_mean(load: torch.Tensor) -> float:
    return float(load.max() / load.float().mean())


def direct_seq_loss(scores, index, valid, seq_len):
    """DeepSeek-V3 eq. 17-20 with a loop per sequence."""
    E, k = scores.shape[-1], index.shape[-1]
    scores = scores.reshape(-1, seq_len, E)
    index = index.reshape(-1, seq_len, k)
    valid = valid.reshape(-1, seq_len)
    losses = []
    for s, i, v in zip(scores, index, valid):
        real = int(v.sum())
        if real == 0:
            continue
        norm = s[v] / s[v].sum(-1, keepdim=True)
        counts = torch.zeros(E)
        for choices in i[v]:
            counts[choices] += 1
        f = E / (k * real) * counts
        P = norm.mean(0)
        losses.append((f * P).sum())
    return torch.stack(losses).mean()


def test_sequence_wise_loss_is_deepseek_v3s_per_sequence_with_padding_left_out():
    # groups of 4 tokens (group_size) inside sequences of 8: the loss follows sequences
    layer = balanced_layer(group_size=4, seq_aux_loss_coef=0.5, top_k=3)
    x = torch.randn(3, SEQ, 16)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, :] = 0  # a sequence without real tokens: left out of the mean
    layer.token_mask = mask
    layer.router.expert_bias.copy_(torch.tensor([0.3, 0.0, -0.2, 0.1]))
    layer(x)
    record = layer.last_routing
    routing = layer.router.route(x.reshape(-1, 4, 16), layer.sizes,
                                 valid=mask.bool().reshape(-1, 4))
    expected = direct_seq_loss(routing.router_probs, routing.expert_index, mask.bool(), SEQ)
    torch.testing.assert_close(record.seq_balance_loss, expected)
    assert record.num_sequences == 2
    assert record.seq_balance_loss.requires_grad
    # weighted into aux_loss: alpha * lb + beta * z + gamma * seq
    c = layer.config
    torch.testing.assert_close(moeify.aux_loss(layer), c.aux_loss_coef * record.load_balancing_loss
                               + c.z_loss_coef * record.z_loss + 0.5 * expected)
    assert moeify.routing_stats(layer)[0].seq_balance_loss == pytest.approx(expected.item())
    # off (the default): not computed, 0, and not in aux_loss
    off = balanced_layer(group_size=4)
    off(x)
    assert float(off.last_routing.seq_balance_loss) == 0.0


def test_uniform_routing_gives_a_sequence_wise_loss_of_one():
    from moeify.switch.losses import sequence_balance_loss

    scores = torch.full((2, 4, 4), 0.25)
    index = torch.tensor([[[0, 1], [2, 3], [0, 1], [2, 3]]] * 2)
    loss = sequence_balance_loss(scores, index, num_experts=4, seq_len=4)
    assert float(loss) == pytest.approx(1.0)


def test_balance_experts_refuses_models_it_cannot_balance():
    plain = SwitchFFN(16, 32, MoEConfig(num_experts=4), seq_len=SEQ)
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    with pytest.raises(moeify.MoEError, match=r"bias_balancing is off .* "
                                              r"MoEConfig.bias_balancing=True"):
        moeify.balance_experts(plain, optimizer)
    with pytest.raises(moeify.MoEError, match="no Switch layers"):
        moeify.balance_experts(nn.Linear(2, 2), optimizer)
    layer = balanced_layer()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    moeify.balance_experts(layer, optimizer)
    with pytest.raises(moeify.MoEError, match="already balanced"):
        moeify.balance_experts(layer, optimizer)
    copy = deepcopy(layer)  # a copy counts into its own buffer but is not attached
    moeify.balance_experts(copy, torch.optim.SGD(copy.parameters(), lr=0.1))
    with pytest.raises(moeify.MoEError, match="keeps its bias_balancing"):
        layer.config = layer.config.replace(bias_balancing=False)
    with pytest.raises(moeify.MoEError, match="keeps its bias_balancing"):
        plain.config = plain.config.replace(bias_balancing=True)


def test_the_bias_stays_float32_through_dtype_casts():
    layer = balanced_layer()
    layer.router.expert_bias.copy_(torch.tensor([1e-3, 2e-3, -1e-3, 1.0]))
    layer.to(torch.bfloat16)
    assert layer.router.expert_bias.dtype == torch.float32
    assert layer.router.expert_bias.tolist() == pytest.approx([1e-3, 2e-3, -1e-3, 1.0])


def test_default_layers_have_no_bias_in_their_state():
    layer = SwitchFFN(16, 32, MoEConfig(num_experts=4), seq_len=SEQ)
    assert sorted(layer.state_dict()) == ["experts.w_in", "experts.w_out", "router.weight"]
    assert list(layer.buffers()) == []


def converted_llama(**options):
    torch.manual_seed(0)
    model = models.llama(layers=2)
    config = MoEConfig(num_experts=4, top_k=2, scoring="sigmoid", bias_balancing=True,
                       **options)
    moeify.convert(model, config, seq_len=SEQ)
    return model


def test_a_trained_bias_survives_save_and_load(tmp_path):
    model = converted_llama(routed_scaling=2.0)
    layers = moeify.switch_layers(model)
    for i, (_, layer) in enumerate(layers):
        layer.router.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3, -0.4]) * (i + 1))
    moeify.save(model, tmp_path / "ckpt")
    again = moeify.load(tmp_path / "ckpt")
    for (name, layer), (_, loaded) in zip(layers, moeify.switch_layers(again)):
        assert torch.equal(loaded.router.expert_bias, layer.router.expert_bias), name
        assert loaded.router.expert_bias.dtype == torch.float32
    ids = torch.randint(2, models.VOCAB, (2, SEQ))
    assert torch.equal(again(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    # loaded, it trains on: the loads count from balance_experts on
    optimizer = torch.optim.SGD(again.parameters(), lr=0.0)
    moeify.balance_experts(again, optimizer)
    again.train()(input_ids=ids)
    optimizer.step()
    moved = moeify.switch_layers(again)[0][1].router.expert_bias
    assert not torch.equal(moved, layers[0][1].router.expert_bias)


def test_cli_convert_writes_the_routing_options_and_a_checkpoint_that_loads(tmp_path,
                                                                              moeify_main):
    torch.manual_seed(0)
    models.llama(layers=2).save_pretrained(tmp_path / "dense")
    out = tmp_path / "moe"
    result = moeify_main("convert", tmp_path / "dense", "--out", out, "--experts", "4",
                         "--top-k", "2", "--scoring", "sigmoid", "--bias-balancing",
                         "--bias-rate", "0.01", "--seq-aux-loss-coef", "1e-4",
                         "--routed-scaling", "2.5", "--seq-len", str(SEQ))
    assert result.returncode == 0, result.stderr
    text = " ".join((result.stdout + result.stderr).split())
    assert ("sigmoid scores; routed output scaled by 2.5; auxiliary-loss-free bias balancing "
            "at rate 0.01 per optimizer step (moeify.balance_experts); sequence-wise balance "
            "loss weight 0.0001") in text
    config = json.loads((out / "moeify.json").read_text())["plan"]["config"]
    assert (config["scoring"], config["bias_balancing"], config["bias_update_rate"],
            config["seq_aux_loss_coef"]) == ("sigmoid", True, 0.01, 1e-4)
    model = moeify.load(out)
    layer = moeify.switch_layers(model)[0][1]
    assert layer.router.expert_bias.tolist() == [0.0] * 4
    assert layer.router.routed_scaling == 2.5 and layer.router.seq_balance
    # the streamed write equals an in-memory conversion of the same dense model
    dense = transformers_model(tmp_path / "dense")
    moeify.convert(dense, model_config(out), seq_len=SEQ)
    for (name, tensor), other in zip(dense.state_dict().items(), model.state_dict().values()):
        assert torch.equal(tensor, other), name


def transformers_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path)


def model_config(checkpoint) -> MoEConfig:
    return moeify.io.checkpoint.read_meta(checkpoint).config


@pytest.mark.parametrize("router", ["token-choice", "expert-choice"])
def test_routed_scaling_multiplies_the_layers_output_under_either_router(router):
    config = MoEConfig(num_experts=4, router=router, jitter_eps=0.0)
    torch.manual_seed(0)
    plain = SwitchFFN(16, 32, config, seq_len=SEQ).eval()
    scaled = SwitchFFN(16, 32, config.replace(routed_scaling=2.5), seq_len=SEQ).eval()
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(3, SEQ, 16)
    torch.testing.assert_close(scaled(x), 2.5 * plain(x))
    plain.config = plain.config.replace(routed_scaling=2.5)  # reconfigurable on a built layer
    torch.testing.assert_close(plain(x), scaled(x))


def test_a_non_finite_bias_is_refused_at_load(tmp_path):
    model = converted_llama()
    name, layer = moeify.switch_layers(model)[0]
    layer.router.expert_bias[1] = float("nan")
    moeify.save(model, tmp_path / "ckpt")
    with pytest.raises(moeify.MoEError, match=rf"{name}.router.expert_bias .* non-finite"):
        moeify.load(tmp_path / "ckpt")
