"""``moe_op="ort"``: expert layers as ONNX Runtime's com.microsoft.MoE, exact to PyTorch.

Oracles: the converted PyTorch model (single graphs, with tokens dropping and padding),
Hugging Face ``generate()`` (generation graphs), ONNX Runtime's own kernel (the op's
eager reference).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import moeify
from moeify import MoEConfig
from moeify.onnx import OnnxGenerator, OnnxRunner, export_generation
from moeify.onnx.moe_op import ort_moe
from tests import models
from tests.onnx._cases import DROPPING, PROMPTS, SEQ, padded


def ops(path):
    return [(node.domain, node.op_type) for node in onnx.load(str(path)).graph.node]


def assert_generates_like_hf(model, out, new_tokens, left=True):
    """OnnxGenerator's greedy tokens for PROMPTS equal Hugging Face generate()'s."""
    ids, mask = padded(PROMPTS, left)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask,
                                  max_new_tokens=new_tokens, do_sample=False).numpy()
    np.testing.assert_array_equal(
        OnnxGenerator(out).generate(PROMPTS, max_new_tokens=new_tokens), expected)
    return ids, mask


def confident(model, std=2.0):
    """Router weights that send most tokens to few experts: capacities overflow."""
    for _, layer in moeify.switch_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=std)


CASES = {
    # model, config, inputs: every FFN kind the operator takes, with biases or not
    "gpt2-gelu_tanh-bias": (lambda: models.gpt2(layers=2), DROPPING),
    "llama-swiglu": (lambda: models.llama(layers=2), DROPPING),
    "t5-relu-padding": (lambda: models.t5(layers=2), DROPPING),
    "gpt2-normalized-gate": (lambda: models.gpt2(layers=2),
                             MoEConfig(num_experts=4, eval_capacity_factor=1.0, gate="normalized")),
    "llama-top2-dropless": (lambda: models.llama(layers=2),
                            MoEConfig(num_experts=4, top_k=2, dropless=True)),
    "gpt2-granular": (lambda: models.gpt2(layers=2),
                      MoEConfig(num_experts=8, top_k=2, granularity=2, dropless=True)),
    "llama-top3-dropless": (lambda: models.llama(layers=2),
                            MoEConfig(num_experts=8, top_k=3, dropless=True)),
    # the raw gate at k = 2 (normalize_routing_weights=0), the scaling folded into fc2
    "llama-top2-raw-scaled": (lambda: models.llama(layers=2),
                              MoEConfig(num_experts=4, top_k=2, gate="raw", routed_scaling=2.5,
                                        dropless=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_graph_equals_pytorch_with_drops_and_padding(case, tmp_path):
    build, config = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    moeify.convert(model, config, seq_len=SEQ)
    confident(model)
    path = tmp_path / "m.onnx"
    metadata = moeify.export_onnx(model, path, seq_len=SEQ, moe_op="ort")
    n = len(moeify.switch_layers(model))
    assert metadata["moe_op"] == f"com.microsoft.MoE in {n} of {n} expert layers"
    assert ops(path).count(("com.microsoft", "MoE")) == n
    assert ("", "ScatterElements") not in ops(path)  # no static expert buffers left
    runner = OnnxRunner(path)
    assert runner.metadata["moe_op"] == metadata["moe_op"]
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, models.VOCAB, (3, SEQ), generator=generator)
    with torch.no_grad():
        if case.startswith("t5"):
            mask = torch.ones_like(ids)
            mask[0, SEQ - 4:] = 0  # padding: its tokens take no slot and get 0
            feeds = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids)
            expected = model(**feeds, use_cache=False).logits.numpy()
        else:
            feeds = dict(input_ids=ids)
            expected = model(input_ids=ids, use_cache=False).logits.numpy()
    stats = moeify.routing_stats(model)
    if not config.dropless:
        assert max(float(s.dropped_fraction) for s in stats) > 0.1  # the mask is exercised
    assert np.abs(runner.run(**feeds) - expected).max() <= 1e-4


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_generation_graphs_give_generate_greedy_tokens(name, tmp_path):
    torch.manual_seed(0)
    model = {"gpt2": models.gpt2, "llama": models.llama, "t5": models.t5}[name](layers=2).eval()
    moeify.convert(model, DROPPING)
    manifest = export_generation(model, tmp_path / "g", seq_len=SEQ, moe_op="ort")
    assert {graph["moe_op"] for graph in manifest["graphs"].values()} == {
        "com.microsoft.MoE in 1 of 1 expert layers"}
    assert json.loads((tmp_path / "g" / "generation.json").read_text()) == manifest
    left = name != "t5"
    ids, mask = assert_generates_like_hf(model, tmp_path / "g", 24, left)
    with torch.no_grad():  # the prompts' forward drops tokens, as the prefill graph's does
        if left:
            model(input_ids=ids, attention_mask=mask)
        else:
            model.get_encoder()(input_ids=ids, attention_mask=mask)
    assert max(float(s.dropped_fraction) for s in moeify.routing_stats(model)) > 0


def test_optimized_operator_graphs_keep_generate_tokens(tmp_path):
    torch.manual_seed(0)
    model = models.gpt2(layers=2).eval()
    moeify.convert(model, DROPPING)
    manifest = export_generation(model, tmp_path / "g", seq_len=SEQ, moe_op="ort",
                                 optimize=True)
    assert "optimized (gpt2): fusions" in manifest["postprocess"]["decode"]
    assert "FastGelu" in manifest["postprocess"]["decode"]  # the dense FFN's, not the experts'

    assert ("com.microsoft", "MoE") in ops(tmp_path / "g" / "decode.onnx")
    assert_generates_like_hf(model, tmp_path / "g", 16)


def test_the_export_swaps_the_dispatcher_and_puts_the_layers_own_back():
    """Inside `ort_experts` a layer the operator can express dispatches with an
    `OrtDispatcher` (an eager forward there still runs the layer's own dispatcher);
    afterwards the layer has its own dispatcher and state_dict again."""
    from moeify.onnx.moe_op import OrtDispatcher, ort_experts

    torch.manual_seed(0)
    model = models.gpt2(layers=2).eval()
    moeify.convert(model, DROPPING, seq_len=SEQ)
    layers = moeify.switch_layers(model)
    own = {name: layer.dispatcher for name, layer in layers}
    keys = list(model.state_dict())
    ids = torch.randint(2, models.VOCAB, (2, SEQ))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with ort_experts(layers, "ort") as static:
            assert static == {}
            assert all(isinstance(layer.dispatcher, OrtDispatcher)
                       and layer.dispatcher.fallback is own[name] for name, layer in layers)
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert all(layer.dispatcher is own[name] for name, layer in layers)
    assert list(model.state_dict()) == keys


@pytest.mark.slow
def test_layers_the_operator_cannot_express_keep_the_static_form(tmp_path):
    # top-2 with capacity below the group length: the prefill keeps the static form, the
    # decode step (one token per group: nothing can drop) takes the operator
    torch.manual_seed(0)
    model = models.gpt2(layers=2).eval()
    moeify.convert(model, MoEConfig(num_experts=4, top_k=2, eval_capacity_factor=1.0))
    manifest = export_generation(model, tmp_path / "g", seq_len=SEQ, moe_op="ort")
    prefill, decode = manifest["graphs"]["prefill"]["moe_op"], manifest["graphs"]["decode"]["moe_op"]
    assert prefill.startswith("static: top-2 routing with capacity 6 < 12 tokens per group")
    assert decode == "com.microsoft.MoE in 1 of 1 expert layers"
    assert ("com.microsoft", "MoE") not in ops(tmp_path / "g" / "prefill.onnx")
    assert_generates_like_hf(model, tmp_path / "g", 12)
    # T5 v1.1's gated GELU: nothing to write as the operator, refused with the reason
    t5 = models.t5(gated=True, layers=2)
    moeify.convert(t5, DROPPING)
    with pytest.raises(moeify.MoEError, match="gated gelu_tanh experts.*moe_op='static'"):
        export_generation(t5, tmp_path / "t5", seq_len=SEQ, moe_op="ort")
    assert not (tmp_path / "t5").exists()


def test_refusals_name_the_reason_and_write_nothing(tmp_path):
    bert = models.bert(layers=2)
    moeify.convert(bert, DROPPING, seq_len=SEQ)
    with pytest.raises(moeify.MoEError, match=r"exact \(erf\) GELU.*tanh approximation"):
        moeify.export_onnx(bert, tmp_path / "b.onnx", seq_len=SEQ, moe_op="ort")
    gpt2 = models.gpt2(layers=2)
    moeify.convert(gpt2, DROPPING, seq_len=SEQ)
    with pytest.raises(moeify.MoEError, match="^moe_op='fused' is not one of static, ort$"):
        moeify.export_onnx(gpt2, tmp_path / "g.onnx", seq_len=SEQ, moe_op="fused")
    with pytest.raises(moeify.MoEError, match="moe_op='static' to quantize"):
        moeify.export_onnx(gpt2, tmp_path / "g.onnx", seq_len=SEQ, moe_op="ort",
                           quantize="int8")
    with pytest.raises(moeify.MoEError, match="moe_op='static' to shard"):
        moeify.export_onnx(gpt2, tmp_path / "g.onnx", seq_len=SEQ, moe_op="ort",
                           shard_experts=2)
    with pytest.raises(moeify.MoEError, match="float64 experts: the operator computes in float32"):
        moeify.export_onnx(gpt2.double(), tmp_path / "g.onnx", seq_len=SEQ, moe_op="ort")
    ec = models.t5(layers=2)
    moeify.convert(ec, MoEConfig(num_experts=4, router="expert-choice"), seq_len=SEQ)
    metadata = moeify.export_onnx(ec, tmp_path / "ec.onnx", seq_len=SEQ, moe_op="ort")
    # the encoder's expert-choice layer stays static, the causal decoder's takes the op
    assert metadata["moe_op"].startswith("com.microsoft.MoE in 1 of 2 expert layers; "
                                         "static elsewhere: expert-choice routing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ec.onnx"]


def test_cli_exports_a_checkpoint_with_the_operator(tmp_path, moeify_cli):
    torch.manual_seed(0)
    model = models.llama(layers=2).eval()
    moeify.convert(model, DROPPING, seq_len=SEQ)
    moeify.save(model, tmp_path / "ckpt")
    out = tmp_path / "m.onnx"
    result = moeify_cli("export", tmp_path / "ckpt", "--onnx", out, "--seq-len", SEQ,
                        "--moe-op", "ort", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["metadata"]["moe_op"].startswith("com.microsoft.MoE in 1")
    ids = torch.randint(2, models.VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits.numpy()
    assert np.abs(OnnxRunner(out).run(input_ids=ids) - expected).max() <= 1e-4
    bad = moeify_cli("export", tmp_path / "ckpt", "--onnx", tmp_path / "q.onnx", "--seq-len", SEQ,
                     "--moe-op", "ort", "--quantize", "int4")
    assert bad.returncode != 0 and "--moe-op static to quantize" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("activation,k,normalize,bias", [
    ("relu", 1, False, True), ("gelu", 1, False, True), ("silu", 2, True, False),
    ("swiglu", 2, True, True), ("relu", 1, True, False)])
def test_the_eager_reference_is_onnx_runtimes_kernel(activation, k, normalize, bias, tmp_path):
    from moeify.onnx.moe_op import translation_table

    E, d, f = 4, 16, 24
    rows = 2 * f if activation == "swiglu" else f
    g = torch.Generator().manual_seed(0)
    weights = dict(fc1=torch.randn(E, rows, d, generator=g) * 0.2,
                   fc1_bias=torch.randn(E, rows, generator=g) * 0.2 if bias else None,
                   fc2=torch.randn(E, d, f, generator=g) * 0.2,
                   fc2_bias=torch.randn(E, d, generator=g) * 0.2 if bias else None)

    class Op(torch.nn.Module):
        def forward(self, x, logits):
            return torch.ops.moeify.ort_moe(x, logits, weights["fc1"], weights["fc1_bias"],
                                            weights["fc2"], weights["fc2_bias"], k, activation,
                                            normalize)

    x, logits = torch.randn(9, d, generator=g), torch.randn(9, E, generator=g)
    program = torch.onnx.export(Op(), (x, logits), dynamo=True, verbose=False,
                                custom_translation_table=translation_table())
    program.save(str(tmp_path / "op.onnx"))
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "op.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy(), "logits": logits.numpy()})[0]
    expected = ort_moe(x, logits, k=k, activation=activation, normalize=normalize, **weights)
    assert np.abs(got - expected.numpy()).max() <= 1e-5
