"""MoEConfig: validation that names the field, JSON round trip."""

import subprocess
import sys

import pytest

from moeify import Gate, Init, MoEConfig
from moeify.config import ConfigError, config_param
from moeify.errors import MoEError


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_experts", 1, "num_experts=1 must be an integer >= 2"),
        ("num_experts", 2.5, "num_experts=2.5 must be an integer"),
        ("num_experts", "8", "num_experts='8' must be an integer"),
        ("top_k", 9, "top_k=9 exceeds MoEConfig.num_experts=8: a token cannot choose"),
        ("top_k", 0, "top_k=0 must be an integer >= 1"),
        ("random_routing", True, r"random_routing=True is GShard's rule .* top-2 only; got "
                                 "MoEConfig.top_k=1"),
        ("random_routing", "yes", "random_routing='yes' must be true, false or None"),
        ("capacity_factor", 0, "capacity_factor=0 must be a finite number > 0"),
        ("eval_capacity_factor", -1.0, "eval_capacity_factor=-1.0"),
        ("capacity_factor", float("nan"), "capacity_factor=nan"),
        ("min_capacity", 0, "min_capacity=0 must be an integer >= 1"),
        ("group_size", 0, "group_size=0"),
        ("every", 0, "every=0"),
        ("layers", (1, 1), r"layers=\(1, 1\) must list distinct layer indices"),
        ("layers", (-1,), r"layers=\(-1,\)"),
        ("init", "clone", "init='clone' is not one of 'copy', 'partition', 'random'"),
        ("gate", "top", "gate='top' is not one of 'softmax', 'normalized'"),
        ("noise", -0.1, "noise=-0.1 must be a finite number >= 0"),
        ("jitter_eps", 1.0, r"jitter_eps=1.0 must be a finite number in \[0, 1\)"),
        ("aux_loss_coef", -1, "aux_loss_coef=-1"),
        ("z_loss_coef", float("inf"), "z_loss_coef=inf"),
        ("expert_dropout", 1.0, r"expert_dropout=1.0 must be a finite number in \[0, 1\)"),
        ("router_dtype", "bfloat16", "router_dtype='bfloat16' is not one of"),
        ("seed", -1, "seed=-1"),
    ],
)
def test_bad_values_raise_config_error_naming_the_field(field, value, message):
    with pytest.raises(ConfigError, match=f"^MoEConfig.{message}"):
        MoEConfig(**{field: value})


def test_errors_name_the_field_at_fault_and_can_be_rendered_otherwise():
    with pytest.raises(ConfigError) as caught:
        MoEConfig(num_experts=0, top_k=1)  # the experts problem, not "top_k exceeds"
    error = caught.value
    assert error.field == "num_experts" and error.fields == {"num_experts": 0}
    assert str(error) == "MoEConfig.num_experts=0 must be an integer >= 2"
    assert error.render(cli=True) == "--experts 0 must be an integer >= 2"


