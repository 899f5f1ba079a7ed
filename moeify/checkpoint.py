"""moeify checkpoints: sharded safetensors + ``moeify.json``, written atomically.

Layout of a checkpoint directory::

    moeify.json                     format version, MoEConfig, declared seq_len, source
                                    (architecture), converted sites, sharding plan,
                                    tied-weight aliases, dtype
    model.safetensors.index.json    {"metadata": {"total_size": ...}, "weight_map": {...}}
    model-00001-of-0000N.safetensors

Shards are written one at a time (safetensors serializes a whole file in memory, so
one file for a large model would double peak memory). The directory is assembled under
a temporary name beside the target and renamed into place: an interrupted write
leaves no partial output, and the previous output stays intact until the rename.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeify.config import MoEConfig
from moeify.errors import MoEError
from moeify.program import conversion_of
from moeify.sources import CHECKPOINT_FILE, Source, build_hf, read_checkpoint_meta

INDEX_FILE = "model.safetensors.index.json"
FORMAT_VERSION = 1
DEFAULT_SHARD_BYTES = 2 * 2**30


def hf_source_of(model: nn.Module) -> Source | None:
    """The `Source` of a transformers model (its class and config), else None."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    import transformers

    name = type(model).__name__
    if getattr(transformers, name, None) is not type(model):
        return None
    return Source("hf", name, name, config.to_dict())


# --- writing -------------------------------------------------------------------------------


def _canonical_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without tied duplicates, and alias -> canonical name for those."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor
    return tensors, aliases


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor
        size += nbytes
    if shard or not tensors:
        yield shard


def write_shards(
    tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress=None,
) -> dict[str, Any]:
    """Write ``tensors`` as numbered safetensors shards plus the HF-style index."""
    from safetensors.torch import save_file

    groups = list(_shards(tensors, max_shard_bytes))
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups):
        filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        contiguous = {k: v.detach().contiguous().cpu() for k, v in group.items()}
        save_file(contiguous, str(directory / filename), metadata={"format": "pt"})
        for name, tensor in group.items():
            weight_map[name] = filename
            total += tensor.numel() * tensor.element_size()
        if progress:
            progress("writing", i + 1, len(groups))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return index


class atomic_directory:
    """``with atomic_directory(out, force=...) as tmp:`` build ``tmp``, renamed to ``out``
    on success; removed on failure. An existing ``out`` is refused without ``force``, and
    replaced only after the new one is complete."""

    def __init__(self, out: str | os.PathLike, *, force: bool = False) -> None:
        self.out = Path(out)
        self.force = force

    def __enter__(self) -> Path:
        if self.out.exists() and not self.force:
            raise MoEError(f"{self.out} already exists: choose another --out or pass --force")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, kind, error, tb) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        backup = None
        if self.out.exists():
            backup = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, backup)
        os.replace(self.tmp, self.out)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True) if backup.is_dir() else backup.unlink()


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    source: Source | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress=None,
) -> Path:
    """Write a converted model as a moeify checkpoint directory (see the module docs)."""
    conversion = conversion_of(model)
    if conversion is None:
        raise MoEError("the model is not converted: run moeify.convert before moeify.save")
    source = source or hf_source_of(model)
    tensors, aliases = _canonical_tensors(model)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    meta = {
        "format": "moeify",
        "format_version": FORMAT_VERSION,
        "moeify_version": _version(),
        "config": conversion.config.to_dict(),
        "seq_len": conversion.seq_len,
        "source": None if source is None else source.to_dict(),
        "sites": [site.path for site in conversion.sites],
        "sharding": None if conversion.sharding is None else conversion.sharding.to_dict(),
        "aliases": aliases,
        "dtypes": dtypes,
    }
    with atomic_directory(path, force=force) as tmp:
        write_shards(tensors, tmp, max_shard_bytes, progress)
        (tmp / CHECKPOINT_FILE).write_text(json.dumps(meta, indent=1))
    return Path(path)


def _version() -> str:
    from moeify import __version__

    return __version__


# --- reading -------------------------------------------------------------------------------


def read_tensors(path: Path, index: dict[str, Any]) -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint, shard by shard; a damaged shard names its file."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name, filename in index["weight_map"].items():
        by_file.setdefault(filename, []).append(name)
    for filename, names in by_file.items():
        shard = path / filename
        if not shard.exists():
            raise MoEError(f"checkpoint {path} is missing its shard {filename}")
        try:
            with safe_open(str(shard), framework="pt") as handle:
                available = set(handle.keys())
                missing = [n for n in names if n not in available]
                if missing:
                    raise MoEError(f"shard {shard} lacks {missing[0]} (and {len(missing) - 1} more)")
                for name in names:
                    yield name, handle.get_tensor(name)
        except MoEError:
            raise
        except Exception as error:  # noqa: BLE001 - safetensors raises several kinds
            raise MoEError(
                f"shard {shard} is damaged or truncated ({error}); re-create the checkpoint"
            ) from None


def _dense_skeleton(source: Source) -> nn.Module:
    """The source architecture with real buffers and parameters on the meta device."""
    import transformers

    if source.hf_config is None or source.model_class is None:
        raise MoEError(
            f"the checkpoint's source ({source.kind} {source.ref!r}) cannot be rebuilt: "
            "pass the dense model to moeify.load(path, model=...)"
        )
    config_dict = dict(source.hf_config)
    config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = build_hf(source.model_class, config)
    return model


def _params_to_meta(model: nn.Module) -> None:
    """Free the parameters (they are about to be loaded); buffers stay real."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and not param.is_meta:
                module._parameters[name] = nn.Parameter(
                    param.detach().to("meta"), requires_grad=param.requires_grad
                )


def load(path: str | os.PathLike, *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a converted model from a moeify checkpoint and load its weights.

    The architecture comes from the checkpoint's source (or ``model``, a dense model of
    that architecture, when the source was a factory); it is converted again with the
    saved config on meta parameters, then every parameter is assigned straight from the
    shards, so peak memory stays near one copy of the checkpoint.
    """
    from moeify.api import convert

    path = Path(path)
    meta = read_checkpoint_meta(path)
    if meta.get("format") != "moeify" or meta.get("format_version", 0) > FORMAT_VERSION:
        raise MoEError(
            f"{path / CHECKPOINT_FILE} is format {meta.get('format_version')}; this moeify "
            f"reads up to {FORMAT_VERSION}: upgrade moeify"
        )
    index_path = path / INDEX_FILE
    if not index_path.exists():
        raise MoEError(f"checkpoint {path} has no {INDEX_FILE}")
    index = json.loads(index_path.read_text())
    if model is None:
        source = Source.from_dict(meta["source"]) if meta.get("source") else None
        if source is None:
            raise MoEError(
                f"checkpoint {path} records no source architecture: pass the dense model "
                "to moeify.load(path, model=...)"
            )
        model = _dense_skeleton(source)
    _params_to_meta(model)
    config = MoEConfig.from_dict(meta["config"])
    result = convert(model, config, seq_len=meta.get("seq_len"))
    converted = [s.path for s in result.report.sites if s.selected]
    if converted != meta["sites"]:
        raise MoEError(
            f"rebuilding {path} converted {converted}, but the checkpoint holds {meta['sites']}"
        )
    state = dict(read_tensors(path, index))
    for alias, canonical in meta.get("aliases", {}).items():
        state[alias] = state[canonical]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise MoEError(f"checkpoint {path} does not match its architecture: {error}") from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()
