"""The conversion plan: `moeify.plan` -> JSON -> `moeify.apply`, one layer builder for
every route, and checkpoints that load by applying their stored plan without tracing."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.export
import torch.fx

import moeify
from moeify import ConversionPlan, MoEConfig, SwitchFFN
from moeify.compiler.plan import PLAN_FORMAT_VERSION
from tests import models
from tests.families import FAMILIES, NEEDS_INPUTS, build, run

E = 4
SEQ = 12
HF_FAMILIES = ["t5", "bert", "gpt2", "llama"]


def make_plan(name, model, inputs, config, **kwargs):
    if name in NEEDS_INPUTS:
        kwargs["example_inputs"] = inputs
    return moeify.plan(model, config, **kwargs)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_plan_changes_nothing_and_round_trips_through_json(name):
    model, inputs = build(name)
    before = copy.deepcopy(model.state_dict())
    plan = make_plan(name, model, inputs, MoEConfig(num_experts=E), seq_len=SEQ)
    assert not moeify.switch_layers(model) and moeify.plan_of(model) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(plan.sites) == FAMILIES[name][2] and plan.selected
    text = json.dumps(plan.to_dict())
    again = ConversionPlan.from_dict(json.loads(text))
    assert again == plan
    data = json.loads(text)
    assert data["format_version"] == PLAN_FORMAT_VERSION
    assert data["derived"]["capacity_train"] == MoEConfig(num_experts=E).capacity(SEQ, training=True)
    site = data["sites"][0]
    assert {"path", "replace", "up", "down", "activation", "dropout", "stack", "index"} <= set(site)


def test_plan_works_on_the_meta_device_and_matches_the_real_model():
    with torch.device("meta"):
        meta = models.t5()
    real = models.t5()
    config = MoEConfig(num_experts=E)
    on_meta, on_real = moeify.plan(meta, config, seq_len=SEQ), moeify.plan(real, config, seq_len=SEQ)
    assert all(p.is_meta for p in meta.parameters())
    assert on_meta == on_real


@pytest.mark.parametrize("name", list(FAMILIES))
def test_convert_is_plan_then_apply_bitwise(name):
    config = MoEConfig(num_experts=E, noise=0.01, seed=3)
    a, inputs = build(name)
    b, _ = build(name)
    kwargs = {"example_inputs": inputs} if name in NEEDS_INPUTS else {}
    result = moeify.convert(a, config, seq_len=SEQ, **kwargs)
    plan = ConversionPlan.from_json(make_plan(name, b, inputs, config, seq_len=SEQ).to_json())
    applied = moeify.apply(b, plan)
    assert applied.plan == result.plan == moeify.plan_of(b)
    assert applied.report == result.report
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.testing.assert_close(run(a, inputs), run(b, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("options", [dict(), dict(noise=0.05), dict(init="random"),
                                     dict(init="partition")])
def test_from_dense_builds_what_convert_builds_for_the_same_site(options):
    config = MoEConfig(num_experts=E, seed=5, **options)
    model = models.llama()
    dense = copy.deepcopy(model)
    moeify.convert(model, config, seq_len=SEQ)
    for site in moeify.plan_of(model).selected_sites:
        layer = SwitchFFN.from_dense(site.dense_weights(dense), config, path=site.path,
                                     activation=site.activation, seq_len=SEQ)
        converted = model.get_submodule(site.path)
        mine, theirs = layer.state_dict(), converted.state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), site.path
    other = SwitchFFN.from_dense(site.dense_weights(dense), config, path="elsewhere",
                                 activation=site.activation)
    assert not torch.equal(other.router.weight, layer.router.weight)  # seeded by the path


def test_sharding_plan_is_made_before_conversion_and_names_every_parameter_in_order():
    for build_model in (models.llama, models.bert, lambda: models.t5(gated=True)):
        model = build_model()
        plan = moeify.plan(model, MoEConfig(num_experts=E))
        moeify.apply(model, plan)
        named = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
        assert [(p.name, p.shape) for p in plan.sharding.params] == named
        sharded = {p.name for p in plan.sharding.sharded()}
        assert sharded == {n for n, _ in named if ".experts." in n} and sharded


def test_a_plan_for_another_architecture_is_refused_before_any_change():
    plan = moeify.plan(models.llama(), MoEConfig(num_experts=E))
    wider = models.t5()
    with pytest.raises(moeify.MoEError, match="this plan does not fit the model: site"):
        moeify.apply(wider, plan)
    assert not moeify.switch_layers(wider)


def test_malformed_and_newer_plans_are_refused_with_one_line():
    data = moeify.plan(models.gpt2(), MoEConfig(num_experts=E)).to_dict()
    with pytest.raises(moeify.MoEError, match="newer than this moeify reads"):
        ConversionPlan.from_dict({**data, "format_version": PLAN_FORMAT_VERSION + 1})
    with pytest.raises(moeify.MoEError, match="malformed conversion plan: missing 'sites'"):
        ConversionPlan.from_dict({k: v for k, v in data.items() if k != "sites"})
    with pytest.raises(moeify.MoEError, match="not one of its sites"):
        ConversionPlan.from_dict({**data, "selected": ["nowhere"]})


def _forbid_tracing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loading traced the model")

    monkeypatch.setattr(torch.fx, "symbolic_trace", refuse)
    monkeypatch.setattr(torch.fx.Tracer, "trace", refuse)
    monkeypatch.setattr(torch.export, "export", refuse)


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_load_applies_the_stored_plan_without_tracing(name, tmp_path, monkeypatch):
    model, inputs = build(name)
    moeify.convert(model, MoEConfig(num_experts=E, capacity_factor=1.0), seq_len=SEQ)
    expected = run(model, inputs)
    moeify.save(model, tmp_path / "ck")
    stored = json.loads((tmp_path / "ck" / "moeify.json").read_text())
    assert stored["format_version"] == 2 and stored["plan"] == moeify.plan_of(model).to_dict()
    _forbid_tracing(monkeypatch)
    with pytest.raises((AssertionError, moeify.MoEError), match="loading traced"):
        moeify.plan(FAMILIES[name][0](), MoEConfig())  # the guard works
    loaded = moeify.load(tmp_path / "ck")
    torch.testing.assert_close(run(loaded, inputs), expected, rtol=0, atol=0)
    assert moeify.plan_of(loaded) == moeify.plan_of(model)


@pytest.mark.parametrize("entry", ["plan", "convert", "inspect"])
def test_a_dict_config_is_one_clear_error_before_any_pass(entry):
    model = models.gpt2()
    with pytest.raises(moeify.MoEError) as raised:
        getattr(moeify, entry)(model, {"num_experts": 4})
    message = str(raised.value)
    assert message == ("config must be a moeify.MoEConfig, got dict "
                       "(MoEConfig(**that_dict) or MoEConfig.from_dict)")
    assert "pass" not in message  # not "An error occurred when running the ... pass"
