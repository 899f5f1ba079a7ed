"""Shared experts (MoEConfig.shared_experts, shared_gate): the module, upcycling at any G,
routed scaling, verification, checkpoints, streaming, training and ONNX export."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

import moeify
from moeify import MoEConfig
from moeify.errors import MoEError
from moeify.switch import SwitchFFN
from moeify.switch.shared import SharedExperts
from moeify.verify import check_dense_identity, check_upcycled_weights
from tests import models

SEQ = 12


def outputs(model, ids, **kwargs):
    if model.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = ids
    with torch.no_grad():
        out = model(input_ids=ids, **kwargs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def ids(batch=3, seed=1):
    return torch.randint(2, models.VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def converted(build, **config):
    """(dense, converted copy, conversion result) for ``MoEConfig(**config)``."""
    torch.manual_seed(0)
    dense = build().eval()
    moe = copy.deepcopy(dense)
    result = moeify.convert(moe, MoEConfig(**config))
    return dense, moe, result


# --- the module ----------------------------------------------------------------------------


def test_a_layer_without_shared_experts_has_none_and_no_new_tensors():
    layer = SwitchFFN(16, 32, MoEConfig(num_experts=4), seq_len=8)
    assert layer.shared_experts is None
    assert not any("shared" in name for name in layer.state_dict())


def test_shared_experts_are_one_ffn_n_expert_widths_wide_with_an_optional_gate():
    config = MoEConfig(num_experts=4, shared_experts=3, shared_gate=True)
    layer = SwitchFFN(16, 8, config, seq_len=6, activation="silu", gated=True, bias=True)
    shapes = {n: tuple(t.shape) for n, t in layer.state_dict().items() if "shared" in n}
    assert shapes == {
        "shared_experts.ffn.w_in": (1, 16, 24), "shared_experts.ffn.w_out": (1, 24, 16),
        "shared_experts.ffn.w_gate": (1, 16, 24), "shared_experts.ffn.b_in": (1, 24),
        "shared_experts.ffn.b_out": (1, 16), "shared_experts.ffn.b_gate": (1, 24),
        "shared_experts.gate.weight": (1, 16),
    }
    shared = layer.shared_experts
    assert shared.d_ff == 8 and not shared.gate.weight.any()  # sigmoid(0) = 1/2 at init
    x = torch.randn(2, 6, 16)
    layer.eval()
    routed = SwitchFFN(16, 8, config.replace(shared_experts=0, shared_gate=False), seq_len=6,
                       activation="silu", gated=True, bias=True, router=layer.router,
                       experts=layer.experts).eval()
    expected = routed(x) + 0.5 * shared.ffn(x.reshape(1, -1, 16)).reshape(2, 6, 16)
    torch.testing.assert_close(layer(x), expected)
    assert "shared_experts=3, shared_gate" in repr(layer)


def test_shared_experts_that_do_not_fit_the_layer_are_refused():
    config = MoEConfig(num_experts=4, shared_experts=2)
    with pytest.raises(MoEError, match="d_ff 4 != 8"):
        SwitchFFN(16, 8, config, shared_experts=SharedExperts(2, 16, 4))
    with pytest.raises(MoEError, match="gate True != False"):
        SwitchFFN(16, 8, config, shared_experts=SharedExperts(2, 16, 8, gate=True))
    with pytest.raises(MoEError, match="none were given|has none"):
        SwitchFFN(16, 8, MoEConfig(num_experts=4), shared_experts=SharedExperts(2, 16, 8))
    layer = SwitchFFN(16, 8, config)
    with pytest.raises(MoEError, match="keeps its shared_experts"):
        layer.config = config.replace(shared_experts=4)
    with pytest.raises(MoEError, match="keeps its shared_gate"):
        layer.config = config.replace(shared_gate=True)
    layer.config = config.replace(expert_dropout=0.3)  # the shared experts follow
    assert layer.shared_experts.ffn.dropout == 0.3


def test_padding_tokens_get_the_shared_output_alone():
    """Padding takes no routed slot (routed output 0) but the always-on shared experts
    run every token, as Qwen2-MoE's do."""
    torch.manual_seed(0)
    layer = SwitchFFN(16, 8, MoEConfig(num_experts=4, shared_experts=1), seq_len=6).eval()
    x = torch.randn(2, 6, 16)
    layer.token_mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    y = layer(x)
    shared = layer.shared_experts(x)
    torch.testing.assert_close(y[1, 3:], shared[1, 3:])
    assert (y[1, :3] - shared[1, :3]).abs().max() > 1e-3  # real tokens: routed + shared


