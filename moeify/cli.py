"""The ``moeify`` command line: thin commands that translate options into API calls.

Heavy imports (torch, transformers) happen inside commands so ``moeify --help`` is
instant. Library errors (`moeify.MoEError`, ``ValueError`` from a config) are printed
as one line with exit code 1; set ``MOEIFY_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import os
import sys

import typer

app = typer.Typer(
    name="moeify",
    help="Turn a dense Transformer into a Switch Transformer (Mixture-of-Experts).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """moeify: sparse upcycling of dense Transformers into Switch Transformers."""


@app.command()
def version() -> None:
    """Print the versions of moeify and of the libraries it runs on."""
    import torch
    import transformers

    import moeify

    typer.echo(f"moeify {moeify.__version__} (torch {torch.__version__}, "
               f"transformers {transformers.__version__})")


def main() -> None:
    """Console entry point: run the app, turning library errors into one-line messages."""
    try:
        app()
    except Exception as error:  # noqa: BLE001 - the boundary where errors become messages
        from moeify.api import MoEError

        if os.environ.get("MOEIFY_DEBUG") or not isinstance(error, (MoEError, ValueError)):
            raise
        typer.echo(f"error: {error}", err=True)
        sys.exit(1)
