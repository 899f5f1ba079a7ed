"""Distillation back to dense: the student's initialization and the loss mix."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import moeify
from moeify import MoEConfig
from tests import models

SEQ = 12


def converted(build, **config):
    torch.manual_seed(0)
    dense = build(layers=2).eval()
    original = copy.deepcopy(dense)
    moeify.convert(dense, MoEConfig(**{"num_experts": 4, **config}), seq_len=SEQ)
    return dense, original


@pytest.mark.parametrize("build", [models.gpt2, models.t5, models.llama, models.bert])
def test_copy_upcycled_teacher_distills_back_to_the_dense_model(build):
    teacher, original = converted(build)
    student = moeify.distill(teacher)
    assert type(student) is type(original)
    for name, value in original.state_dict().items():
        torch.testing.assert_close(student.state_dict()[name], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("config", [
    dict(shared_experts=1),
    dict(shared_experts=1, shared_gate=True, routed_scaling=2.5),
    dict(shared_experts=4, shared_gate=True, granularity=2, top_k=2, num_experts=8),
])
@pytest.mark.parametrize("build", [models.gpt2, models.llama])
def test_teacher_with_shared_experts_distills_back_to_the_dense_model(build, config):
    """The routed copies and the shared experts' whole copies merge back into the dense FFN
    (with the output scaling upcycling applied undone by the coefficients)."""
    teacher, original = converted(build, **config)
    assert any(layer.shared_experts is not None for _, layer in moeify.switch_layers(teacher))
    student = moeify.distill(teacher)
    for name, value in original.state_dict().items():
        torch.testing.assert_close(student.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_non_expert_weights_are_the_teachers_and_ffns_the_expert_mean():
    teacher, _ = converted(models.gpt2, noise=0.5)  # experts now differ
    student = moeify.distill(teacher)
    layers = dict(moeify.switch_layers(teacher))
    ffn = set()
    for site in moeify.plan_of(teacher).selected_sites:
        experts = layers[site.path].experts
        ffn.update(f"{p.path}.{kind}" for p in (site.up, site.down) for kind in ("weight", "bias"))
        # GPT-2's Conv1D keeps x @ W weights: the mean of the experts as they are
        torch.testing.assert_close(student.get_submodule(site.up.path).weight,
                                   experts.w_in.mean(0))
        torch.testing.assert_close(student.get_submodule(site.down.path).bias,
                                   experts.b_out.mean(0))
    teacher_state = teacher.state_dict()
    copied = [name for name in student.state_dict() if name not in ffn]
    assert len(copied) > 10
    for name in copied:
        assert torch.equal(student.state_dict()[name], teacher_state[name]), name


def _usage_site(teacher):
    site = moeify.plan_of(teacher).selected_sites[0]
    return site, dict(moeify.switch_layers(teacher))[site.path]


def test_usage_rule_weighs_experts_by_the_tokens_they_processed():
    teacher, _ = converted(models.gpt2, noise=0.5)
    with pytest.raises(moeify.MoEError, match="run the teacher's forward"):
        moeify.distill(teacher, rule="usage")
    teacher(input_ids=torch.randint(2, models.VOCAB, (3, SEQ)))
    student = moeify.distill(teacher, rule="usage")
    site, layer = _usage_site(teacher)
    counts = layer.last_routing.tokens_per_expert.float()
    assert len(set(counts.tolist())) > 1  # unequal usage, so the rule matters
    expected = torch.einsum("e,eio->io", counts / counts.sum(), layer.experts.w_in)
    torch.testing.assert_close(student.get_submodule(site.up.path).weight, expected)


def test_one_distillation_step_lowers_the_soft_loss():
    teacher, _ = converted(models.gpt2, noise=0.5)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, models.VOCAB, (4, SEQ), generator=generator)
    labels = torch.randint(2, models.VOCAB, (4, SEQ), generator=generator)
    # a teacher that has learned something about the batch, as a real one would have
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(20):
        F.cross_entropy(teacher(input_ids=ids).logits.flatten(0, 1), labels.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    teacher.eval()
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits
    student = moeify.distill(teacher).eval()  # eval: no dropout, the same function twice
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)

    def soft():
        logits = student(input_ids=ids).logits
        return moeify.distillation_loss(logits, teacher_logits, labels, hard_weight=0.0)

    with torch.no_grad():
        before = soft()
    moeify.distillation_loss(student(input_ids=ids).logits, teacher_logits, labels).backward()
    optimizer.step()
    with torch.no_grad():
        assert soft() < before - 1e-3


def test_distillation_loss_mixes_hard_and_soft_terms():
    generator = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=generator), torch.randn(2, 5, 7, generator=generator)
    y = torch.randint(0, 7, (2, 5), generator=generator)
    y[0, 0] = -100
    keep = y != -100
    hard = F.cross_entropy(s[keep], y[keep])
    soft = -(F.softmax(t[keep], -1) * F.log_softmax(s[keep], -1)).sum(-1).mean()
    torch.testing.assert_close(moeify.distillation_loss(s, t, y), 0.75 * hard + 0.25 * soft)
    torch.testing.assert_close(moeify.distillation_loss(s, t, y, hard_weight=1.0), hard)
    with pytest.raises(moeify.MoEError, match="hard_weight"):
        moeify.distillation_loss(s, t, y, hard_weight=1.5)


def test_distill_command_writes_a_dense_transformers_model(tmp_path, moeify_cli):
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    models.t5(layers=2).save_pretrained(tmp_path / "t5")
    assert moeify_cli("convert", tmp_path / "t5", "--experts", "4", "--seq-len", "8", "--noise",
                      "0.1", "--out", tmp_path / "moe").returncode == 0
    result = moeify_cli("distill", tmp_path / "moe", "--out", tmp_path / "dense", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["student_parameters"] < data["teacher_parameters"]
    student = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "dense")
    teacher = moeify.load(tmp_path / "moe")
    expected = moeify.distill(teacher)
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(student.state_dict()[name], value)
    again = moeify_cli("distill", tmp_path / "moe", "--out", tmp_path / "dense")
    assert again.returncode != 0 and "already exists" in again.stderr


def test_distill_command_rule_usage_weighs_experts_by_tokens_on_data(tmp_path, moeify_cli):
    teacher, _ = converted(models.gpt2, noise=0.5)  # experts differ, so the rule matters
    moeify.save(teacher, tmp_path / "moe")
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(2, models.VOCAB, (5, SEQ), generator=generator)
    (tmp_path / "ids.txt").write_text(
        "\n".join(" ".join(map(str, row)) for row in ids.tolist()) + "\n")
    result = moeify_cli("distill", tmp_path / "moe", "--out", tmp_path / "dense", "--rule", "usage",
                        "--data", tmp_path / "ids.txt", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rule"] == "usage"
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    again = moeify.load(tmp_path / "moe").eval()
    with torch.no_grad():
        again(input_ids=ids)
    site, layer = _usage_site(again)
    counts = layer.last_routing.tokens_per_expert.float()
    assert len(set(counts.tolist())) > 1
    expected = moeify.distill(again, rule="usage")
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(student.state_dict()[name], value)
    mean = moeify.distill(again, rule="mean")
    assert not torch.allclose(student.get_submodule(site.up.path).weight,
                              mean.get_submodule(site.up.path).weight)


def test_distill_command_rule_refusals_are_one_line(tmp_path, moeify_cli):
    teacher, _ = converted(models.gpt2)
    moeify.save(teacher, tmp_path / "moe")
    (tmp_path / "ragged.txt").write_text("1 2 3\n4 5\n")
    (tmp_path / "short.txt").write_text("1 2 3\n4 5 6\n")
    (tmp_path / "words.txt").write_text("hello world\n")
    cases = [
        (["--rule", "median"], "--rule 'median' is not one of mean, usage"),
        (["--rule", "usage"], "--rule usage weighs each expert by the tokens it processed"),
        (["--data", tmp_path / "short.txt"], "--data is read only by --rule usage"),
        (["--rule", "usage", "--data", tmp_path / "ragged.txt"], "the same length"),
        (["--rule", "usage", "--data", tmp_path / "words.txt"], "line 1: not whitespace"),
        (["--rule", "usage", "--data", tmp_path / "missing.txt"], "cannot read --data"),
        (["--rule", "usage", "--data", tmp_path / "short.txt"],
         "sequences of 3 tokens, but the checkpoint's Switch layers are declared for 12"),
    ]
    for args, message in cases:
        result = moeify_cli("distill", tmp_path / "moe", "--out", tmp_path / "dense", *args)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "dense").exists()
