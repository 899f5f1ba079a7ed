"""moeify checkpoints: sharded safetensors + ``moeify.json``, written atomically.

Layout of a checkpoint directory::

    moeify.json                     format version, the whole `ConversionPlan` (config,
                                    declared seq_len, sites, sharding), source
                                    (architecture), tied-weight aliases, dtypes
    model.safetensors.index.json    {"metadata": {"total_size": ...}, "weight_map": {...}}
    model-00001-of-0000N.safetensors

Shards are written one at a time (safetensors serializes a whole file in memory, so
one file for a large model would double peak memory). The directory is assembled under
a temporary name beside the target and renamed into place: an interrupted write
leaves no partial output, and the previous output stays intact until the rename.

Loading applies the stored plan to the source architecture built on the meta device,
then assigns the tensors: it never traces the model, so a later change to FFN discovery
cannot change what an existing checkpoint loads as. Format 1 checkpoints (written before
the plan was stored) are still read: their plan is made again by tracing, and must
select the sites the checkpoint lists.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeify import __version__
from moeify.api import apply
from moeify.api import plan as make_plan
from moeify.config import MoEConfig
from moeify.errors import MoEError
from moeify.conversion import ConversionPlan, conversion_of
from moeify.sources import CHECKPOINT_FILE, Source, build_hf, read_checkpoint_meta

INDEX_FILE = "model.safetensors.index.json"
FORMAT_VERSION = 2
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
    """State dict without tied duplicates, and alias -> canonical name for those.

    Meta tensors (layers still to be materialized) are never tied.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        if not tensor.is_meta and tensor.numel():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                   tuple(tensor.shape))
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
        tensors[name] = tensor
    return tensors, aliases


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def write_shards(
    specs: dict[str, torch.Tensor],
    directory: Path,
    fetch: Callable[[str], Iterable[torch.Tensor]],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress=None,
) -> dict[str, Any]:
    """Write tensors as numbered safetensors shards plus the HF-style index, streaming.

    specs: name -> a tensor with the final shape and dtype (may be on the meta device).
    fetch(name): CPU chunks whose bytes, in order, are the tensor's (a repeated chunk
        writes one expert copy after another without materializing them).
    Each shard's header is written first and every chunk goes straight to the file, so
    no shard is ever assembled in memory.
    """
    groups: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        if groups[-1] and size + _nbytes(spec) > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += _nbytes(spec)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(groups):
        filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            spec = specs[name]
            if spec.dtype not in _SAFETENSORS_DTYPES:
                raise MoEError(f"cannot store {name} of dtype {spec.dtype} in safetensors")
            header[name] = {"dtype": _SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [offset, offset + _nbytes(spec)]}
            offset += _nbytes(spec)
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(directory / filename, "wb") as handle:
            handle.write(len(encoded).to_bytes(8, "little"))
            handle.write(encoded)
            for name in names:
                written = 0
                for chunk in fetch(name):
                    chunk = chunk.detach().to("cpu").contiguous().reshape(-1)
                    if chunk.dtype != specs[name].dtype:
                        raise MoEError(f"{name}: got {chunk.dtype}, expected {specs[name].dtype}")
                    handle.write(chunk.view(torch.uint8).numpy())
                    written += _nbytes(chunk)
                if written != _nbytes(specs[name]):
                    raise MoEError(f"{name}: wrote {written} bytes, expected {_nbytes(specs[name])}")
                weight_map[name] = filename
                total += written
        if progress:
            progress("writing", i + 1, len(groups))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return index


def refuse_existing(out: Path) -> None:
    """Raise `MoEError` if ``out`` exists (outputs are replaced only with ``force``)."""
    if out.exists():
        raise MoEError(f"{out} already exists: choose another --out or pass --force")


