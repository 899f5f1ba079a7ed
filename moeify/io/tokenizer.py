"""The source's tokenizer, carried into every output directory.

A converted model is only usable with the tokenizer it was trained with: transformers'
pipelines and ``AutoTokenizer``, llama.cpp's ``convert_hf_to_gguf.py`` (which embeds the
vocabulary in the GGUF file) and ``moeify export --task`` all read it from the model's
directory. `find_tokenizer` collects the tokenizer files of a source (a local directory,
a moeify checkpoint, a hub id in the local Hugging Face cache); the writers copy them
into the output with the weights, inside the same atomic write.

The files are those ``save_pretrained`` of a tokenizer writes, for every tokenizer kind
transformers has (fast ``tokenizer.json``, SentencePiece models, BPE ``vocab.json`` +
``merges.txt``, WordPiece ``vocab.txt``), with the chat template (``chat_template.jinja``
or ``.json``, and ``additional_chat_templates/``) and the special tokens map. They are
copied byte for byte, never rewritten.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "merges.txt",
    "vocab.txt", "chat_template.jinja", "chat_template.json",
)
TEMPLATES_DIR = "additional_chat_templates"  # transformers 5: named chat templates


@dataclass(frozen=True)
class Tokenizer:
    """A source's tokenizer files. origin: where they are (a directory or a hub id);
    files: file name (relative to the model directory) -> its path."""

    origin: str
    files: dict[str, Path]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.files))

    def copy_to(self, directory: str | os.PathLike) -> tuple[str, ...]:
        """Copy every file into ``directory`` (a staging directory of a writer)."""
        directory = Path(directory)
        for name, path in self.files.items():
            target = directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        return self.names


def _in_directory(directory: Path) -> dict[str, Path]:
    files = {name: directory / name for name in TOKENIZER_FILES
             if (directory / name).is_file()}
    templates = directory / TEMPLATES_DIR
    if templates.is_dir():
        files.update({f"{TEMPLATES_DIR}/{p.name}": p for p in sorted(templates.iterdir())
                      if p.is_file()})
    return files


def _in_hub_cache(repo_id: str) -> dict[str, Path]:
    """The tokenizer files of ``repo_id`` present in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return {}
    files = {}
    for name in TOKENIZER_FILES:
        try:
            found = try_to_load_from_cache(repo_id, name)
        except Exception:  # noqa: BLE001 - not a repo id: no cached tokenizer
            return {}
        if isinstance(found, str):
            files[name] = Path(found)
    return files


def find_tokenizer(where: Any) -> Tokenizer | None:
    """The tokenizer files of a model source, or None when it has none.

    where: a `moeify.io.sources.Source` (a directory or a cached hub model; presets and
        factories have no tokenizer), a directory (a model or a moeify checkpoint), a hub
        id (looked up in the local cache only), a `Tokenizer` (returned as is) or None.
    """
    if where is None or isinstance(where, Tokenizer):
        return where
    kind = getattr(where, "kind", None)
    if kind is not None:  # a Source
        if kind not in ("hf-dir", "hub"):
            return None
        where = where.ref
    path = Path(where)
    files = _in_directory(path) if path.is_dir() else _in_hub_cache(str(where))
    return Tokenizer(str(where), files) if files else None
