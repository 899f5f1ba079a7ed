"""One error family: every user-facing error is a `MoEError`, worded in the caller's terms
(Python parameters from Python, options from the command line)."""

import enum

import pytest

import moeify
from moeify import MoEConfig
from moeify.config import ConfigError
from moeify.errors import MoEError, Param
from moeify.hf.decoder_moe import target_config
from tests import models


def test_every_error_kind_is_a_moe_error():
    from moeify.distributed import ExpertParallelError
    from moeify.compiler.pipeline import PassError

    for kind in (ConfigError, PassError, ExpertParallelError):
        assert issubclass(kind, MoEError), kind
    assert not issubclass(ConfigError, ValueError)


def test_except_moe_error_catches_a_bad_config():
    try:
        MoEConfig(num_experts=4, top_k=5)
    except moeify.MoEError as error:
        caught = error
    assert isinstance(caught, ConfigError) and caught.field == "top_k"
    with pytest.raises(moeify.MoEError, match=r"MoEConfig.init='clone' is not one of"):
        MoEConfig.from_dict({"init": "clone"})
    with pytest.raises(moeify.MoEError, match="unknown MoEConfig field"):
        MoEConfig.from_dict({"experts": 8})


class _Kind(enum.Enum):
    FAST = "fast"


@pytest.mark.parametrize("param, python, cli", [
    (Param("quantize_all"), "quantize_all", "--quantize-all"),
    (Param("quantize_all").given(True), "quantize_all=True", "--quantize-all"),
    (Param("dropless").given(False), "dropless=False", "--dropless=False"),
    (Param("seq_len").given(64), "seq_len=64", "--seq-len 64"),
    (Param("hf_arch").given("mixtral"), "hf_arch='mixtral'", "--hf-arch mixtral"),
    (Param("num_experts", "--experts", owner="MoEConfig").given(0),
     "MoEConfig.num_experts=0", "--experts 0"),
    (Param("layers").given((1, 3)), "layers=(1, 3)", "--layers 1,3"),
    (Param("kind").given(_Kind.FAST), "kind='fast'", "--kind fast"),
])
def test_a_param_is_spelled_as_each_entry_point_writes_it(param, python, cli):
    error = MoEError("{p} here", p=param)
    assert (str(error), error.render(cli=True)) == (f"{python} here", f"{cli} here")


def test_a_refused_value_is_quoted_on_the_command_line_and_plain_values_format_as_usual():
    error = MoEError("{arch!r} is not one of {arches}; {n:>3}",
                     arch=Param("hf_arch").given("mixtal"), arches="a, b", n=7)
    assert str(error) == "hf_arch='mixtal' is not one of a, b;   7"
    assert error.render(cli=True) == "--hf-arch 'mixtal' is not one of a, b;   7"
    literal = MoEError("{x} is taken as written without values")
    assert str(literal) == literal.render(cli=True) == "{x} is taken as written without values"


def test_config_errors_name_the_field_in_python_and_the_option_on_the_command_line(
        moeify_main, one_line_error):
    with pytest.raises(ConfigError) as caught:
        MoEConfig(router="expert-choice", top_k=2)
    assert str(caught.value).startswith(
        "MoEConfig.top_k=2 has no role with MoEConfig.router='expert-choice'")
    assert str(caught.value).endswith("set MoEConfig.top_k=1")
    result = moeify_main("inspect", "t5-small", "--router", "expert-choice", "--top-k", "2")
    line = one_line_error(result, "--top-k 2 has no role with --router 'expert-choice'")
    assert line.endswith("set --top-k 1") and "MoEConfig" not in line


def test_onnx_export_argument_errors_name_parameters_or_options(tmp_path, moeify_main,
                                                                one_line_error):
    gpt2 = models.gpt2(layers=1)
    with pytest.raises(moeify.MoEError) as caught:
        moeify.export_onnx(gpt2, tmp_path / "g.onnx", seq_len=8, quantize_all=True)
    assert str(caught.value) == ("quantize_all widens quantize to every linear weight: pass "
                                 "quantize='int8' (or int4) with it")
    with pytest.raises(moeify.MoEError, match="^quantize='int3' is not one of int4, int8$"):
        moeify.export_onnx(gpt2, tmp_path / "g.onnx", seq_len=8, quantize="int3")
    result = moeify_main("export", tmp_path / "absent", "--onnx", tmp_path / "g.onnx",
                         "--seq-len", "8", "--quantize-all")
    one_line_error(result, "error: --quantize-all widens --quantize to every linear weight: "
                   "pass --quantize int8 (or int4) with it")
    assert not (tmp_path / "g.onnx").exists()


