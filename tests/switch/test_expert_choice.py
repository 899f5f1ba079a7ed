"""Expert choice routing (Zhou et al. 2022): a loop reference, padding, static shapes,
the causal refusals, T5's mixed layers, save/load, exports and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import moeify
from moeify import MoEConfig, RouterKind, SwitchFFN
from moeify.config import ConfigError, expert_capacity
from moeify.switch import route_expert_choice
from tests import models
from _reference import expert_ffn

SEQ = 12
EC = dict(router="expert-choice", jitter_eps=0.0, expert_dropout=0.0)


def reference_expert_choice(layer, x, valid=None):
    """The layer's function written as loops: for each group and expert, torch.topk of
    that expert's softmax scores over the group's real tokens; the first
    capacity(real tokens) of them processed, weighted by the expert's score.

    Returns (y [G, T, d], tokens per expert [E], fraction of real tokens no expert chose).
    """
    c = layer.config
    G, T, _ = x.shape
    E = c.num_experts
    C = c.capacity(T, training=layer.training)
    factor = c.capacity_factor if layer.training else c.eval_capacity_factor
    y = torch.zeros_like(x)
    tokens_per_expert = [0] * E
    chosen = torch.zeros(G, T, dtype=torch.bool)
    for g in range(G):
        real = torch.ones(T, dtype=torch.bool) if valid is None else valid[g]
        n_real = int(real.sum())
        capacity = C if valid is None else (
            0 if n_real == 0 else expert_capacity(n_real, num_experts=E, capacity_factor=factor,
                                                  min_capacity=c.min_capacity))
        probs = torch.softmax(x[g] @ layer.router.weight.T, dim=-1)  # [T, E]
        for e in range(E):
            scores = torch.where(real, probs[:, e], torch.tensor(float("-inf"), dtype=x.dtype))
            top = torch.topk(scores, C)
            for slot in range(capacity):
                t = int(top.indices[slot])
                assert real[t]
                y[g, t] = y[g, t] + probs[t, e] * expert_ffn(layer.experts, e, x[g, t])
                tokens_per_expert[e] += 1
                chosen[g, t] = True
    n = G * T if valid is None else int(valid.sum())
    return y, tokens_per_expert, 1.0 - int(chosen.sum()) / max(n, 1)


def make_layer(seed=0, **config):
    torch.manual_seed(seed)
    config = MoEConfig(**{"num_experts": 4, "min_capacity": 1, **EC, **config})
    layer = SwitchFFN(8, 16, config, seq_len=SEQ, bias=True, dtype=torch.float64)
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)
    return layer


MASK = torch.tensor([[1] * 12, [1] * 7 + [0] * 5, [1] * 2 + [0] * 10, [0] * 12])


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_outputs_gradients_and_statistics_match_the_loop_reference(training, padded):
    layer = make_layer(capacity_factor=0.5, eval_capacity_factor=1.0).train(training)
    x = torch.randn(4, SEQ, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    valid = MASK.bool() if padded else None
    layer.token_mask = MASK if padded else None
    x_layer, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(x_layer)
    record = layer.last_routing
    params = [layer.router.weight, layer.experts.w_in, layer.experts.w_out,
              layer.experts.b_in, layer.experts.b_out]
    probe = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((y * probe).sum(), params + [x_layer])
    y_ref, tokens_ref, unchosen_ref = reference_expert_choice(layer, x_ref, valid)
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), params + [x_ref])
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for got, expected in zip(grads, grads_ref):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert record.tokens_per_expert.tolist() == tokens_ref
    assert float(record.dropped_fraction) == pytest.approx(unchosen_ref)
    assert record.num_tokens == (int(MASK.sum()) if padded else 4 * SEQ)
    assert record.expert_capacity == layer.expert_capacity
    assert float(record.load_balancing_loss) == 0.0 and record.z_loss.requires_grad
    assert unchosen_ref > 0  # as many slots as tokens (eval): others got several experts


def test_every_expert_takes_exactly_c_distinct_tokens_of_every_group():
    layer = make_layer(eval_capacity_factor=1.0).eval()
    x = torch.randn(5, SEQ, 8, dtype=torch.float64)
    C = layer.expert_capacity
    assert C == 3  # ceil(1.0 * 12 / 4)
    routing = route_expert_choice(layer.router(x), expert_capacity=C)
    assert routing.token_index.shape == (5, 4, C) and bool(routing.kept.all())
    for g in range(5):
        for e in range(4):
            assert len(set(routing.token_index[g, e].tolist())) == C
    layer(x)
    assert layer.last_routing.tokens_per_expert.tolist() == [5 * C] * 4


def test_no_padding_token_is_ever_chosen_and_padding_gets_zero():
    layer = make_layer(eval_capacity_factor=4.0).eval()  # C = T: room for every token
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        mask = (torch.rand(6, SEQ, generator=generator) < 0.5).long()
        mask[0] = 0  # a group without real tokens
        layer.token_mask = mask
        x = torch.randn(6, SEQ, 8, dtype=torch.float64, generator=generator)
        y = layer(x)
        valid = mask.bool()
        capacity = layer._group_capacities(valid)
        routing = route_expert_choice(layer.router(x), expert_capacity=layer.expert_capacity,
                                      group_capacity=capacity, valid=valid)
        slot_tokens_real = valid.gather(1, routing.token_index.flatten(1)).view_as(routing.kept)
        assert bool(slot_tokens_real[routing.kept].all())
        assert bool((y[~valid] == 0).all())
        per_group = routing.kept.sum(dim=(1, 2))  # every expert takes all real tokens
        assert per_group.tolist() == (valid.sum(1) * 4).tolist()
        assert float(layer.last_routing.dropped_fraction) == 0.0


def test_a_padded_sequence_routes_as_it_does_alone():
    layer = make_layer().eval()
    layer.set_tokens_per_group(None)  # capacity per call: sequences of any length
    x = torch.randn(2, SEQ, 8, dtype=torch.float64)
    layer.token_mask = torch.tensor([[1] * 12, [1] * 8 + [0] * 4])
    padded = layer(x)
    layer.token_mask = None
    alone = layer(x[1:, :8])
    torch.testing.assert_close(padded[1, :8], alone[0], rtol=1e-12, atol=1e-12)


def test_traced_and_compiled_layers_match_eager():
    layer = make_layer(eval_capacity_factor=1.0).eval().float()
    x = torch.randn(3, SEQ, 8)
    traced = torch.fx.symbolic_trace(layer)  # one graph: no shape read from the input
    torch.testing.assert_close(traced(x), layer(x), rtol=0, atol=0)
    layer.token_mask = torch.tensor([[1] * 12, [1] * 9 + [0] * 3, [1] * 12])
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"top_k": 2}, r"top_k=2 has no role with MoEConfig.router='expert-choice'.*top_k=1"),
    ({"dropless": True}, r"dropless=True computes every choice.*expert-choice"),
    ({"gate": "normalized"}, r"gate='normalized' is a token-choice option.*gate='softmax'"),
    ({"router": "experts"}, r"router='experts' is not one of 'token-choice', 'expert-choice'"),
])
def test_config_refuses_what_expert_choice_cannot_mean(changes, message):
    with pytest.raises(ConfigError, match=message):
        MoEConfig(**{"router": "expert-choice", **changes})


def test_config_round_trips_the_router():
    config = MoEConfig(router="expert-choice")
    assert config.router is RouterKind.EXPERT_CHOICE
    assert config.to_dict()["router"] == "expert-choice"
    assert MoEConfig.from_json(config.to_json()) == config
    assert MoEConfig().router is RouterKind.TOKEN_CHOICE
    # C = ceil(capacity_factor * T / E): top_k's place taken by the capacity factor
    assert config.capacity(64, training=True) == 10 and config.capacity(64, training=False) == 16


# --- conversion ---------------------------------------------------------------------------

CONVERT = MoEConfig(num_experts=4, router="expert-choice")


@pytest.mark.parametrize("build", [models.gpt2, models.llama])
def test_decoder_only_models_are_refused(build):
    with pytest.raises(moeify.MoEError, match="every selected site is causal.*future tokens"):
        moeify.convert(build(layers=2), CONVERT, seq_len=SEQ)
    with pytest.raises(moeify.MoEError, match="causal"):
        moeify.inspect(build(layers=2), CONVERT)


def test_t5_routes_by_expert_choice_in_the_encoder_and_token_choice_in_the_decoder(tmp_path):
    torch.manual_seed(0)
    model = models.t5(layers=2).eval()
    result = moeify.convert(model, CONVERT, seq_len=SEQ)
    routers = {name: layer.config.router.value for name, layer in moeify.switch_layers(model)}
    assert routers == {"encoder.block.1.layer.1.DenseReluDense": "expert-choice",
                       "decoder.block.1.layer.2.DenseReluDense": "token-choice"}
    causal = {s.path: s.causal for s in result.plan.sites}
    assert [p for p, c in causal.items() if c] == ["decoder.block.0.layer.2.DenseReluDense",
                                                    "decoder.block.1.layer.2.DenseReluDense"]
    report = result.report
    assert ("router: expert choice in encoder.block.*.layer.*.DenseReluDense (1 layer): "
            "each expert takes its top-C tokens of a group; token choice in "
            "decoder.block.*.layer.*.DenseReluDense (1 layer, causal: an expert would choose "
            "among future tokens)") in str(report)
    assert [s.router for s in report.sites] == [None, "expert-choice", None, "token-choice"]
    assert moeify.ConversionPlan.from_json(result.plan.to_json()) == result.plan

    inputs = dict(input_ids=torch.randint(2, 60, (2, SEQ)),
                  attention_mask=torch.tensor([[1] * 12, [1] * 9 + [0] * 3]),
                  decoder_input_ids=torch.randint(2, 60, (2, SEQ)))
    with torch.no_grad():
        expected = model(**inputs).logits
    stats = {s.name: s for s in moeify.routing_stats(model)}
    encoder = stats["encoder.block.1.layer.1.DenseReluDense"]
    assert encoder.router == "expert-choice" and encoder.load_balancing_loss == 0.0
    assert encoder.num_tokens == 21 and 0 <= encoder.dropped_fraction < 1
    assert stats["decoder.block.1.layer.2.DenseReluDense"].router == "token-choice"

    moeify.save(model, tmp_path / "ckpt")
    loaded = moeify.load(tmp_path / "ckpt").eval()
    assert {n: l.config.router.value for n, l in moeify.switch_layers(loaded)} == routers
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)


def test_aux_loss_of_expert_choice_layers_is_the_z_loss_alone():
    model = models.bert(layers=2).eval()
    moeify.convert(model, CONVERT, seq_len=SEQ)
    model(input_ids=torch.randint(2, 60, (2, SEQ)))
    (layer,) = [layer for _, layer in moeify.switch_layers(model)]
    record = layer.last_routing
    torch.testing.assert_close(moeify.aux_loss(model), layer.config.z_loss_coef * record.z_loss)
    assert record.tokens_per_expert.tolist() == [2 * layer.expert_capacity] * 4


def test_undeclared_t5_generates_with_an_expert_choice_encoder():
    model = models.t5(layers=2).eval()
    moeify.convert(model, CONVERT)  # capacity per call
    out = model.generate(input_ids=torch.randint(2, 60, (2, 7)), max_new_tokens=3,
                         do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= 4


def test_distill_merges_expert_choice_experts_back_to_the_dense_model():
    torch.manual_seed(0)
    dense = models.t5(layers=2).eval()
    model = models.t5(layers=2).eval()
    model.load_state_dict(dense.state_dict())
    moeify.convert(model, CONVERT, seq_len=SEQ)
    student = moeify.distill(model).eval()
    inputs = dict(input_ids=torch.randint(2, 60, (1, SEQ)),
                  decoder_input_ids=torch.randint(2, 60, (1, SEQ)))
    with torch.no_grad():
        torch.testing.assert_close(student(**inputs).logits, dense(**inputs).logits)


# --- exports that cannot represent expert choice ------------------------------------------


def test_hf_formats_refuse_expert_choice(tmp_path):
    from moeify.hf import decoder_moe
    from moeify.hf.switch_transformers import save_hf_switch

    model = models.t5(layers=2).eval()
    with pytest.raises(moeify.MoEError, match="format='hf' is not possible.*token choice"):
        decoder_moe.target_config(decoder_moe.SWITCH_TRANSFORMERS, model, CONVERT)
    moeify.convert(model, CONVERT, seq_len=SEQ)
    with pytest.raises(moeify.MoEError, match="expert choice.*token choice"):
        save_hf_switch(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(moeify.MoEError, match="token choice"):
        decoder_moe.target_config(decoder_moe.MIXTRAL, models.llama(layers=2), CONVERT)


def test_expert_parallelism_refuses_expert_choice_layers():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from moeify.distributed import expert_parallel, parallelize

    model = models.bert(layers=2)
    moeify.convert(model, CONVERT, seq_len=SEQ)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(moeify.MoEError, match="routes by expert choice.*one process"):
            expert_parallel(model)
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "ep"))
        with pytest.raises(moeify.MoEError, match="routes by expert choice"):
            parallelize(model, mesh)
    finally:
        dist.destroy_process_group()
    assert all(type(layer) is SwitchFFN for _, layer in moeify.switch_layers(model))


@pytest.mark.parametrize("name, build", [("bert", lambda: models.bert(layers=2)),
                                         ("t5", lambda: models.t5(layers=2))])
def test_converted_models_export_to_onnx_and_match_onnx_runtime(name, build, tmp_path):
    from moeify.onnx import OnnxRunner
    from tests.onnx._cases import expert_shapes, random_inputs, reference

    torch.manual_seed(0)
    model = build().eval()
    config = MoEConfig(num_experts=4, router="expert-choice", eval_capacity_factor=1.0,
                       min_capacity=1)
    moeify.convert(model, config, seq_len=SEQ)
    path = tmp_path / f"{name}.onnx"
    metadata = moeify.export_onnx(model, path, seq_len=SEQ)
    assert metadata["router"] == "expert-choice" and metadata["expert_capacity"] == "3"
    import onnx

    graph = onnx.load(str(path))
    assert (4, "3*batch", 16) in expert_shapes(graph, 4)  # [E, G*C, d]: C a constant
    assert any(n.op_type == "TopK" for n in graph.graph.node)
    runner = OnnxRunner(path)
    for batch in (1, 3):
        inputs = random_inputs(runner.inputs, batch, seed=batch)
        expected = reference(model, inputs).numpy()
        stats = {s.router: s for s in moeify.routing_stats(model)}
        assert stats["expert-choice"].dropped_fraction > 0  # tokens no expert chose
        assert np.abs(runner.run(**inputs) - expected).max() <= 1e-4


# --- command line -------------------------------------------------------------------------


def test_cli_inspect_shows_the_router_and_refuses_top_k_2(moeify_cli):
    result = moeify_cli("inspect", "t5-small", "--router", "expert-choice", "--experts", "4")
    assert result.returncode == 0, result.stderr
    assert "router: expert choice in encoder.block.*.layer.*.DenseReluDense (3 layers)" in (
        " ".join(result.stderr.split()))
    result = moeify_cli("inspect", "t5-small", "--router", "expert-choice", "--top-k", "2")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "--top-k 2 has no role with --router 'expert-choice'" in result.stderr


def test_cli_convert_writes_an_expert_choice_checkpoint_and_refuses_hf_and_gpt2(tmp_path,
                                                                                moeify_cli):
    torch.manual_seed(0)
    models.t5(layers=2).save_pretrained(tmp_path / "t5")
    out = tmp_path / "moe"
    result = moeify_cli("convert", tmp_path / "t5", "--experts", "4", "--router", "expert-choice",
                        "--seq-len", SEQ, "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["config"]["router"] == "expert-choice"
    assert {s["path"]: s["router"] for s in report["sites"] if s["selected"]} == {
        "encoder.block.1.layer.1.DenseReluDense": "expert-choice",
        "decoder.block.1.layer.2.DenseReluDense": "token-choice"}
    loaded = moeify.load(out)
    assert [l.config.router.value for _, l in moeify.switch_layers(loaded)] == [
        "expert-choice", "token-choice"]
    result = moeify_cli("convert", tmp_path / "t5", "--router", "expert-choice", "--seq-len", SEQ,
                        "--format", "hf", "--out", tmp_path / "hf")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "--router expert-choice has no HF counterpart" in result.stderr
    models.gpt2(layers=2).save_pretrained(tmp_path / "gpt2")
    result = moeify_cli("convert", tmp_path / "gpt2", "--router", "expert-choice",
                        "--out", tmp_path / "g")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "causal" in result.stderr and "future tokens" in result.stderr
