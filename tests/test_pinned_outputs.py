"""The bytes moeify writes for a few fixed conversions, pinned by digest.

Refactors must not change what a user gets on disk: checkpoints, HF-native outputs and ONNX
graphs of these seeded tiny models hash to the values below. A change that alters an output
on purpose updates the digest here in the same commit and says why.

``MOEIFY_PRINT_DIGESTS=1 pytest tests/test_pinned_outputs.py -s`` prints the current digests.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from unittest import mock

import onnx
import pytest
import torch

from moeify.cli import main
from tests import models

SEQ = "8"

# name: (source factory, the CLI commands run on it; "{src}", "{out}" filled in)
CASES = {
    "t5-torch": (models.t5, [["convert", "{src}", "--experts", "4", "--noise", "0.1",
                              "--out", "{out}/ckpt"]]),
    "t5-switch-transformers": (models.t5, [[
        "convert", "{src}", "--experts", "4", "--noise", "0.1", "--seq-len", SEQ,
        "--format", "hf", "--hf-arch", "switch_transformers", "--out", "{out}/hf"]]),
    "llama-mixtral-top2": (models.llama, [[
        "convert", "{src}", "--experts", "4", "--top-k", "2", "--noise", "0.1",
        "--format", "hf", "--hf-arch", "mixtral", "--out", "{out}/hf"]]),
    "qwen2-qwen2-moe": (models.qwen2, [[
        "convert", "{src}", "--experts", "4", "--every", "1", "--noise", "0.1",
        "--format", "hf", "--hf-arch", "qwen2_moe", "--out", "{out}/hf"]]),
    "llama-granular-torch": (models.llama, [[
        "convert", "{src}", "--experts", "8", "--top-k", "2", "--granularity", "2",
        "--out", "{out}/ckpt"]]),
    "gpt2-onnx": (models.gpt2, [
        ["convert", "{src}", "--experts", "4", "--noise", "0.1", "--out", "{out}/ckpt"],
        ["export", "{out}/ckpt", "--onnx", "{out}/static.onnx", "--seq-len", SEQ],
        ["export", "{out}/ckpt", "--onnx", "{out}/ort.onnx", "--seq-len", SEQ,
         "--moe-op", "ort"],
    ]),
    "bert-onnx": (models.bert, [[
        "convert", "{src}", "--experts", "4", "--noise", "0.1", "--seq-len", SEQ,
        "--format", "onnx", "--out", "{out}/model.onnx"]]),
}

# Changed on purpose: mixtral and qwen2_moe outputs are written in the published per-expert
# layout (block_sparse_moe.experts.{j}.w1/w2/w3, mlp.experts.{j}.gate_proj/up_proj/down_proj)
# that llama.cpp, vLLM and transformers 4.x read; qwen2_moe's no-op shared expert is one unit
# wide with a gate of ones (shared_expert_intermediate_size=1), the form llama.cpp loads;
# their config.json also states RoPE in the top-level form (rope_theta) transformers 4.x reads.
# moeify.json records MoEConfig.random_routing (new field; None: GShard's default) and the
# fine-grained fields (scoring, routed_scaling, bias_balancing, bias_update_rate,
# seq_aux_loss_coef, shared_experts, shared_gate); weights, indexes and ONNX graphs are
# unchanged by any-top-k routing and by these fields at their defaults.
PINNED = {
    'bert-onnx': {
        'model.onnx': '9f2d141f61e3d645',
    },
    'gpt2-onnx': {
        'ckpt/model-00001-of-00001.safetensors': '6084c94be2933dcb',
        'ckpt/model.safetensors.index.json': '13e1b248a5375acc',
        'ckpt/moeify.json': '54deb311503bb6b4',
        'ort.onnx': '36a68ee83fbd4459',
        'static.onnx': '79b92a413d19847e',
    },
    'llama-granular-torch': {
        'ckpt/model-00001-of-00001.safetensors': 'dc17f89e8540641d',
        'ckpt/model.safetensors.index.json': 'a35191505703f09a',
        'ckpt/moeify.json': 'fc07b4d6ea9e6976',
    },
    'llama-mixtral-top2': {
        'hf/config.json': '6132191f0393eaf7',
        'hf/generation_config.json': 'f2d764a3f6046977',
        'hf/model-00001-of-00001.safetensors': 'cf82a148606837f7',
        'hf/model.safetensors.index.json': '1bfef0710244cfd1',
    },
    'qwen2-qwen2-moe': {
        'hf/config.json': 'f62f792af9239fbb',
        'hf/generation_config.json': 'f2d764a3f6046977',
        'hf/model-00001-of-00001.safetensors': 'c4da7bf0148829de',
        'hf/model.safetensors.index.json': 'bad0f1d421513fad',
    },
    't5-switch-transformers': {
        'hf/config.json': 'bc61ac70c4911b6a',
        'hf/generation_config.json': '4d2d3dea684681a4',
        'hf/model.safetensors': 'c5e133c49e0835c0',
    },
    't5-torch': {
        'ckpt/model-00001-of-00001.safetensors': 'a164e5fafdc272a3',
        'ckpt/model.safetensors.index.json': '45c320e959c6e721',
        'ckpt/moeify.json': 'cd0b3ce1ba7a1584',
    },
}


def _run(args: list[str]) -> None:
    with mock.patch.object(sys, "argv", ["moeify", *args]):
        with pytest.raises(SystemExit) as stop:
            main()
    assert stop.value.code in (0, None), f"moeify {' '.join(args)} exited {stop.value.code}"


def _onnx_bytes(path: Path) -> bytes:
    """The graph without the exporter's per-node debug metadata (stack traces with the
    absolute paths of the exporting machine, Python class paths): what the graph computes,
    its names and moeify's own model metadata stay in."""
    model = onnx.load(path)
    graphs = [model.graph, *model.functions]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            del node.metadata_props[:]
            graphs.extend(a.g for a in node.attribute if a.HasField("g"))
            graphs.extend(g for a in node.attribute for g in a.graphs)
    return model.SerializeToString(deterministic=True)


def _digests(out: Path, src: Path) -> dict[str, str]:
    """sha256 of every file under ``out``: text files with the source path replaced and
    ONNX graphs without per-node debug metadata, so the digest does not depend on where
    the test ran."""
    digests = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.suffix in (".json", ".txt"):
            data = data.replace(str(src).encode(), b"<SRC>")
        elif path.suffix == ".onnx":
            data = _onnx_bytes(path)
        digests[str(path.relative_to(out))] = hashlib.sha256(data).hexdigest()[:16]
    return digests


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_bytes_are_pinned(case, tmp_path):
    factory, commands = CASES[case]
    torch.manual_seed(0)
    src, out = tmp_path / "src", tmp_path / "out"
    factory(layers=2).save_pretrained(src)
    out.mkdir()
    for command in commands:
        _run([arg.format(src=src, out=out) for arg in command])
    digests = _digests(out, src)
    if os.environ.get("MOEIFY_PRINT_DIGESTS"):
        print(f"\n    {case!r}: {digests!r},")
    assert digests == PINNED[case]
