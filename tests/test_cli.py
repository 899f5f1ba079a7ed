"""The command line: instant help, versions, one-line errors."""

import subprocess
import sys

import moeify


def run(*args):
    return subprocess.run([sys.executable, "-m", "moeify", *args], capture_output=True,
                          text=True, timeout=120)


def test_help_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from moeify.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "assert 'version' in r.output; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_version_via_python_dash_m():
    result = run("version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"moeify {moeify.__version__} (torch ")


def test_unknown_command_fails_with_usage():
    result = run("frobnicate")
    assert result.returncode != 0
    assert "No such command" in result.stderr