class atomic_directory:
    """``with atomic_directory(out, force=...) as tmp:`` build ``tmp``, renamed to ``out``
    on success; removed on failure. An existing ``out`` is refused without ``force``, and
    replaced only after the new one is complete."""

    def __init__(self, out: str | os.PathLike, *, force: bool = False) -> None:
        self.out = Path(out)
        self.force = force

    def __enter__(self) -> Path:
        if not self.force:
            refuse_existing(self.out)
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


def _checkpoint_meta(plan: ConversionPlan, source: Source | None, aliases, specs) -> dict[str, Any]:
    return {
        "format": "moeify",
        "format_version": FORMAT_VERSION,
        "moeify_version": __version__,
        "plan": plan.to_dict(),
        "source": None if source is None else source.to_dict(),
        "aliases": aliases,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in specs.values()}),
    }


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    source: Source | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress=None,
    fetch: Callable[[str], Iterable[torch.Tensor]] | None = None,
) -> Path:
    """Write a converted model as a moeify checkpoint directory (see the module docs).

    ``fetch(name)``: the chunks of a parameter still on the meta device (the streaming
    converter's Switch layers, `moeify.stream`).
    """
    plan = conversion_of(model)
    if plan is None:
        raise MoEError("the model is not converted: run moeify.convert before moeify.save")
    source = source or hf_source_of(model)
    specs, aliases = _canonical_tensors(model)

    def tensors_of(name: str) -> Iterable[torch.Tensor]:
        tensor = specs[name]
        if not tensor.is_meta:
            return [tensor]
        if fetch is None:
            raise MoEError(f"{name} has no data (meta device): nothing to save")
        return fetch(name)

    with atomic_directory(path, force=force) as tmp:
        write_shards(specs, tmp, tensors_of, max_shard_bytes, progress)
        meta = _checkpoint_meta(plan, source, aliases, specs)
        (tmp / CHECKPOINT_FILE).write_text(json.dumps(meta, indent=1))
    return Path(path)


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


@dataclass(frozen=True)
class CheckpointMeta:
    """A checkpoint's ``moeify.json``, checked.

    plan: the stored conversion plan (format 2); None for format 1, which stored only
        ``config``, ``seq_len`` and the converted site paths (``sites``).
    """

    path: Path
    version: int
    plan: ConversionPlan | None
    config: MoEConfig
    seq_len: int | None
    sites: tuple[str, ...]
    source: Source | None
    aliases: dict[str, str]

    @property
    def file(self) -> Path:
        return self.path / CHECKPOINT_FILE


