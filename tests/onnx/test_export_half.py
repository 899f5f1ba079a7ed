"""export_onnx: half-precision models, the checker gate, argument checks, a quiet stderr.

A bf16 / fp16 model exports as a float32 graph (weights widened exactly, router float32
already): ONNX Runtime's output must equal the PyTorch model computed in float32 from the
same rounded weights, from a model in memory and from a checkpoint directory.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import moeify
from moeify import MoEConfig
from moeify.onnx import OnnxRunner
from moeify.onnx.export import max_positions
from tests import models

SEQ = 12
# eval capacity factor 1.0 with 4 experts: 3 slots for 12 tokens, so tokens drop
DROPPING = MoEConfig(num_experts=4, eval_capacity_factor=1.0, min_capacity=1)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
          onnx.TensorProto.DOUBLE}


def converted_gpt2(dtype: torch.dtype, seq_len: int | None = SEQ):
    torch.manual_seed(0)
    model = models.gpt2(layers=2).eval()
    moeify.convert(model, DROPPING, seq_len=seq_len)
    return model.to(dtype)


def ids(batch: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, models.VOCAB, (batch, SEQ), generator=generator)


def float32_reference(model, input_ids) -> np.ndarray:
    """The model computed in float32 from its own (rounded) weights, drops included."""
    reference = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        logits = reference(input_ids=input_ids, use_cache=False).logits
    assert max(s.dropped_fraction for s in moeify.routing_stats(reference)) > 0
    return logits.numpy()


def initializer_types(path: Path) -> set[int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {t.data_type for t in graph.initializer if t.data_type in FLOATS}


@pytest.mark.parametrize("source", ["memory", "checkpoint"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_dtype_exports_a_float32_graph_that_matches_the_float32_model(
        dtype, source, tmp_path):
    model = converted_gpt2(DTYPES[dtype])
    params = dict(model.named_parameters())
    if source == "checkpoint":
        moeify.save(model, tmp_path / "ckpt")  # shards in the model's dtype, router float32
    path = tmp_path / "m.onnx"
    metadata = moeify.export_onnx(tmp_path / "ckpt" if source == "checkpoint" else model,
                                  path, seq_len=SEQ)
    assert metadata["dtype"] == "float32" and metadata["source_dtype"] == dtype
    onnx.checker.check_model(str(path), full_check=True)
    assert initializer_types(path) == {onnx.TensorProto.FLOAT}
    runner = OnnxRunner(path)
    assert runner.metadata["source_dtype"] == dtype
    x = ids()
    assert np.abs(runner.run(input_ids=x) - float32_reference(model, x)).max() <= 1e-4
    # the model in memory is given back as it was: its own parameters, in its dtype
    assert dict(model.named_parameters()).keys() == params.keys()
    for name, param in model.named_parameters():
        assert param is params[name]
        expected = torch.float32 if ".router." in name else DTYPES[dtype]
        assert param.dtype == expected, name


def test_bf16_checkpoint_with_external_data_streams_widened_weights(tmp_path):
    model = converted_gpt2(torch.bfloat16)
    moeify.save(model, tmp_path / "ckpt")
    path = tmp_path / "out" / "m.onnx"
    metadata = moeify.export_onnx(tmp_path / "ckpt", path, seq_len=SEQ, external_data=True)
    assert metadata["external_data"] == "m.onnx.data"
    onnx.checker.check_model(str(path), full_check=True)
    assert initializer_types(path) == {onnx.TensorProto.FLOAT}
    x = ids(2, seed=1)
    assert np.abs(OnnxRunner(path).run(input_ids=x) - float32_reference(model, x)).max() <= 1e-4


def test_a_graph_the_checker_rejects_is_an_error_and_nothing_is_written(tmp_path, monkeypatch):
    from moeify.onnx import export

    original = export._save_ir

    def save_half_the_bytes(model, path, external_data):  # the bug of issue 14, simulated
        original(model, path, external_data)
        proto = onnx.load(str(path))
        tensor = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
        tensor.raw_data = tensor.raw_data[: len(tensor.raw_data) // 2]
        onnx.save_model(proto, str(path))

    monkeypatch.setattr(export, "_save_ir", save_half_the_bytes)
    model = converted_gpt2(torch.float32)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(moeify.MoEError, match="does not pass onnx.checker"):
        moeify.export_onnx(model, out / "m.onnx", seq_len=SEQ)
    assert not (out / "m.onnx").exists()
    assert not [p.name for p in out.iterdir() if "tmp" in p.name or p.suffix == ".data"]


@pytest.mark.parametrize("kwargs, message", [
    ({"seq_len": SEQ, "batch_size": 0}, "batch size must be a positive int"),
    ({"seq_len": SEQ, "batch_size": -2}, "batch size must be a positive int"),
    ({"seq_len": SEQ, "batch_size": True}, "batch size must be a positive int"),
    ({"seq_len": 0}, "seq_len must be a positive int"),
    ({"seq_len": 65}, "seq_len=65 exceeds the model's maximum of 64 positions"),
])
def test_export_refuses_batch_sizes_and_lengths_it_cannot_honour(kwargs, message, tmp_path):
    model = converted_gpt2(torch.float32, seq_len=None)  # undeclared: any length but the max
    with pytest.raises(moeify.MoEError, match=message):
        moeify.export_onnx(model, tmp_path / "m.onnx", **kwargs)
    assert not (tmp_path / "m.onnx").exists()
    dense_bert = models.bert(layers=1)  # max_position_embeddings=64 too
    with pytest.raises(moeify.MoEError, match="exceeds the model's maximum of 64"):
        moeify.export_onnx(dense_bert, tmp_path / "b.onnx", seq_len=100)


def test_maximum_positions_come_from_the_config_where_it_has_them():
    assert max_positions(models.gpt2(layers=1)) == 64  # n_positions
    assert max_positions(models.bert(layers=1)) == 64
    assert max_positions(models.llama(layers=1)) == 64
    assert max_positions(models.t5(layers=1)) is None  # relative positions: no limit
    assert max_positions(torch.nn.Linear(2, 2)) is None


def test_export_command_refuses_bad_shapes_in_one_line(tmp_path, moeify_cli):
    model = converted_gpt2(torch.float32, seq_len=None)
    moeify.save(model, tmp_path / "ckpt")
    for args, message in [
        (["--seq-len", SEQ, "--batch-size", "0"], "batch size must be a positive int"),
        (["--seq-len", SEQ, "--batch-size", "-2"], "batch size must be a positive int"),
        (["--seq-len", "100"], "--seq-len 100 exceeds the model's maximum of 64 positions"),
    ]:
        result = moeify_cli("export", tmp_path / "ckpt", "--onnx", tmp_path / "m.onnx", *args)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_issue_14_bf16_checkpoint_exports_from_the_command_line_quietly(tmp_path, moeify_cli):
    """``moeify convert DIR --dtype bf16`` then ``moeify export``: a checked float32 graph
    that matches, and stderr holds moeify's own line only (no exporter warnings)."""
    torch.manual_seed(0)
    models.gpt2(layers=2).save_pretrained(tmp_path / "dense")
    convert = moeify_cli("convert", tmp_path / "dense", "--dtype", "bf16", "--seq-len", SEQ,
                         "--experts", "4", "--eval-capacity", "1.0", "--min-capacity", "1",
                         "--out", tmp_path / "bf16")
    assert convert.returncode == 0, convert.stderr
    path = tmp_path / "bf16.onnx"
    result = moeify_cli("export", tmp_path / "bf16", "--onnx", path, "--seq-len", SEQ)
    assert result.returncode == 0, result.stderr
    onnx.checker.check_model(str(path), full_check=True)
    metadata = OnnxRunner(path).metadata
    assert metadata["dtype"] == "float32" and metadata["source_dtype"] == "bfloat16"
    # the one line moeify prints, whatever the console's wrapping did to it
    expected = f"wrote {path}: " + ", ".join(f"{k}={v}" for k, v in metadata.items())
    squeeze = lambda text: "".join(text.split())  # noqa: E731
    assert squeeze(result.stderr) == squeeze(expected), result.stderr
    teacher = moeify.load(tmp_path / "bf16")
    x = ids(2, seed=2)
    got = OnnxRunner(path).run(input_ids=x)
    assert np.abs(got - float32_reference(teacher, x)).max() <= 1e-4
    # --json: stdout is the report alone, stderr empty
    again = moeify_cli("export", tmp_path / "bf16", "--onnx", path, "--seq-len", SEQ, "--force",
                       "--json")
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""
    assert json.loads(again.stdout)["metadata"]["source_dtype"] == "bfloat16"
