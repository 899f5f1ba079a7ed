"""``save_pretrained`` on a converted transformers model writes a moeify checkpoint.

A converted model keeps its transformers class (`moeify.apply`), so its inherited
``save_pretrained`` would write a ``config.json`` and weights that the dense class loads
with ``from_pretrained``: silently, with freshly initialized FFNs in place of the Switch
layers (transformers only logs the missing and unexpected keys). `moeify.apply` therefore
gives every converted transformers model a ``save_pretrained`` of its own (an instance
attribute; the class is untouched), which writes the moeify checkpoint into the
directory instead: ``moeify.load(directory)`` reads it back exactly, and
``AutoModel*.from_pretrained`` refuses it (there is no ``config.json``). The dense class's
own ``from_pretrained`` falls back to its default config: it fails on any shape that
differs, and otherwise reports the Switch layers' keys as unexpected and the FFNs' as
missing (transformers' load report). ``Trainer`` checkpoints go
through the same method, and its resume and best-model reloading read the shards through
the standard ``model.safetensors.index.json``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any

from torch import nn

from moeify.checkpoint import save
from moeify.errors import MoEError
from moeify.io.shards import INDEX_FILE
from moeify.sources import CHECKPOINT_FILE

# what a previous save left in the directory and this one replaces
_OWN_FILES = ("model-*.safetensors", INDEX_FILE, CHECKPOINT_FILE)


def install_save_pretrained(model: nn.Module) -> None:
    """Give a converted transformers model the moeify ``save_pretrained``."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = types.MethodType(save_pretrained, model)


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    is_main_process: bool = True,
    state_dict: dict[str, Any] | None = None,
    **kwargs: Any,
) -> None:
    """Write ``model`` as a moeify checkpoint into ``save_directory`` (created if needed).

    Other files in the directory (a ``Trainer``'s optimizer and scheduler states) are
    kept; a previous moeify checkpoint there is replaced file by file, ``moeify.json``
    last. ``state_dict``, when given, must hold the model's own tensors (what
    ``Trainer`` passes); the other transformers options (sharding, hub upload,
    serialization format) do not apply to a moeify checkpoint and are ignored.
    """
    if not is_main_process:
        return
    if state_dict is not None:
        own = model.state_dict()
        foreign = sorted(set(state_dict) - set(own))
        if foreign:
            raise MoEError(f"save_pretrained got a state_dict with tensors the converted model "
                           f"does not have ({foreign[0]}, ...): save the model itself")
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise MoEError(f"{directory} is a file: save_pretrained writes a directory")
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".moeify-save-", dir=directory))
    try:
        save(model, staging / "checkpoint")
        for pattern in _OWN_FILES:
            for old in directory.glob(pattern):
                old.unlink()
        written = sorted(p for p in (staging / "checkpoint").iterdir() if p.name != CHECKPOINT_FILE)
        for path in written + [staging / "checkpoint" / CHECKPOINT_FILE]:
            os.replace(path, directory / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
