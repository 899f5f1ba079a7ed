"""The command line: instant help, versions, one-line errors."""

import dataclasses
import re
import subprocess
import sys

import pytest

import moeify
from moeify.config import MoEConfig, config_param


def test_help_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from moeify.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "assert 'version' in r.output; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_version_via_python_dash_m(moeify_cli):
    result = moeify_cli("version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"moeify {moeify.__version__} (torch ")


def test_unknown_command_fails_with_usage(moeify_cli):
    result = moeify_cli("frobnicate")
    assert result.returncode != 0
    assert "No such command" in result.stderr


# --- options generated from MoEConfig ---------------------------------------------------------

CONFIG_OPTIONS = {  # the names users type; renaming one breaks their scripts
    "num_experts": "--experts", "capacity_factor": "--capacity",
    "eval_capacity_factor": "--eval-capacity", "top_k": "--top-k",
    "min_capacity": "--min-capacity", "group_size": "--group-size", "every": "--every",
    "layers": "--layers", "init": "--init", "noise": "--noise", "gate": "--gate",
    "jitter_eps": "--jitter", "aux_loss_coef": "--aux-loss-coef",
    "z_loss_coef": "--z-loss-coef", "expert_dropout": "--expert-dropout",
    "router_dtype": "--router-dtype", "seed": "--seed", "dropless": "--dropless",
    "drop_ratio": "--drop-ratio", "granularity": "--granularity", "router": "--router",
    "random_routing": "--random-routing", "scoring": "--scoring",
    "routed_scaling": "--routed-scaling", "bias_balancing": "--bias-balancing",
    "bias_update_rate": "--bias-rate", "seq_aux_loss_coef": "--seq-aux-loss-coef",
    "shared_experts": "--shared-experts", "shared_gate": "--shared-gate",
}


def command_params(name):
    import typer.main

    from moeify.cli import app

    return typer.main.get_command(app).commands[name].params


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_each_config_field_is_one_option_with_the_dataclass_default(command):
    fields = {f.name: f for f in dataclasses.fields(MoEConfig)}
    params = command_params(command)
    from_config = [p for p in params if p.name in fields]
    assert sorted(p.name for p in from_config) == sorted(fields)  # each field exactly once
    for param in from_config:
        field = fields[param.name]
        assert param.opts[0] == CONFIG_OPTIONS[param.name] == config_param(param.name).option
        assert param.default == field.default, param.name
        assert param.help == field.metadata["help"]
    taken = [opt for p in params for opt in p.opts]
    assert len(taken) == len(set(taken))  # no other option reuses a config option's name


def test_help_lists_every_config_option_with_its_default():
    from typer.testing import CliRunner

    from moeify.cli import app

    result = CliRunner().invoke(app, ["inspect", "--help"])
    assert result.exit_code == 0, result.output
    blocks: dict[str, str] = {}  # option -> its help, over the lines rich wraps it to
    for line in result.output.splitlines():
        text = line.strip("│ ")
        if line.startswith("│ --"):  # an option's first line (wrapped help is indented)
            option = text.split()[0]
            blocks[option] = ""
        if blocks:
            blocks[option] += " " + text
    for field in dataclasses.fields(MoEConfig):
        block = blocks[config_param(field.name).option]
        if field.default is not None and field.default is not False:  # a flag: off unless given
            default = getattr(field.default, "value", field.default)
            assert f"[default: {default}]" in block, block


@pytest.mark.parametrize("args, fragments", [
    (["--experts", "0"], ["--experts 0 must be an integer >= 2"]),  # not "--top-k exceeds"
    (["--experts", "1"], ["--experts 1 must be an integer >= 2"]),
    (["--capacity", "0"], ["--capacity 0.0 must be a finite number > 0"]),
    (["--top-k", "9"], ["--top-k 9 exceeds --experts 8"]),
    (["--top-k", "3", "--random-routing", "on"], ["--random-routing on is GShard's rule", "--top-k 3"]),
    (["--layers", "1,1"], ["--layers 1,1 must list distinct layer indices >= 0"]),
    (["--group-size", "0"], ["--group-size 0 must be an integer >= 1"]),
    (["--router-dtype", "bfloat16"], ["--router-dtype 'bfloat16' is not one of 'float32'"]),
    (["--expert-dropout", "1"], ["--expert-dropout 1.0 must be a finite number in [0, 1)"]),
])
def test_config_errors_name_the_option_in_one_line(args, fragments, moeify_cli):
    result = moeify_cli("inspect", "t5-small", *args)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.mark.parametrize("args, fragments", [
    (["--layers", "x"], ["--layers", "'x' is not a comma-separated list of integers", "1,3,5"]),
    (["--layers", "1,x"], ["--layers", "'1,x' is not a comma-separated list of integers"]),
    (["--init", "clone"], ["--init", "'clone' is not one of 'copy', 'partition', 'random'"]),
    (["--gate", "top"], ["--gate", "'top' is not one of 'softmax', 'normalized'"]),
    (["--experts", "many"], ["--experts"]),
])
def test_option_text_that_does_not_parse_is_a_usage_error(args, fragments, moeify_cli):
    result = moeify_cli("inspect", "t5-small", *args)
    assert result.returncode == 2
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stderr).split())  # unwrap rich's box
    for fragment in fragments:
        assert fragment in text, text


def test_the_report_states_whether_top2_keeps_the_second_expert_at_random(moeify_main):
    def report(*args):
        result = moeify_main("inspect", "t5-small", *args)
        assert result.returncode == 0, result.stderr
        return " ".join((result.stdout + result.stderr).split())

    assert "in training the second is kept at random (GShard)" in report("--top-k", "2")
    assert "each token picks its top-2 experts; both kept in training" in report(
        "--top-k", "2", "--random-routing", "off")
    result = moeify_main("inspect", "t5-small", "--experts", "16", "--top-k", "4", "--json")
    assert result.returncode == 0 and '"top_k": 4' in result.stdout
