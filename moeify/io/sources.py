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
| anything that looks like a path (``./x``, ``/x``, ``~/x``, ``a/b/c``) but does not exist | refused: "no such directory" (never taken for a hub id) |

``device="meta"`` builds any of them without allocating weights (for `inspect`).

With real weights, the `Source` also records a fingerprint of them (`weights_fingerprint`:
sha256 over every state-dict tensor's name, dtype, shape and bytes, in order), the dtype
they were loaded in and whether they were freshly initialized, so `moeify verify` can
tell whether the source it finds later is the one that was converted. A local directory
is recorded by its resolved absolute path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeify.errors import MoEError, Param

CHECKPOINT_FILE = "moeify.json"
# fresh weights for a preset: ``random_init=True`` in Python, ``--random-init`` on the CLI
RANDOM_INIT = Param("random_init").given(True)

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

    kind: "hf-dir", "hub", "preset", "factory" (from `load_source`) or "hf" (a
        transformers model saved from Python: its architecture only).
    ref: the MODEL argument (a directory: its resolved absolute path; a factory:
        ``package.module:function``).
    hf_config: the transformers config as a dict (HF kinds), saved with checkpoints.
    model_class: the transformers model class name (HF kinds).
    weights: `weights_fingerprint` of the dense model as loaded (None: not recorded).
    dtype: the dtype the weights were loaded in ("bfloat16"; None: as stored).
    random_init: the weights were freshly initialized (``--random-init``), after
        ``torch.manual_seed(config.seed)``.
    """

    kind: str
    ref: str
    model_class: str | None = None
    hf_config: dict[str, Any] | None = None
    weights: str | None = None
    dtype: str | None = None
    random_init: bool = False

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
    model, source = _load_source(ref, random_init=random_init, dtype=dtype, device=device)
    if device is not None and torch.device(device).type == "meta":
        return model, source
    return model, dataclasses.replace(
        source, weights=weights_fingerprint(model),
        dtype=None if dtype is None else str(dtype).removeprefix("torch."),
        random_init=random_init and source.kind in ("hf-dir", "preset"),
    )


def weights_fingerprint(model: nn.Module) -> str | None:
    """sha256 over the model's state dict in order: each tensor's name, dtype, shape and
    bytes (a tensor tied to an earlier one: its name and the earlier name). None when a
    tensor is on the meta device (no weights to fingerprint)."""
    digest = hashlib.sha256()
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        if tensor.is_meta:
            return None
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
               tuple(tensor.shape), tuple(tensor.stride()))
        digest.update(f"{name}\0".encode())
        if tensor.numel() and key in seen:
            digest.update(f"={seen[key]}\0".encode())
            continue
        seen[key] = name
        digest.update(f"{tensor.dtype} {tuple(tensor.shape)}\0".encode())
        digest.update(tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


def non_finite(tensor: torch.Tensor) -> str | None:
    """"3 NaN, 1 inf" when a floating-point tensor holds non-finite values, else None.

    One reduction first (a sum is non-finite iff an element is, barring overflow of the
    float32 sum itself, which the exact count below then clears), so finite tensors cost
    one read."""
    if tensor.is_meta or not tensor.is_floating_point() or not tensor.numel():
        return None
    if torch.isfinite(tensor.detach().sum(dtype=torch.float32)):
        return None
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    if not nan and not inf:
        return None
    return ", ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "inf")) if n)


def check_finite(model: nn.Module, what: str = "the source model") -> None:
    """Raise `MoEError` naming the first parameter of ``model`` that holds NaN or inf
    (converting it would copy the damage into every expert without a word)."""
    for name, param in model.named_parameters():
        found = non_finite(param)
        if found:
            raise MoEError(f"{what}: parameter {name} holds non-finite values ({found}); "
                           "refusing to convert it (fix or re-download the weights)")


_HUB_ID = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")


def _looks_like_path(ref: str) -> bool:
    """A MODEL that is meant as a local path: ``./x``, ``/x``, ``~/x``, ``x/``, ``a/b/c``
    (a hub id is ``name`` or ``org/name``)."""
    if ref.startswith((".", "~", "/", os.sep)) or ref.endswith(("/", os.sep)):
        return True
    return (os.sep in ref or "/" in ref) and not _HUB_ID.fullmatch(ref)


def _load_source(ref: str, *, random_init: bool, dtype, device) -> tuple[nn.Module, Source]:
    path = Path(ref).expanduser()
    if not path.exists() and _looks_like_path(ref):
        raise MoEError(f"{ref}: no such directory (MODEL looks like a local path; a hub id "
                       "is NAME or ORG/NAME)")
    if path.exists() and not path.is_dir() and _looks_like_path(ref):
        raise MoEError(f"{ref} is a file: MODEL is a model directory (config.json + weights), "
                       "a hub id, a preset id or package.module:factory")
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
                "no built-in architecture for {ref!r} to build with {random_init}; presets: "
                "{presets}; or pass a local model directory",
                ref=ref, random_init=RANDOM_INIT, presets=", ".join(sorted(PRESETS)),
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
    previous = torch.get_default_dtype()
    if dtype is not None and dtype.is_floating_point:  # built in it: never a float32 copy
        torch.set_default_dtype(dtype)                 # first (a 1B model in bf16: 2.5 GB,
    try:                                               # not 4.9 + 2.5)
        with torch.device(device or "cpu"):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
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


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' own "Loading weights" bar off: stderr keeps moeify's messages (the
    CLI shows its own status while loading)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _from_hf_dir(path: Path, *, random_init: bool, dtype, device) -> tuple[nn.Module, Source]:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as error:  # noqa: BLE001 - reported with the path and the cause
        raise MoEError(f"cannot read {path / 'config.json'}: {error}") from error
    model_class = _model_class_for(config)
    source = Source("hf-dir", str(path.resolve()), model_class, config.to_dict())
    if random_init or (device is not None and torch.device(device).type == "meta"):
        return build_hf(model_class, config, dtype=dtype, device=device), source
    cls = getattr(transformers, model_class)
    try:
        with _no_progress_bars():
            model = cls.from_pretrained(path, dtype=dtype, use_safetensors=None)
    except Exception as error:  # noqa: BLE001 - reported with the path and the cause
        raise MoEError(f"cannot load the weights in {path}: {error}") from error
    return model.eval(), source


def _from_hub(ref: str, *, dtype, device) -> tuple[nn.Module, Source]:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(ref, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: say how to get it
        hint = "; or build the architecture with fresh weights: {random_init}"
        raise MoEError(
            "model {ref!r} is not a local directory and is not in the Hugging Face cache "
            "(this machine has no network): download it elsewhere with "
            "`huggingface-cli download {ref}` and pass its directory"
            + (hint if ref in PRESETS else ""),
            ref=ref, random_init=RANDOM_INIT,
        ) from None
    model_class = _model_class_for(config)
    source = Source("hub", ref, model_class, config.to_dict())
    if device is not None and torch.device(device).type == "meta":
        return build_hf(model_class, config, dtype=dtype, device=device), source
    with _no_progress_bars():
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
    needed = _required_parameters(factory)
    if needed:
        raise MoEError(f"{ref!r}: {attr}() needs arguments ({', '.join(needed)}); point MODEL "
                       "at a function that builds the model without arguments")
    try:
        with torch.device(device or "cpu"):
            model = factory()
    except MoEError:
        raise
    except Exception as error:  # noqa: BLE001 - the user's code: report it in one line
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise MoEError(f"{ref!r} raised {type(error).__name__}"
                       f"{': ' + text if text else ''} (MOEIFY_DEBUG=1 shows the traceback)"
                       ) from error
    if not isinstance(model, nn.Module):
        raise MoEError(f"{ref!r} returned {type(model).__name__}, not a torch.nn.Module")
    if dtype is not None:
        model = model.to(dtype)
    return model, Source("factory", ref)


def _required_parameters(function) -> list[str]:
    """Names of the parameters ``function`` cannot be called without."""
    import inspect

    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: just call it
        return []
    return [p.name for p in parameters if p.default is p.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
