"""`moeify.verify`'s checks on in-memory models (the CLI's `verify` is in test_cli_convert)."""

from __future__ import annotations

import copy

import torch

import moeify
from moeify import MoEConfig
from moeify.verify import check_dense_identity
from tests import models

SEQ = 8


def test_dense_identity_leaves_the_callers_bf16_model_as_it_was():
    torch.manual_seed(0)
    dense = models.t5(layers=2).to(torch.bfloat16).float().eval()  # weights exact in bf16
    moe = copy.deepcopy(dense)
    moeify.convert(moe, MoEConfig(num_experts=4), seq_len=SEQ)
    moe.to(torch.bfloat16).train()
    moe.decoder.eval()  # modes that differ between modules must come back too
    ids = torch.randint(2, models.VOCAB, (2, SEQ))
    logits = moe(input_ids=ids, decoder_input_ids=ids).logits  # a training step's state:
    (logits.float().square().mean() + moeify.aux_loss(moe)).backward()  # grads, routing
    tensors = {n: (t, t.dtype, t.device, t.detach().clone())
               for n, t in moe.state_dict(keep_vars=True).items()}
    grads = {n: (p.grad, None if p.grad is None else p.grad.clone())
             for n, p in moe.named_parameters()}
    modes = {n: m.training for n, m in moe.named_modules()}
    routing = [layer.last_routing for _, layer in moeify.switch_layers(moe)]
    assert {t.dtype for n, (t, *_) in tensors.items() if ".router." not in n} == {torch.bfloat16}
    assert sum(g is not None for g, _ in grads.values()) > 10
    assert all(r is not None for r in routing)
    assert True in modes.values() and False in modes.values()

    check = check_dense_identity(moe, dense, SEQ)
    # Passing to 1e-5 means the check ran the model in float32: bf16 arithmetic is far off.
    assert check.status == "pass", check.detail

    after = moe.state_dict(keep_vars=True)
    assert after.keys() == tensors.keys()
    for name, (tensor, dtype, device, value) in tensors.items():
        now = after[name]
        assert now is tensor and now.dtype == dtype and now.device == device, name
        assert torch.equal(now.detach(), value), name
    for name, p in moe.named_parameters():
        grad, value = grads[name]
        assert p.grad is grad and (grad is None or torch.equal(grad, value)), name
    assert all(p.grad.dtype == p.dtype for p in moe.parameters() if p.grad is not None)
    assert {n: m.training for n, m in moe.named_modules()} == modes
    now_routing = [layer.last_routing for _, layer in moeify.switch_layers(moe)]
    assert len(now_routing) == len(routing) and all(a is b for a, b in zip(now_routing, routing))
    assert moe(input_ids=ids, decoder_input_ids=ids).logits.dtype == torch.bfloat16


def test_dense_identity_of_an_expert_choice_t5():
    """Room for every token: each encoder expert takes every token with its softmax
    score, and the scores sum to 1; the decoder's token-choice layers get the normalized
    gate. Every layer's config comes back."""
    torch.manual_seed(0)
    dense = models.t5(layers=2).eval()
    moe = copy.deepcopy(dense)
    moeify.convert(moe, MoEConfig(num_experts=4, router="expert-choice"), seq_len=SEQ)
    configs = [layer.config for _, layer in moeify.switch_layers(moe)]
    assert [c.router.value for c in configs] == ["expert-choice", "token-choice"]
    check = check_dense_identity(moe, dense, SEQ)
    assert check.status == "pass", check.detail
    assert [layer.config for _, layer in moeify.switch_layers(moe)] == configs


# --- tolerances per dtype, ONNX parity, factory checkpoints (issue 14) -----------------------

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from moeify.verify import identity_tolerance  # noqa: E402


def checks_of(result) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(result.stdout)["checks"]}


def test_tolerances_follow_the_dtype_and_the_output_scale():
    f32, bf16, f16 = (identity_tolerance(d, 1.0)
                      for d in (torch.float32, torch.bfloat16, torch.float16))
    assert f32 < f16 < bf16
    assert identity_tolerance(torch.float32, 10.0) == 10 * f32
    assert identity_tolerance(torch.float32, 0.01) == f32  # never below eps at scale 1
    assert bf16 == 8 * 2**-7 and f32 == 64 * 2**-23


def tamper_expert(ck: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    index = json.loads((ck / "model.safetensors.index.json").read_text())
    shard = ck / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name][2] += 0.5
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.mark.parametrize("dtype, random_init", [("bf16", False), ("fp16", False),
                                                ("bf16", True)])