def test_config_module_imports_nothing_from_the_switch_layer_or_torch():
    code = ("import sys, moeify.config; "
            "print(sorted(m for m in sys.modules if m.startswith(('moeify.switch', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_field_declares_its_command_line_option():
    import dataclasses

    names = [config_param(f.name).option for f in dataclasses.fields(MoEConfig)]
    assert all(n.startswith("--") for n in names) and len(set(names)) == len(names)
    assert all(f.metadata["help"] for f in dataclasses.fields(MoEConfig))


def test_any_top_k_and_the_random_routing_default():
    assert MoEConfig(num_experts=128, top_k=8).top_k == 8
    assert MoEConfig(top_k=2).uses_random_routing  # GShard, the Switch recipe's top-2
    assert not MoEConfig(top_k=2, random_routing=False).uses_random_routing
    assert not MoEConfig(top_k=4).uses_random_routing and not MoEConfig().uses_random_routing
    with pytest.raises(ConfigError) as caught:
        MoEConfig(top_k=4, random_routing=True)
    assert caught.value.render(cli=True).startswith("--random-routing on is GShard's rule")
    assert "--top-k 4" in caught.value.render(cli=True)
    # granular upcycling at any G: top-k a multiple of it
    assert MoEConfig(num_experts=64, top_k=8, granularity=8).granularity == 8
    with pytest.raises(ConfigError, match=r"granularity=8 needs top_k a multiple of it.*"
                       r"MoEConfig.top_k=8"):
        MoEConfig(num_experts=64, top_k=4, granularity=8)


def test_top2_needs_only_two_experts():
    """The smallest top-2 model: every token goes to both experts, and with both experts
    copies of the dense FFN (weights renormalized over the pair) it is the dense model."""
    import torch

    import moeify
    from tests import models

    torch.manual_seed(0)
    model = models.gpt2(layers=2).eval()
    ids = torch.randint(2, models.VOCAB, (2, 8))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    # C = ceil(1.0 * k * T / E) = T: both experts have a slot for every token
    moeify.convert(model, MoEConfig(num_experts=2, top_k=2, eval_capacity_factor=1.0))
    with torch.no_grad():
        moe = model(input_ids=ids).logits
    (stats,) = moeify.routing_stats(model)
    assert stats.tokens_per_expert == (16, 16) and stats.dropped_fraction == 0
    torch.testing.assert_close(moe, dense)


def test_defaults_follow_the_paper():
    c = MoEConfig()
    assert (c.capacity_factor, c.eval_capacity_factor, c.top_k) == (1.25, 2.0, 1)
    assert (c.aux_loss_coef, c.z_loss_coef, c.jitter_eps) == (0.01, 0.001, 0.01)
    assert c.gate is Gate.SOFTMAX and c.init is Init.COPY and c.every == 2


def test_strings_become_enums_and_json_round_trips():
    c = MoEConfig(num_experts=64, gate="normalized", init="partition", layers=[1, 5],
                  group_size=128, top_k=2)
    assert c.gate is Gate.NORMALIZED and c.init is Init.PARTITION and c.layers == (1, 5)
    text = c.to_json()
    assert '"gate": "normalized"' in text
    assert MoEConfig.from_json(text) == c
    assert MoEConfig.from_dict(c.to_dict()) == c


def test_unknown_json_fields_are_named():
    with pytest.raises(MoEError, match="unknown MoEConfig field.*experts"):
        MoEConfig.from_dict({"experts": 8})


def test_config_is_frozen_and_replace_validates():
    c = MoEConfig()
    with pytest.raises(AttributeError):
        c.num_experts = 4  # type: ignore[misc]
    assert c.replace(num_experts=4).num_experts == 4
    with pytest.raises(ConfigError, match="num_experts"):
        c.replace(num_experts=0)


def test_capacity_method():
    c = MoEConfig(num_experts=64, capacity_factor=1.25, eval_capacity_factor=2.0)
    assert c.capacity(512, training=True) == 10
    assert c.capacity(512, training=False) == 16


def test_expert_dropout_defaults_to_the_source_ffn_and_a_number_overrides():
    c = MoEConfig()
    assert c.expert_dropout is None  # None: each site takes its dense FFN's own dropout
    assert c.resolve_expert_dropout(0.2) == 0.2 and c.resolve_expert_dropout() == 0.0
    explicit = MoEConfig(expert_dropout=0.4)
    assert explicit.resolve_expert_dropout(0.2) == 0.4 and explicit.resolve_expert_dropout() == 0.4
    assert MoEConfig(expert_dropout=0).resolve_expert_dropout(0.2) == 0.0  # 0 is an override
    assert MoEConfig.from_json(c.to_json()).expert_dropout is None
    assert '"expert_dropout": null' in c.to_json()
    assert MoEConfig.from_dict(explicit.to_dict()) == explicit
    assert c.replace(expert_dropout=0.4) == explicit and explicit.replace(expert_dropout=None) == c
    for bad in (-0.1, 1.0, float("nan"), "0.1", True):
        message = r"expert_dropout=.* must be a finite number in \[0, 1\) or None"
        with pytest.raises(ConfigError, match=message):
            MoEConfig(expert_dropout=bad)