# --- upcycling -----------------------------------------------------------------------------

IDENTITY = {
    # name: (model, config): with the normalized gate and room for every token, the
    # converted model computes the dense one at init
    "N1": (models.llama, dict(shared_experts=1)),
    "N1 gate": (models.llama, dict(shared_experts=1, shared_gate=True)),
    "N2 G1 (x1/3)": (models.gpt2, dict(shared_experts=2)),
    "N2 G2": (models.llama, dict(shared_experts=2, granularity=2, top_k=2)),
    "N2 G2 gate": (models.gpt2, dict(shared_experts=2, granularity=2, top_k=2, shared_gate=True)),
    "N4 G4": (models.llama, dict(shared_experts=4, granularity=4, top_k=4)),
    "N4 G4 gate": (models.llama, dict(shared_experts=4, granularity=4, top_k=4, shared_gate=True)),
    "N4 G2 gate": (models.t5, dict(shared_experts=4, granularity=2, top_k=2, shared_gate=True)),
    "N1 routed scaling 2.5": (models.gpt2, dict(shared_experts=1, routed_scaling=2.5)),
    "routed scaling 2.5": (models.llama, dict(routed_scaling=2.5, top_k=2)),
    "N2 G2 sigmoid": (models.llama, dict(shared_experts=2, granularity=2, top_k=2,
                                         scoring="sigmoid", shared_gate=True)),
    "N1 expert choice": (models.bert, dict(shared_experts=1, router="expert-choice")),
}


@pytest.mark.parametrize("case", sorted(IDENTITY))
def test_the_upcycled_layer_is_the_dense_ffn_at_init(case):
    build, config = IDENTITY[case]
    gate = {} if config.get("router") else {"gate": "normalized"}
    dense, moe, _ = converted(lambda: build(layers=2), num_experts=8, dropless="router" not in
                              config, **gate, **config)
    if "router" in config:  # each expert takes every token, whose scores sum to 1
        for _, layer in moeify.switch_layers(moe):
            layer.config = layer.config.replace(eval_capacity_factor=8.0)
            layer.set_tokens_per_group(None)
    expected = outputs(dense, ids())
    assert (outputs(moe, ids()) - expected).abs().max() <= 1e-5 * max(1, expected.abs().max())