@pytest.mark.slow
def test_half_precision_conversions_pass_verify_and_a_tampered_one_fails(
        dtype, random_init, gpt2_dir, tmp_path, moeify_cli):
    ck = tmp_path / "ck"
    result = moeify_cli("convert", gpt2_dir, *(["--random-init"] if random_init else []),
                        "--dtype", dtype, "--experts", "4", "--seq-len", "8", "--out", ck)
    assert result.returncode == 0, result.stderr
    result = moeify_cli("verify", ck, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    checks = checks_of(result)
    name = {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    assert checks["dense identity"]["status"] == "pass", checks["dense identity"]
    assert "tolerance" in checks["dense identity"]["detail"]
    assert f"float32 on the {name} weights" in checks["dense identity"]["detail"]
    native = checks[f"dense identity ({name})"]
    assert native["status"] == "pass", native
    assert f"eps({name})" in native["detail"]
    assert checks["upcycled weights"]["status"] == "pass"

    tamper_expert(ck, "transformer.h.1.mlp.c_fc.experts.w_in")
    result = moeify_cli("verify", ck, "--json")
    assert result.returncode == 1
    checks = checks_of(result)
    assert checks["integrity"]["status"] == "fail"
    assert checks["upcycled weights"]["status"] == "fail"
    assert checks["dense identity"]["status"] == "fail"


@pytest.mark.slow
def test_onnx_parity_runs_on_a_graph_beside_or_given_and_catches_a_tampered_one(
        gpt2_dir, tmp_path, moeify_cli, moeify_main):
    import onnx
    from onnx import numpy_helper

    ck = tmp_path / "ck"
    assert moeify_cli("convert", gpt2_dir, "--experts", "4", "--seq-len", "8", "--out",
                      ck).returncode == 0
    result = moeify_main("verify", ck, "--json")
    skipped = checks_of(result)["onnx parity"]
    assert skipped["status"] == "skip" and "--onnx" in skipped["detail"]

    graph = tmp_path / "ck.onnx"  # beside the checkpoint: found without --onnx
    result = moeify_cli("export", ck, "--onnx", graph, "--seq-len", "8")
    assert result.returncode == 0, result.stderr
    result = moeify_main("verify", ck, "--json")
    assert result.returncode == 0, result.stderr
    parity = checks_of(result)["onnx parity"]
    assert parity["status"] == "pass", parity
    assert "max |onnxruntime - torch|" in parity["detail"] and "8 tokens" in parity["detail"]

    proto = onnx.load(str(graph))
    initializer = next(i for i in proto.graph.initializer
                       if "experts" in i.name and "w_out" in i.name)
    values = numpy_helper.to_array(initializer).copy()
    # every expert (whichever the inputs reach), one output feature (a uniform shift of
    # every feature is what the next LayerNorm removes)
    values[..., 0] += 0.5
    initializer.CopyFrom(numpy_helper.from_array(values, initializer.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))
    result = moeify_main("verify", ck, "--onnx", tampered, "--json")
    assert result.returncode == 1
    parity = checks_of(result)["onnx parity"]
    assert parity["status"] == "fail" and "max |onnxruntime - torch|" in parity["detail"]
    result = moeify_main("verify", ck, "--onnx", tmp_path / "missing.onnx", "--json")
    assert result.returncode == 1 and "no such ONNX file" in checks_of(result)["onnx parity"]["detail"]


@pytest.mark.slow
def test_a_bf16_checkpoint_and_its_float32_graph_agree(gpt2_dir, tmp_path, moeify_cli):
    ck = tmp_path / "ck"
    assert moeify_cli("convert", gpt2_dir, "--dtype", "bf16", "--experts", "4", "--seq-len", "8",
                      "--out", ck).returncode == 0
    assert moeify_cli("export", ck, "--onnx", ck / "model.onnx", "--seq-len", "8").returncode == 0
    result = moeify_cli("verify", ck, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert checks_of(result)["onnx parity"]["status"] == "pass"


def test_factory_checkpoints_verify_export_and_refuse_distill_in_one_line(
        tmp_path, moeify_cli, one_line_error):
    ck = tmp_path / "ck"
    result = moeify_cli("convert", "tests.factories:residual_ffns", "--experts", "4",
                        "--seq-len", "8", "--out", ck)
    assert result.returncode == 0, result.stderr
    result = moeify_cli("verify", ck, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    checks = checks_of(result)
    assert checks["reload"]["detail"] == "saved again and reloaded: outputs bitwise equal"
    assert checks["upcycled weights"]["status"] == "pass", checks["upcycled weights"]
    assert checks["dense identity"]["status"] == "pass", checks["dense identity"]

    result = moeify_cli("export", ck, "--onnx", ck / "model.onnx", "--seq-len", "8")
    assert result.returncode == 0, result.stderr
    result = moeify_cli("verify", ck, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert checks_of(result)["onnx parity"]["status"] == "pass"

    one_line_error(moeify_cli("distill", ck, "--out", tmp_path / "student"), "factory")


def test_verify_of_a_factory_that_builds_other_weights_says_so(tmp_path, monkeypatch):
    from moeify.verify import verify

    model = models.NanoGPT()
    moeify.convert(model, MoEConfig(num_experts=4), seq_len=8)
    from moeify.io.sources import Source

    moeify.save(model, tmp_path / "ck", source=Source("factory", "tests.models:NanoGPT",
                                                      weights="sha256:" + "0" * 64))
    checks = {c.name: c for c in verify(tmp_path / "ck")}
    assert checks["reload"].status == "pass"
    assert checks["upcycled weights"].status == "skip"
    assert "builds other weights than at conversion" in checks["upcycled weights"].detail
