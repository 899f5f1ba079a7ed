"""``moeify export --quantize / --optimize``: post-processed while staged, single graphs and
generation directories."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import moeify
from moeify.onnx import OnnxGenerator, OnnxRunner, export_generation
from tests import models
from tests.onnx._cases import DROPPING, PROMPTS, SEQ, padded


@pytest.mark.slow
def test_cli_quantizes_and_optimizes_a_single_graph(tmp_path, moeify_cli):
    torch.manual_seed(0)
    model = models.bert(layers=2).eval()
    moeify.convert(model, DROPPING, seq_len=SEQ)
    moeify.save(model, tmp_path / "ck")
    out = tmp_path / "bert.onnx"
    result = moeify_cli("export", tmp_path / "ck", "--onnx", out, "--seq-len", SEQ, "--quantize",
                        "int8", "--optimize", "--json")
    assert result.returncode == 0, result.stderr
    metadata = json.loads(result.stdout)["metadata"]
    assert metadata["quantized"].startswith("quantized int8 (experts")
    assert "SkipLayerNormalization" in metadata["optimized"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert.onnx", "ck"]  # no leftovers
    graph = onnx.load(str(out))
    ops = {node.op_type for node in graph.graph.node}
    assert "MatMulNBits" in ops and "SkipLayerNormalization" in ops
    props = {p.key: p.value for p in graph.metadata_props}
    assert props["num_experts"] == "4" and "quantized" in props and "optimized" in props
    ids = torch.randint(2, models.VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    got = OnnxRunner(out).run(input_ids=ids, attention_mask=mask)
    assert np.abs(got - expected).max() < 0.1  # int8 weights: close, not equal
    for args, fragment in [
        (["--quantize-all"], "--quantize-all widens --quantize"),
        (["--quantize", "int3"], "--quantize 'int3' is not one of int4, int8"),
        (["--quantize", "int4", "--shard-experts", "2"], "export with --shard-experts or"),
        (["--task", "summarize"], "unknown --task 'summarize'"),
        (["--task", "text-generation", "--batch-size", "2"], "not to --task"),
        (["--task", "text-generation"], "bert has no generation export"),
    ]:
        result = moeify_cli("export", tmp_path / "ck", "--onnx", tmp_path / "x.onnx", "--seq-len",
                            SEQ, *args)
        assert result.returncode != 0 and fragment in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("name, build", [("gpt2", lambda: models.gpt2(layers=2)),
                                         ("t5", lambda: models.t5(layers=2))])
@pytest.mark.slow
def test_generation_graphs_optimized_keep_generate_tokens_and_quantized_agree(name, build,
                                                                             tmp_path):
    torch.manual_seed(0)
    model = build().eval()
    moeify.convert(model, DROPPING)
    ids, mask = padded(PROMPTS, left=name != "t5")
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16,
                                  do_sample=False).numpy()
    manifest = export_generation(model, tmp_path / "opt", seq_len=SEQ, optimize=True)
    assert manifest["graphs"] and set(manifest["postprocess"]) == set(manifest["graphs"])
    assert all(line.startswith("optimized (") for line in manifest["postprocess"].values())
    np.testing.assert_array_equal(
        OnnxGenerator(tmp_path / "opt").generate(PROMPTS, max_new_tokens=16), expected)
    manifest = export_generation(model, tmp_path / "q8", seq_len=SEQ, quantize="int8")
    assert manifest["graphs"] and set(manifest["postprocess"]) == set(manifest["graphs"])
    assert all("MatMulNBits" in line for line in manifest["postprocess"].values())
    got = OnnxGenerator(tmp_path / "q8").generate(PROMPTS, max_new_tokens=16)
    assert got.shape == expected.shape
    first = max(map(len, PROMPTS)) if name != "t5" else 1
    assert (got[:, first] == expected[:, first]).mean() >= 2 / 3  # the first new tokens