def test_hf_target_errors_name_parameters_or_options():
    with pytest.raises(moeify.MoEError) as caught:
        target_config("mixtral", models.llama(), MoEConfig(top_k=1), explicit={"top_k"})
    error = caught.value
    assert str(error).startswith("hf_arch='mixtral' cannot take MoEConfig.top_k=1: ")
    assert "use MoEConfig.top_k=2 (the default for mixtral) or more, or hf_arch='qwen2_moe'" in str(error)
    cli = error.render(cli=True)
    assert cli.startswith("--hf-arch mixtral cannot take --top-k 1: ")
    assert "use --top-k 2 (the default for mixtral) or more, or --hf-arch qwen2_moe" in cli


def test_an_existing_destination_names_the_callers_parameter_and_force(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    gpt2 = models.gpt2(layers=2)
    moeify.convert(gpt2, MoEConfig(num_experts=4))
    with pytest.raises(moeify.MoEError) as caught:
        moeify.save(gpt2, taken)
    assert str(caught.value) == f"{taken} already exists: choose another path or pass force=True"
    assert caught.value.render(cli=True) == (
        f"{taken} already exists: choose another --out or pass --force")
    with pytest.raises(moeify.MoEError, match="^.* already exists: choose another out or pass "
                       "force=True$"):
        moeify.write(gpt2, taken)
    with pytest.raises(moeify.MoEError) as caught:
        moeify.export_onnx(gpt2, tmp_path / "absent" / "..", seq_len=8)
    assert str(caught.value).startswith(f"path={str(tmp_path / 'absent' / '..')!r} names a "
                                        "directory by '.' or '..'")
    assert caught.value.render(cli=True).startswith(
        f"--onnx '{tmp_path / 'absent' / '..'}' names a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_an_existing_destination_names_the_option_and_force_on_the_command_line(
        tmp_path, moeify_main, one_line_error):
    taken = tmp_path / "g.onnx"
    taken.write_text("keep")
    result = moeify_main("export", tmp_path / "absent", "--onnx", taken, "--seq-len", "8")
    line = one_line_error(result, f"error: {taken} already exists: choose another --onnx or "
                          "pass --force")
    assert "force=True" not in line and taken.read_text() == "keep"


def test_moe_op_is_named_as_a_parameter_or_an_option(tmp_path, moeify_main, one_line_error):
    gpt2 = models.gpt2(layers=2)
    with pytest.raises(moeify.MoEError, match="^moe_op='fused' is not one of static, ort$"):
        moeify.export_onnx(gpt2, tmp_path / "g.onnx", seq_len=8, moe_op="fused")
    moeify.convert(gpt2, MoEConfig(num_experts=4), seq_len=8)
    with pytest.raises(moeify.MoEError) as caught:  # float64 experts: no layer takes the op
        moeify.export_onnx(gpt2.double(), tmp_path / "g.onnx", seq_len=8, moe_op="ort")
    assert str(caught.value).startswith("moe_op='ort': no expert layer can be written as ")
    assert str(caught.value).endswith(": export with moe_op='static'")
    cli = caught.value.render(cli=True)
    assert cli.startswith("--moe-op ort: ") and cli.endswith(": export with --moe-op static")
    result = moeify_main("export", tmp_path / "absent", "--onnx", tmp_path / "g.onnx",
                         "--seq-len", "8", "--moe-op", "fused")
    one_line_error(result, "error: --moe-op 'fused' is not one of static, ort")
    assert not (tmp_path / "g.onnx").exists()


def test_distill_names_its_rule_parameter():
    with pytest.raises(moeify.MoEError, match="^rule='median' is not one of mean, usage$"):
        moeify.distill(models.gpt2(layers=2), rule="median")