def test_upcycled_shared_experts_are_copies_of_the_dense_ffn_and_every_output_is_scaled():
    """N = 4, G = 2, gated: c = G / (N + G) = 1/3; routed slices x G x c, shared experts 2
    copies side by side, w_out x 2c (the gate's 1/2), b_out x 2c x N / G."""
    dense, moe, result = converted(lambda: models.gpt2(layers=2), num_experts=8, top_k=2,
                                   granularity=2, shared_experts=4, shared_gate=True)
    (path, layer), = moeify.switch_layers(moe)
    weights = next(s for s in result.plan.selected_sites if s.path == path).dense_weights(dense)
    f = weights.w_in.shape[1]
    c = 2 / 6
    shared = layer.shared_experts.ffn
    assert shared.w_in.shape == (1, 16, 2 * f)
    assert torch.equal(shared.w_in[0], torch.cat([weights.w_in] * 2, dim=1))
    assert torch.equal(shared.b_in[0], torch.cat([weights.b_in] * 2))
    assert torch.equal(shared.w_out[0], torch.cat([weights.w_out] * 2) * (2 * c))
    assert torch.equal(shared.b_out[0], weights.b_out * (2 * c * 2))
    assert not layer.shared_experts.gate.weight.any()
    for e in range(8):
        part = slice((e % 2) * f // 2, (e % 2 + 1) * f // 2)
        assert torch.equal(layer.experts.w_in[e], weights.w_in[:, part])
        assert torch.equal(layer.experts.w_out[e], 2 * weights.w_out[part] * c)
        assert torch.equal(layer.experts.b_out[e], weights.b_out * c)
    assert check_upcycled_weights(moe, dense).status == "pass"
    text = result.report.experts_init
    assert "4 shared experts (always on; 2 copies of the dense FFN, slices j % 2)" in text
    assert "output projections x 1/3 (G/(N+G))" in text and "shared_expert_gate" in text


def test_routed_scaling_divides_the_routed_output_projections():
    dense, moe, result = converted(lambda: models.llama(layers=2), num_experts=4,
                                   routed_scaling=2.5)
    (path, layer), = moeify.switch_layers(moe)
    weights = next(s for s in result.plan.selected_sites if s.path == path).dense_weights(dense)
    assert torch.equal(layer.experts.w_out[3], weights.w_out * (1 / 2.5))
    assert torch.equal(layer.experts.w_in[3], weights.w_in)
    assert "routed output projections /2.5 (routed scaling)" in result.report.experts_init
    assert check_upcycled_weights(moe, dense).status == "pass"


def test_random_init_draws_fresh_shared_experts_at_the_papers_scale():
    dense, moe, result = converted(lambda: models.gpt2(layers=2, n_inner=400),
                                   num_experts=4, init="random", shared_experts=2,
                                   shared_gate=True, routed_scaling=2.0)
    (_, layer), = moeify.switch_layers(moe)
    shared = layer.shared_experts
    for name, fan_in in (("w_in", 16), ("w_out", 800)):
        std = float(getattr(shared.ffn, name).detach().std())
        assert abs(std / math.sqrt(0.1 / fan_in) - 0.88) < 0.1, name  # truncated at 2 std
    assert not shared.gate.weight.any() and not shared.ffn.b_out.any()
    assert result.report.experts_init == ("fresh random weights; 2 shared experts (always on), "
                                          "fresh; shared output gated by sigmoid(x . w) "
                                          "(Qwen2-MoE's shared_expert_gate), w = 0 at init")
    assert check_dense_identity(moe, dense, None).status == "skip"
    again = copy.deepcopy(dense)
    moeify.convert(again, result.plan.config)  # seeded by the config's seed and the path
    assert torch.equal(moeify.switch_layers(again)[0][1].shared_experts.ffn.w_in, shared.ffn.w_in)


def test_drop_upcycling_re_initializes_routed_experts_only():
    dense, moe, result = converted(lambda: models.llama(layers=2), num_experts=4, init="drop",
                                   shared_experts=1)
    (path, layer), = moeify.switch_layers(moe)
    weights = next(s for s in result.plan.selected_sites if s.path == path).dense_weights(dense)
    assert torch.equal(layer.shared_experts.ffn.w_in[0], weights.w_in)
    assert torch.equal(layer.shared_experts.ffn.w_out[0], weights.w_out / 2)
    assert not torch.equal(layer.experts.w_in[0], weights.w_in)


def test_fine_grained_with_shared_experts_on_a_llama_is_the_dense_model():
    """He et al.'s 64 experts, top-8, G = 8, with 8 shared experts (one copy of the dense
    FFN in slices of d_ff / 8): c = 1/2."""
    dense, moe, _ = converted(lambda: models.llama(layers=2), num_experts=64, top_k=8,
                              granularity=8, shared_experts=8, dropless=True)
    expected = outputs(dense, ids())
    assert (outputs(moe, ids()) - expected).abs().max() <= 1e-5
    (_, layer), = moeify.switch_layers(moe)
    assert layer.experts.d_ff == 5 and layer.shared_experts.ffn.d_ff == 40
    assert check_dense_identity(moe, dense, None).status == "pass"


def test_the_plan_counts_shared_experts_as_active_for_every_token():
    _, moe, result = converted(lambda: models.llama(layers=2), num_experts=8, top_k=2,
                               shared_experts=2, shared_gate=True)
    plan = result.plan
    assert plan.params_moe == sum(p.numel() for p in moe.parameters())
    (_, layer), = moeify.switch_layers(moe)
    per_token = (plan.params_moe - layer.experts.w_in.numel() * 3 // 8 * 6)  # 6 of 8 idle
    assert plan.active_params_per_token == per_token
    site = next(s for s in result.report.sites if s.selected)
    assert site.moe_params == sum(p.numel() for p in layer.parameters())
    named = [(n, tuple(p.shape)) for n, p in moe.named_parameters()]
    assert [(p.name, p.shape) for p in plan.sharding.params] == named
    assert not any(p.sharded for p in plan.sharding.params if "shared" in p.name)


# --- verification ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    dict(top_k=2, shared_experts=1, shared_gate=True),
    dict(top_k=2, granularity=2, shared_experts=2, scoring="sigmoid"),
    dict(top_k=2, granularity=2, shared_experts=4, shared_gate=True, routed_scaling=2.5),
], ids=["N1 gate", "N2 G2 sigmoid", "N4 G2 gate scaling"])
def test_verify_checks_the_dense_identity_and_weights_of_a_softmax_gate_model(config):
    """The model as converted (default gate, default capacity): `verify` gives every layer
    the normalized gate and room for every token, and the model is the dense one."""
    dense, moe, _ = converted(lambda: models.llama(layers=2), num_experts=8, **config)
    check = check_dense_identity(moe, dense, SEQ)
    assert check.status == "pass", check.detail
    assert check_upcycled_weights(moe, dense).status == "pass"


