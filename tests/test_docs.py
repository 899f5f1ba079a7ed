"""README.md and docs/*.md run as written.

- Every fenced block is ```python, ```bash or ```text (output, pictures, and commands
  that need more than a test should spend: each such block says which test runs it).
- The blocks of one page run in page order in one working directory, so a later block
  reads what an earlier one wrote (``moeify verify t5-switch-8`` after the ``convert``
  that wrote it). The directory holds tiny models saved with ``save_pretrained`` under
  the names the pages use, ``models/t5``, ``models/llama``, ``models/gpt2``: that is the
  one substitution, the commands themselves run verbatim.
- ```bash lines: ``moeify ...`` runs in this process (`moeify_main`) and must exit 0;
  ``make TARGET`` must name a target of the Makefile (``make test`` is this suite, and
  ``make demo``'s two commands are the README's MiniLM pair, checked below).
- ```python blocks run in a fresh namespace each; a block that calls
  ``dist.init_process_group`` runs as the torchrun script it says it is, on 2 processes.
- ``moeify ...`` in `inline code` names a command the CLI has and only its options.
- Relative links point at files that exist, and ``#anchors`` at headings they have.
- docs/cli.md is what docs/gen_cli.py writes today.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import models

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LANGUAGES = {"python", "bash", "text"}


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def fenced_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number, language, code) of every fenced block, in page order."""
    return [(text[:m.start()].count("\n") + 1, m.group(1), m.group(2))
            for m in FENCE.finditer(text)]


def command_lines(code: str) -> list[str]:
    """The commands of a bash block: one per line, comments and blank lines dropped."""
    lines = []
    for line in code.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """``models/{t5,llama,gpt2}``: `tests.models` (seed 0) saved with ``save_pretrained``."""
    root = tmp_path_factory.mktemp("doc-models")
    for name, make in (("t5", models.t5), ("llama", models.llama), ("gpt2", models.gpt2)):
        torch.manual_seed(0)
        make().save_pretrained(root / "models" / name)
    return root / "models"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_fenced_block_names_a_language_the_tests_know(page):
    for line, language, _ in fenced_blocks(page.read_text()):
        assert language in LANGUAGES, f"{page_id(page)}:{line}: ```{language}"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_page_blocks_run_in_order(page, tiny_models, tmp_path, monkeypatch, moeify_main):
    blocks = [b for b in fenced_blocks(page.read_text()) if b[1] in ("python", "bash")]
    if not blocks:
        pytest.skip("no code to run")
    (tmp_path / "models").symlink_to(tiny_models, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    makefile = (ROOT / "Makefile").read_text()
    for line, language, code in blocks:
        where = f"{page_id(page)}:{line}"
        if language == "python" and "init_process_group" in code:
            run_under_torchrun(code, tmp_path, where)
        elif language == "python":
            exec(compile(code, where, "exec"), {"__name__": "__docs__"})
        else:
            for command in command_lines(code):
                words = shlex.split(command)
                if words[0] == "make":
                    assert re.search(rf"^{words[1]}:", makefile, re.M), f"{where}: {command}"
                    continue
                assert words[0] == "moeify", f"{where}: {command!r} is not a moeify command"
                result = moeify_main(*words[1:])
                output = result.stdout[-2000:] + result.stderr[-3000:]
                assert result.returncode == 0, f"{where}: {command}\n{output}"


def run_under_torchrun(code: str, cwd: Path, where: str) -> None:
    script = cwd / "block.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
         str(script)],
        capture_output=True, text=True, timeout=600, cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, f"{where}\n{result.stderr[-3000:]}"


def inline_commands(text: str) -> list[str]:
    prose = FENCE.sub("", text)
    return re.findall(r"`(moeify [a-z][^`]*)`", prose)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_inline_commands_use_existing_commands_and_options(page):
    import typer

    from moeify.cli import app

    group = typer.main.get_command(app)
    for line in inline_commands(page.read_text()):
        name = line.split()[1]
        assert name in group.commands, f"{page_id(page)}: {line!r}: no command {name!r}"
        options = {"--help"} | {opt for param in group.commands[name].params
                                 for opt in (*param.opts, *param.secondary_opts)}
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line):
            assert option in options, f"{page_id(page)}: {line!r}: moeify {name} has no {option}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_and_anchors_resolve(page):
    text = FENCE.sub("", page.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page_id(page)}: link to missing {target}"
        if anchor and file.suffix == ".md":
            anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
            assert anchor in anchors, f"{page_id(page)}: no heading for #{anchor} in {path}"


def test_cli_reference_is_generated_from_the_app():
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    gen_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_cli)
    text = gen_cli.render()
    assert (ROOT / "docs" / "cli.md").read_text() == text, "run: python docs/gen_cli.py"
    import dataclasses

    from moeify.config import MoEConfig

    for field in dataclasses.fields(MoEConfig):  # one row per field, under its option
        assert f"| `{field.metadata['cli'][0]}`" in text and f"| `{field.name}` |" in text