def read_meta(path: str | os.PathLike) -> CheckpointMeta:
    """Read and check a checkpoint's ``moeify.json``; every problem is one `MoEError`
    line that names the file."""
    path = Path(path)
    file = path / CHECKPOINT_FILE
    try:
        meta = read_checkpoint_meta(path)
    except json.JSONDecodeError as error:
        raise MoEError(f"{file} is not valid JSON ({error}); re-create the checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != "moeify":
        raise MoEError(f"{file} is not a moeify checkpoint description (no \"format\": "
                       "\"moeify\"); re-create the checkpoint")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MoEError(f"{file}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise MoEError(f"{file} is format {version}; this moeify reads formats 1 to "
                       f"{FORMAT_VERSION}: upgrade moeify")
    try:
        source = Source.from_dict(meta["source"]) if meta.get("source") else None
        if version == 1:
            plan = None
            config = MoEConfig.from_dict(meta["config"])
            seq_len, sites = meta.get("seq_len"), tuple(meta["sites"])
        else:
            plan = ConversionPlan.from_dict(meta["plan"])
            config, seq_len, sites = plan.config, plan.seq_len, plan.selected
        aliases = dict(meta.get("aliases", {}))
    except KeyError as error:
        raise MoEError(f"{file} lacks {error} (format {version}); re-create the "
                       "checkpoint") from None
    except (MoEError, TypeError, ValueError) as error:
        raise MoEError(f"{file}: {error}") from None
    return CheckpointMeta(path, version, plan, config, seq_len, sites, source, aliases)


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
    """Free the parameters (they are about to be loaded); buffers stay real.

    A parameter shared by several modules (tied embeddings) stays one parameter.
    """
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in replaced:
                replaced[id(param)] = param if param.is_meta else nn.Parameter(
                    param.detach().to("meta"), requires_grad=param.requires_grad
                )
            module._parameters[name] = replaced[id(param)]


def _plan_of(meta: CheckpointMeta, model: nn.Module) -> ConversionPlan:
    """The stored plan; for a format 1 checkpoint, made again by tracing the model."""
    if meta.plan is not None:
        return meta.plan
    plan = make_plan(model, meta.config, seq_len=meta.seq_len)
    if plan.selected != meta.sites:
        raise MoEError(
            f"rebuilding the format 1 checkpoint {meta.path} selects {list(plan.selected)}, "
            f"but it holds {list(meta.sites)}: convert the source again with this moeify"
        )
    return plan


def load_skeleton(
    path: str | os.PathLike, *, model: nn.Module | None = None
) -> tuple[nn.Module, CheckpointWeights]:
    """The converted architecture of a checkpoint with parameters on the meta device.

    Returns the model (buffers real, parameters meta: no weight memory) and a
    `CheckpointWeights` that reads any parameter from the shards on demand. `load` assigns
    them all; `moeify.export_onnx` streams them into an ONNX file one at a time.
    """
    path = Path(path)
    meta = read_meta(path)
    index_path = path / INDEX_FILE
    if not index_path.exists():
        raise MoEError(f"checkpoint {path} has no {INDEX_FILE}")
    index = json.loads(index_path.read_text())
    if model is None:
        if meta.source is None:
            raise MoEError(
                f"checkpoint {path} records no source architecture: pass the dense model "
                "to moeify.load(path, model=...)"
            )
        model = _dense_skeleton(meta.source)
    _params_to_meta(model)
    apply(model, _plan_of(meta, model))
    return model.eval(), CheckpointWeights(path, index, meta.aliases)


class CheckpointWeights:
    """Name -> tensor access to a checkpoint's shards, aliases (tied weights) resolved."""

    def __init__(self, path: Path, index: dict[str, Any], aliases: dict[str, str]) -> None:
        self.path, self.index = path, index
        self.files = dict(index["weight_map"])
        for alias, canonical in aliases.items():
            if canonical in self.files:
                self.files[alias] = self.files[canonical]
        self.aliases = dict(aliases)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard (only that tensor comes into memory)."""
        return self._read(name, lambda handle, key: handle.get_tensor(key))

    def get_slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor's first axis, reading only those bytes."""
        return self._read(name, lambda handle, key: handle.get_slice(key)[start:stop])

    def _read(self, name: str, read: Callable[[Any, str], torch.Tensor]) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise MoEError(f"checkpoint {self.path} holds no tensor {name!r}")
        shard = self.path / self.files[name]
        try:
            with safe_open(str(shard), framework="pt") as handle:
                return read(handle, self.aliases.get(name, name))
        except Exception as error:  # noqa: BLE001 - safetensors raises several kinds
            raise MoEError(
                f"shard {shard} is damaged or truncated ({error}); re-create the checkpoint"
            ) from None

    def all(self) -> dict[str, torch.Tensor]:
        state = dict(read_tensors(self.path, self.index))
        for alias, canonical in self.aliases.items():
            state[alias] = state[canonical]
        return state


def load(path: str | os.PathLike, *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a converted model from a moeify checkpoint and load its weights.

    The architecture comes from the checkpoint's source (or ``model``, a dense model of
    that architecture, when the source was a factory), built with its parameters on the
    meta device; the stored plan is applied to it (no tracing), then every parameter is
    assigned straight from the shards, so peak memory stays near one copy of the
    checkpoint.
    """
    model, weights = load_skeleton(path, model=model)
    try:
        model.load_state_dict(weights.all(), strict=True, assign=True)
    except RuntimeError as error:
        raise MoEError(f"checkpoint {path} does not match its architecture: {error}") from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()