def test_verify_finds_a_shared_expert_or_gate_that_is_not_the_upcycled_one():
    dense, moe, _ = converted(lambda: models.llama(layers=2), num_experts=4, shared_experts=1,
                              shared_gate=True)
    assert check_upcycled_weights(moe, dense).status == "pass"
    assert check_dense_identity(moe, dense, None).status == "pass"
    (path, layer), = moeify.switch_layers(moe)
    shared = layer.shared_experts
    upcycled = shared.ffn.w_out.detach().clone()
    with torch.no_grad():
        shared.ffn.w_out.mul_(1.01)
    check = check_upcycled_weights(moe, dense)
    assert check.status == "fail" and f"{path}.shared_experts.ffn.w_out" in check.detail
    assert check_dense_identity(moe, dense, None).status == "fail"
    with torch.no_grad():
        shared.ffn.w_out.copy_(upcycled)
        shared.gate.weight.fill_(0.5)
    check = check_upcycled_weights(moe, dense)
    assert check.status == "fail" and f"{path}.shared_experts.gate.weight" in check.detail


def test_cli_convert_with_a_gated_shared_expert_then_verify_passes(tmp_path, moeify_main):
    torch.manual_seed(0)
    models.llama(layers=2).save_pretrained(tmp_path / "llama")
    out = tmp_path / "moe"
    result = moeify_main("convert", tmp_path / "llama", "--experts", 8, "--top-k", 2,
                         "--shared-experts", 1, "--shared-gate", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "1 shared expert (always on; 1 copy of the dense FFN)" in result.stderr
    result = moeify_main("verify", out, "--json")
    assert result.returncode == 0, result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    for name in ("integrity", "reload", "upcycled weights", "dense identity"):
        assert checks[name]["status"] == "pass", checks[name]
    assert "shared experts (1): 1 copy of it" in checks["upcycled weights"]["detail"]


def test_a_bf16_checkpoint_with_an_inexact_scale_is_compared_at_bf16_precision(tmp_path):
    """x 1/3 rounds in bfloat16: routed + shared no longer hold the dense weights' exact
    values, so the float32 identity takes bfloat16's tolerance and says why."""
    torch.manual_seed(0)
    dense = models.gpt2(layers=2).to(torch.bfloat16).eval()
    moe = copy.deepcopy(dense)
    moeify.convert(moe, MoEConfig(num_experts=4, shared_experts=2))
    check = check_dense_identity(moe, dense, None)
    assert check.status == "pass" and "x 0.333333, rounded in bfloat16" in check.detail
    assert "eps(bfloat16)" in check.detail


# --- checkpoints, streaming, training -------------------------------------------------------


def test_streamed_conversion_writes_what_convert_and_save_write(tmp_path):
    config = MoEConfig(num_experts=8, top_k=2, granularity=2, shared_experts=2,
                       shared_gate=True, routed_scaling=2.0)
    torch.manual_seed(0)
    dense = models.gpt2(layers=2).eval()
    moe = copy.deepcopy(dense)
    moeify.convert(moe, config, seq_len=SEQ)
    moeify.save(moe, tmp_path / "saved")
    streamed = copy.deepcopy(dense)
    moeify.write(streamed, tmp_path / "streamed", plan=moeify.plan(streamed, config, seq_len=SEQ))
    a, b = moeify.load(tmp_path / "saved"), moeify.load(tmp_path / "streamed")
    state = b.state_dict()
    assert any("shared_experts.gate" in n for n in state)
    assert all(torch.equal(t, state[n]) for n, t in a.state_dict().items())
    assert torch.equal(outputs(a, ids()), outputs(moe, ids()))


def test_a_checkpoint_round_trip_keeps_the_shared_experts(tmp_path):
    _, moe, _ = converted(lambda: models.t5(gated=True, layers=2), num_experts=4,
                          shared_experts=1, shared_gate=True)
    (_, layer), *_ = moeify.switch_layers(moe)
    with torch.no_grad():  # a trained gate: not the init the loader could rebuild
        layer.shared_experts.gate.weight.normal_()
    moeify.save(moe, tmp_path / "ck")
    loaded = moeify.load(tmp_path / "ck")
    assert torch.equal(outputs(loaded, ids()), outputs(moe, ids()))
    assert moeify.switch_layers(loaded)[0][1].shared_experts.gate is not None


def test_a_training_step_reaches_the_shared_experts_and_their_gate():
    _, model, _ = converted(lambda: models.gpt2(layers=2), num_experts=4, shared_experts=1,
                            shared_gate=True, expert_dropout=0.1)
    model.train()
    x = ids(4)
    loss = model(input_ids=x, labels=x).loss + moeify.aux_loss(model)
    loss.backward()
    (_, layer), = moeify.switch_layers(model)
    for name, param in layer.shared_experts.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the grouped kernels' path
        model(input_ids=x, labels=x).loss.backward()


# --- ONNX ------------------------------------------------------------------------------------


@pytest.mark.parametrize("moe_op", ["static", "ort"])
@pytest.mark.parametrize("name, build", [("llama swiglu", models.llama),
                                         ("gpt2 gelu_tanh, biases", models.gpt2)])
def test_onnx_runtime_equals_pytorch(name, build, moe_op, tmp_path):
    from moeify.onnx import OnnxRunner

    torch.manual_seed(0)
    model = build(layers=2).eval()
    moeify.convert(model, MoEConfig(num_experts=4, eval_capacity_factor=1.0, min_capacity=1,
                                    shared_experts=2, shared_gate=True), seq_len=SEQ)
    for _, layer in moeify.switch_layers(model):  # drops, and a gate that is not 1/2
        torch.nn.init.normal_(layer.router.weight, std=2.0)
        torch.nn.init.normal_(layer.shared_experts.gate.weight)
    path = tmp_path / "m.onnx"
    metadata = moeify.export_onnx(model, path, seq_len=SEQ, moe_op=moe_op)
    if moe_op == "ort":
        assert metadata["moe_op"] == "com.microsoft.MoE in 1 of 1 expert layers"
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x, use_cache=False).logits.numpy()
    assert max(float(s.dropped_fraction) for s in moeify.routing_stats(model)) > 0.1
    assert np.abs(OnnxRunner(path).run(input_ids=x) - expected).max() <= 1e-4


@pytest.mark.parametrize("moe_op", ["static", "ort"])
def test_generation_graphs_give_generate_greedy_tokens(moe_op, tmp_path):
    """Prefill and decode graphs with a KV cache: the shared experts run on the one new
    token per step, the padding of left-padded prompts included."""
    from moeify.onnx import OnnxGenerator, export_generation
    from tests.onnx._cases import PROMPTS, padded

    torch.manual_seed(0)
    model = models.llama(layers=2).eval()
    moeify.convert(model, MoEConfig(num_experts=4, top_k=2, shared_experts=1, shared_gate=True))
    for _, layer in moeify.switch_layers(model):
        torch.nn.init.normal_(layer.shared_experts.gate.weight)
    export_generation(model, tmp_path / "g", seq_len=SEQ, moe_op=moe_op)
    prompts, mask = padded(PROMPTS, True)
    with torch.no_grad():
        expected = model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=4,
                                  do_sample=False).numpy()
    got = OnnxGenerator(tmp_path / "g").generate(PROMPTS, max_new_tokens=4)
    np.testing.assert_array_equal(got, expected)
