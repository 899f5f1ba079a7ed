"""Where a dense model comes from: a local HF directory, a hub id, a preset, a factory.

`load_source(ref)` turns the CLI's MODEL argument into an ``nn.Module`` and a `Source`
record (saved in checkpoints, so `moeify.load` can rebuild the architecture):

| MODEL | what happens |
| --- | --- |
| a directory with ``config.json`` | ``transformers`` loads it (weights: safetensors first) |
| a directory with ``moeify.json`` | refused for conversion: it is already converted |
| ``package.module:factory`` | the factory is imported and called; it returns the model |
| a hub id (``t5-base``) | ``from_pretrained`` from the local cache only (no network here) |
| a preset id with ``random_init`` | the architecture from built-in facts, fresh weights |

``device="meta"`` builds any of them without allocating weights (for `inspect`).
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeify.errors import MoEError

CHECKPOINT_FILE = "moeify.json"

# Architecture facts of well-known checkpoints (from their published config.json), so
# `--random-init` and `inspect` work offline. Values not listed take transformers'
# defaults for the config class.
PRESETS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # id: (config class, model class, config fields)
    "t5-small": ("T5Config", "T5ForConditionalGeneration", dict(
        d_model=512, d_ff=2048, d_kv=64, num_layers=6, num_heads=8, vocab_size=32128)),
    "t5-base": ("T5Config", "T5ForConditionalGeneration", dict(
        d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_heads=12, vocab_size=32128)),
    "t5-large": ("T5Config", "T5ForConditionalGeneration", dict(
        d_model=1024, d_ff=4096, d_kv=64, num_layers=24, num_heads=16, vocab_size=32128)),
    "t5-3b": ("T5Config", "T5ForConditionalGeneration", dict(
        d_model=1024, d_ff=16384, d_kv=128, num_layers=24, num_heads=32, vocab_size=32128)),
    "t5-11b": ("T5Config", "T5ForConditionalGeneration", dict(
        d_model=1024, d_ff=65536, d_kv=128, num_layers=24, num_heads=128, vocab_size=32128)),
    "google/t5-v1_1-base": ("T5Config", "T5ForConditionalGeneration", dict(
        d_model=768, d_ff=2048, d_kv=64, num_layers=12, num_heads=12, vocab_size=32128,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "google/flan-t5-base": ("T5Config", "T5ForConditionalGeneration", dict(
        d_model=768, d_ff=2048, d_kv=64, num_layers=12, num_heads=12, vocab_size=32128,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "bert-base-uncased": ("BertConfig", "BertModel", dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, vocab_size=30522)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)),
    "gpt2-medium": ("GPT2Config", "GPT2LMHeadModel", dict(
        n_embd=1024, n_layer=24, n_head=16, n_positions=1024, vocab_size=50257)),
    "meta-llama/Llama-3.2-1B": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True)),
}


@dataclass(frozen=True)
class Source:
    """Where a model came from; enough to rebuild its architecture.

    kind: "hf-dir", "hub", "preset" or "factory".
    ref: the MODEL argument as given.
    hf_config: the transformers config as a dict (HF kinds), saved with checkpoints.
    model_class: the transformers model class name (HF kinds).
    """

    kind: str
    ref: str
    model_class: str | None = None
    hf_config: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Source:
        return cls(**data)


def load_source(
    ref: str,
    *,
    random_init: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, Source]:
    """The dense model MODEL names, and its `Source`. See the module docs."""
    path = Path(ref)
    if path.is_dir():
        if (path / CHECKPOINT_FILE).exists():
            raise MoEError(
                f"{ref} is a moeify checkpoint (it has {CHECKPOINT_FILE}): it is already "
                "converted; convert its dense source model instead, or load it with "
                "moeify.load"
            )
        if not (path / "config.json").exists():
            raise MoEError(
                f"{ref} is a directory without config.json: point MODEL at a Hugging Face "
                "model directory (config.json + weights) or a moeify checkpoint"
            )
        return _from_hf_dir(path, random_init=random_init, dtype=dtype, device=device)
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", ref):
        module_name, _, attr = ref.partition(":")
        return _from_factory(ref, module_name, attr, dtype=dtype, device=device)
    if random_init:
        if ref not in PRESETS:
            raise MoEError(
                f"no built-in architecture for {ref!r} to build with --random-init; presets: "
                + ", ".join(sorted(PRESETS))
                + "; or pass a local model directory"
            )
        return _from_preset(ref, dtype=dtype, device=device)
    return _from_hub(ref, dtype=dtype, device=device)


def preset_config(ref: str):
    import transformers

    config_class, model_class, fields = PRESETS[ref]
    return getattr(transformers, config_class)(**fields), model_class


def build_hf(model_class: str, config, *, dtype=None, device=None) -> nn.Module:
    """A transformers model with fresh weights from a config (on ``device``)."""
    import transformers

    cls = getattr(transformers, model_class)
    with torch.device(device or "cpu"):
        model = cls(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _from_preset(ref: str, *, dtype, device) -> tuple[nn.Module, Source]:
    config, model_class = preset_config(ref)
    model = build_hf(model_class, config, dtype=dtype, device=device)
    return model, Source("preset", ref, model_class, config.to_dict())


def _model_class_for(config) -> str:
    import transformers

    for name in getattr(config, "architectures", None) or []:
        if hasattr(transformers, name):
            return name
    model_type = getattr(config, "model_type", "")
    defaults = {"t5": "T5ForConditionalGeneration", "gpt2": "GPT2LMHeadModel",
                "llama": "LlamaForCausalLM"}
    if model_type in defaults:
        return defaults[model_type]
    return type(transformers.AutoModel.from_config(config)).__name__  # pragma: no cover


def _from_hf_dir(path: Path, *, random_init: bool, dtype, device) -> tuple[nn.Module, Source]:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as error:  # noqa: BLE001 - reported with the path and the cause
        raise MoEError(f"cannot read {path / 'config.json'}: {error}") from error
    model_class = _model_class_for(config)
    source = Source("hf-dir", str(path), model_class, config.to_dict())
    if random_init or (device is not None and torch.device(device).type == "meta"):
        return build_hf(model_class, config, dtype=dtype, device=device), source
    cls = getattr(transformers, model_class)
    try:
        model = cls.from_pretrained(path, dtype=dtype, use_safetensors=None)
    except Exception as error:  # noqa: BLE001 - reported with the path and the cause
        raise MoEError(f"cannot load the weights in {path}: {error}") from error
    return model.eval(), source


def _from_hub(ref: str, *, dtype, device) -> tuple[nn.Module, Source]:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(ref, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: say how to get it
        hint = (
            f"; or build the architecture with fresh weights: --random-init"
            if ref in PRESETS else ""
        )
        raise MoEError(
            f"model {ref!r} is not a local directory and is not in the Hugging Face cache "
            f"(this machine has no network): download it elsewhere with "
            f"`huggingface-cli download {ref}` and pass its directory{hint}"
        ) from None
    model_class = _model_class_for(config)
    source = Source("hub", ref, model_class, config.to_dict())
    if device is not None and torch.device(device).type == "meta":
        return build_hf(model_class, config, dtype=dtype, device=device), source
    model = getattr(transformers, model_class).from_pretrained(
        ref, local_files_only=True, dtype=dtype
    )
    return model.eval(), source


def _from_factory(ref: str, module_name: str, attr: str, *, dtype, device):
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise MoEError(f"cannot import {module_name!r} for {ref!r}: {error}") from error
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise MoEError(f"{ref!r}: {module_name} has no callable {attr!r}")
    with torch.device(device or "cpu"):
        model = factory()
    if not isinstance(model, nn.Module):
        raise MoEError(f"{ref!r} returned {type(model).__name__}, not a torch.nn.Module")
    if dtype is not None:
        model = model.to(dtype)
    return model, Source("factory", ref)


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    meta_path = Path(path) / CHECKPOINT_FILE
    if not meta_path.exists():
        raise MoEError(f"{path} is not a moeify checkpoint (no {CHECKPOINT_FILE})")
    return json.loads(meta_path.read_text())
