"""Fixtures shared by the test suite: the ``moeify`` command line, run in a child process
(`moeify_cli`) or in this one (`moeify_main`), the check that a command failed with one
line of error (`one_line_error`), and the tiny models of `tests.models` saved as
``from_pretrained`` directories (`t5_dir`, `gpt2_dir`).

`tests.models` and `tests.factories` stay plain modules: the CLI reaches them as
``module:factory`` sources (``moeify convert tests.factories:residual_ffns``), which is
why the child processes run with the repository root on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch

from tests import models

ROOT = Path(__file__).resolve().parent.parent


class MoeifyCLI:
    """``python -m moeify ARGS`` in a child process, from ``cwd`` (the repository root by
    default), with the repository root on ``PYTHONPATH`` and ``env`` added to this
    process's environment. Arguments may be paths or numbers: each is passed as ``str``."""

    def command(self, args: tuple) -> list[str]:
        return [sys.executable, "-m", "moeify", *map(str, args)]

    def environment(self, env: dict[str, str] | None) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}

    def __call__(self, *args, cwd: Path | str = ROOT, env: dict[str, str] | None = None,
                 timeout: float = 600) -> subprocess.CompletedProcess:
        """Run the command to its end: its exit status, stdout and stderr (text)."""
        return subprocess.run(self.command(args), capture_output=True, text=True,
                              timeout=timeout, cwd=cwd, env=self.environment(env))

    def popen(self, *args, cwd: Path | str = ROOT) -> subprocess.Popen:
        """Start the command and return at once (stdout and stderr piped, text), for tests
        that signal or race it while it runs."""
        return subprocess.Popen(self.command(args), cwd=cwd, env=self.environment(None),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules holding a test marked ``slow`` run first, each module's tests still together
    and in order (module fixtures are set up once): under pytest-xdist the long tests then
    start early, and the two workers end together instead of one finishing a long test
    alone while the other waits."""
    slow = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: getattr(item, "module", None) not in slow)


@pytest.fixture(scope="session")
def moeify_cli() -> MoeifyCLI:
    """The command line in a child process: ``moeify_cli("inspect", path, "--json")``."""
    return MoeifyCLI()


@pytest.fixture
def moeify_main(capsys) -> Callable[..., subprocess.CompletedProcess]:
    """The command line's entry point in this process (fast; mocks and monkeypatches
    apply): ``moeify_main("convert", ...)`` gives a `CompletedProcess` like `moeify_cli`'s,
    its output captured with ``capsys``."""
    from moeify.cli import main

    def invoke(*args) -> subprocess.CompletedProcess:
        argv = ["moeify", *map(str, args)]
        with mock.patch.object(sys, "argv", argv), pytest.raises(SystemExit) as stop:
            main()
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, stop.value.code or 0, out, err)

    return invoke


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Assert the command failed with a single ``error: ...`` line on stderr holding every
    fragment; return that line."""
    assert result.returncode != 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def one_line_error() -> Callable[..., str]:
    """``one_line_error(result, *fragments)``: see `assert_one_line_error`."""
    return assert_one_line_error


def saved(tmp_path_factory, name: str, model: torch.nn.Module) -> Path:
    """``model`` written with ``save_pretrained`` under a fresh directory, as ``name``."""
    path = tmp_path_factory.mktemp(name) / name
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    """`tests.models.t5` (seed 0) saved with ``save_pretrained``; one per test module."""
    torch.manual_seed(0)
    return saved(tmp_path_factory, "tiny-t5", models.t5())


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """`tests.models.gpt2` (seed 0) saved with ``save_pretrained``; one per test module."""
    torch.manual_seed(0)
    return saved(tmp_path_factory, "tiny-gpt2", models.gpt2())
