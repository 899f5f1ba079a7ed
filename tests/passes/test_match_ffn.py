"""The FFN analysis on hand-built modules: what matches, and why the rest is rejected."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moeify
from moeify import MoEConfig
from moeify.api import _normalize_inputs
from moeify.passes import FindFFN
from moeify.passes.match_ffn import assign_stacks
from moeify.compiler.program import Program
from tests import models


def analyze(model, inputs=None):
    program = Program(model, MoEConfig(), example_inputs=_normalize_inputs(inputs))
    FindFFN()(program)
    return program.analysis


class Gated(nn.Module):
    def __init__(self, swap: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.swap = swap
        self.gate = nn.Linear(8, 24, bias=bias)
        self.up = nn.Linear(8, 24, bias=bias)
        self.down = nn.Linear(24, 8, bias=bias)

    def forward(self, x):
        a, b = F.silu(self.gate(x)), self.up(x)
        return self.down(b * a if self.swap else a * b)


class LeaksHidden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 24), nn.Linear(24, 8)

    def forward(self, x):
        h = F.relu(self.up(x))
        return self.down(h) + h.mean(-1, keepdim=True)


@pytest.mark.parametrize("act, name", [
    (nn.ReLU(), "relu"), (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
    (nn.SiLU(), "silu"),
])
def test_plain_ffn_and_its_activation(act, name):
    model = nn.Sequential(nn.Linear(8, 24), act, nn.Dropout(0.2), nn.Linear(24, 8))
    (site,) = analyze(model).sites
    assert (site.d_model, site.d_ff, site.activation.value, site.gated) == (8, 24, name, False)
    assert site.replace == ("0", "1", "2", "3") and site.dropout == 0.2
    assert site.up.path == "0" and site.down.path == "3" and site.bias


@pytest.mark.parametrize("swap", [False, True])
def test_gated_ffn_finds_which_branch_is_activated(swap):
    (site,) = analyze(nn.Sequential(Gated(swap=swap))).sites
    assert site.gate.path == "0.gate" and site.up.path == "0.up" and site.down.path == "0.down"
    assert site.activation.value == "silu" and not site.bias and site.replace == ("0",)
    assert site.found_by == "fx.symbolic_trace of the whole model"


def test_an_ffn_that_is_the_whole_model_cannot_be_replaced_in_place():
    analysis = analyze(Gated())
    assert not analysis.sites
    assert "runs in the code of the model" in analysis.rejected[0].reason


@pytest.mark.parametrize("middle, reason", [
    (nn.Softmax(-1), r"activation 1 \(Softmax\) is not elementwise-pointwise"),
    (nn.LayerNorm(24), "is not elementwise-pointwise"),
    (nn.Sigmoid(), "elementwise but none of the supported relu, gelu, gelu_tanh, silu"),
    (nn.Identity(), "no activation between the projections"),
])
def test_rejections_carry_their_reason(middle, reason):
    analysis = analyze(nn.Sequential(nn.Linear(8, 24), middle, nn.Linear(24, 8)))
    assert not analysis.sites
    (rejection,) = analysis.rejected
    assert rejection.where == "0 -> 2"
    assert re.search(reason, rejection.reason), rejection.reason


def test_width_mismatch_is_named():
    analysis = analyze(nn.Sequential(nn.Linear(768, 96), nn.ReLU(), nn.Linear(96, 2304)))
    assert analysis.rejected[0].reason == "output width 2304 != input width 768"


def test_hidden_value_used_elsewhere_is_rejected():
    analysis = analyze(LeaksHidden())
    assert not analysis.sites
    assert "also used outside the FFN" in analysis.rejected[0].reason


def test_attention_is_not_an_ffn_and_mlp_is():
    analysis = analyze(models.NanoGPT(layers=2))
    assert [s.path for s in analysis.sites] == ["h.0.mlp.c_fc", "h.1.mlp.c_fc"]
    assert analysis.sites[0].replace == ("h.0.mlp.c_fc", "h.0.mlp.gelu", "h.0.mlp.c_proj")
    assert [(s.stack, s.index) for s in analysis.sites] == [("h.*.mlp.c_fc", 0), ("h.*.mlp.c_fc", 1)]


def test_ffn_across_sibling_modules_is_found_through_export():
    analysis = analyze(models.bert(layers=2))
    site = analysis.sites[0]
    assert site.replace == ("encoder.layer.0.intermediate", "encoder.layer.0.output.dense")
    assert site.found_by == "torch.export(strict=False) of the whole model"
    assert any("fx.symbolic_trace of encoder.layer.0.intermediate" in e for e in analysis.examined)
    assert any(e.startswith("opaque encoder.layer.0 (BertLayer)") for e in analysis.examined)


def test_activation_in_module_code_becomes_an_attribute_bypass():
    model = models.torch_encoder(norm_first=False, layers=2)
    analysis = analyze(model, torch.randn(2, 5, 16))
    site = analysis.sites[0]
    assert site.replace == ("layers.0.linear1", "layers.0.dropout", "layers.0.linear2")
    assert site.bypass_attributes == ("layers.0.activation",)
    assert site.dropout == 0.1  # linear1 -> activation -> dropout -> linear2, via export


def test_without_inputs_an_ffn_in_untraceable_code_asks_for_them():
    analysis = analyze(models.torch_encoder(norm_first=False, layers=1))
    assert not analysis.sites
    # both halves of the one FFN are named, each with the way out
    assert [r.where for r in analysis.rejected] == ["layers.0.linear1", "layers.0.linear2"]
    for rejection in analysis.rejected:
        assert "other half is in code fx cannot trace" in rejection.reason
        assert "pass example_inputs" in rejection.reason
    with pytest.raises(moeify.MoEError, match="no FFN found(.|\n)*pass example_inputs"):
        moeify.convert(models.torch_encoder(norm_first=False, layers=1))


def test_stacks_abstract_every_numeric_path_component():
    analysis = analyze(models.t5(layers=2))
    sites = assign_stacks(analysis.sites, [n for n, _ in models.t5(layers=2).named_modules()])
    assert {s.stack for s in sites} == {
        "encoder.block.*.layer.*.DenseReluDense", "decoder.block.*.layer.*.DenseReluDense"
    }
    assert [s.index for s in sites] == [0, 1, 0, 1]


def test_inspect_on_the_meta_device_touches_no_weights():
    with torch.device("meta"):
        model = models.t5(gated=True)
    before = dict(model.named_parameters())
    report = moeify.inspect(model, MoEConfig(num_experts=8), seq_len=64)
    assert len(report.sites) == 8 and len(report.converted) == 4
    after = dict(model.named_parameters())  # the same Parameter objects, all still on meta
    assert len(after) > 50 and after.keys() == before.keys()
    assert all(after[n] is p and p.is_meta for n, p in before.items())
    site = report.sites[1]
    ffn = 3 * 16 * 40
    assert site.dense_params == ffn and site.moe_params == 8 * ffn + 8 * 16
    assert report.params_moe == report.params_dense + 4 * (7 * ffn + 8 * 16)
    assert report.active_params_per_token == report.params_dense + 4 * 8 * 16
    assert (site.capacity_train, site.capacity_eval) == (10, 16)
    assert moeify.plan_of(model) is None


def test_meta_bert_inspect_follows_the_export_dataflow():
    with torch.device("meta"):
        model = models.bert(layers=2)
    report = moeify.inspect(model, MoEConfig(num_experts=4))
    assert [s.path for s in report.sites] == [
        "encoder.layer.0.intermediate", "encoder.layer.1.intermediate"
    ]


# --- the dropout inside an FFN (what its experts apply by default) -------------------------


@pytest.mark.parametrize("gated", [False, True], ids=["t5-v1.0", "t5-v1.1"])
def test_t5_dropout_between_wi_and_wo_is_the_sites_dropout(gated):
    analysis = analyze(models.t5(gated=gated, layers=2, dropout_rate=0.2))
    assert len(analysis.sites) == 4
    assert {s.dropout for s in analysis.sites} == {0.2}
    # T5LayerFF.dropout (after wo, on the residual branch) is outside: one dropout counted
    paths = [f"encoder.block.{i}.layer.1.DenseReluDense" for i in (0, 1)] + [
        f"decoder.block.{i}.layer.2.DenseReluDense" for i in (0, 1)]
    assert [s.path for s in analysis.sites] == paths
    assert [s.replace for s in analysis.sites] == [(p,) for p in paths]


@pytest.mark.parametrize("make", [
    lambda: models.gpt2(layers=2, resid_pdrop=0.3),  # GPT2MLP: c_fc, act, c_proj, dropout
    lambda: models.bert(layers=2, hidden_dropout_prob=0.3),  # BertOutput: dense, dropout, LN
    lambda: models.NanoGPT(layers=2),  # MLP: c_fc, gelu, c_proj, dropout
], ids=["gpt2", "bert", "nanogpt"])
def test_a_dropout_after_the_down_projection_is_not_the_ffns(make):
    model = make()
    analysis = analyze(model)
    assert analysis.sites and {s.dropout for s in analysis.sites} == {0.0}
    dropouts = {n for n, m in model.named_modules() if isinstance(m, nn.Dropout)}
    assert len(dropouts) >= 2  # the model has dropouts to get wrong
    assert not dropouts & {p for s in analysis.sites for p in s.replace}  # none is replaced


@pytest.mark.parametrize("functional", [False, True], ids=["nn.Dropout", "F.dropout"])
def test_a_dropout_on_the_hidden_activation_of_a_custom_ffn(functional):
    analysis = analyze(models.DropoutFFNModel(p=0.15, functional=functional))
    assert [(s.path, s.replace, s.dropout) for s in analysis.sites] == [
        ("ffn.0", ("ffn.0",), 0.15), ("ffn.1", ("ffn.1",), 0.15)
    ]


def test_dropouts_in_a_row_combine_into_one_rate():
    model = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Dropout(0.1), nn.Dropout(0.2),
                          nn.Linear(24, 8))
    (site,) = analyze(model).sites
    assert site.replace == ("0", "1", "2", "3", "4")
    assert site.dropout == pytest.approx(1 - 0.9 * 0.8)  # keep 0.72, scaled by 1 / 0.72


def test_a_dropout_on_one_branch_of_a_gated_ffn_counts():
    class GatedDropout(Gated):
        def forward(self, x):
            return self.down(F.silu(self.gate(x)) * F.dropout(self.up(x), 0.25, self.training))

    (site,) = analyze(nn.Sequential(GatedDropout())).sites
    assert site.gated and site.dropout == 0.25
