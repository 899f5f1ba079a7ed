"""moeify checkpoints: sharded safetensors + ``moeify.json``, written atomically.

Layout of a checkpoint directory::

    moeify.json                     format version, the whole `ConversionPlan` (config,
                                    declared seq_len, sites, sharding), source
                                    (architecture), tied-weight aliases, dtypes
    model.safetensors.index.json    {"metadata": {"total_size": ...}, "weight_map": {...}}
                                    (+ "parts" in the metadata for a tensor larger than
                                    a shard, stored as row blocks NAME::part0, ...)
    model-00001-of-0000N.safetensors

Shards are written one at a time (safetensors serializes a whole file in memory, so
one file for a large model would double peak memory). The directory is assembled under
a temporary name beside the target and renamed into place: an interrupted write
leaves no partial output, and the previous output stays intact until the rename
(`moeify.fs`: the destination is locked for the whole write, free space is checked
first, and temporaries of killed writers are removed by the next write).

Loading applies the stored plan to the source architecture built on the meta device,
then assigns the tensors: it never traces the model, so a later change to FFN discovery
cannot change what an existing checkpoint loads as. Format 1 checkpoints (written before
the plan was stored) are still read: their plan is made again by tracing, and must
select the sites the checkpoint lists.
"""

from __future__ import annotations

import hashlib
import json
import os
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
from moeify.fs import atomic_directory, refuse_existing  # noqa: F401 - re-exported
from moeify.conversion import ConversionPlan, conversion_of
from moeify.sources import CHECKPOINT_FILE, Source, build_hf, non_finite, read_checkpoint_meta

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


# Integrity: sha256 of each tensor's bytes as stored (safetensors: little-endian, C order),
# recorded in moeify.json. sha256: in the standard library, collision-resistant (equal
# digests mean equal tensors, whatever changed them), and with the SHA extensions of
# current x86 and ARM CPUs (which OpenSSL uses) over 1.5 GB/s on one core.
DIGEST_PREFIX = "sha256:"


def tensor_digest(tensor: torch.Tensor) -> str:
    """``"sha256:<hex>"`` of a tensor's bytes, as `write_shards` records it."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def write_shards(
    specs: dict[str, torch.Tensor],
    directory: Path,
    fetch: Callable[[str], Iterable[torch.Tensor]],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress=None,
    digests: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write tensors as numbered safetensors shards plus the HF-style index, streaming.

    digests: filled with tensor name -> ``"sha256:<hex>"`` of its bytes (the whole
        tensor, however it is split), hashed as they are written: no second pass.

    specs: name -> a tensor with the final shape and dtype (may be on the meta device).
    fetch(name): CPU chunks whose bytes, in order, are the tensor's (a repeated chunk
        writes one expert copy after another without materializing them).
    Each shard's header is written first and every chunk goes straight to the file, so
    no shard is ever assembled in memory. No shard file exceeds ``max_shard_bytes``
    (header included): a tensor too large for one is split along its first axis into
    entries ``NAME::part0``, ``NAME::part1``, ... listed in the index's
    ``metadata.parts`` (NAME -> [[part, rows], ...]); every reader here reassembles them.
    """
    entries = _shard_entries(specs, max_shard_bytes)
    groups: list[list[tuple[str, str, list[int], int]]] = [[]]
    size = _HEADER_BASE
    for entry in entries:
        cost = _entry_header_bytes(entry[0], entry[2]) + entry[3]
        if groups[-1] and size + cost > max_shard_bytes:
            groups.append([])
            size = _HEADER_BASE
        groups[-1].append(entry)
        size += cost
    last_entry = {source: part for part, source, _, _ in entries}
    parts: dict[str, list[list[Any]]] = {}
    for part, source, shape, _ in entries:
        if part != source:
            parts.setdefault(source, []).append([part, shape[0]])
    streams: dict[str, _TensorBytes] = {}
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups):
        filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for part, source, shape, nbytes in group:
            header[part] = {"dtype": _SAFETENSORS_DTYPES[specs[source].dtype], "shape": shape,
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(directory / filename, "wb") as handle:
            handle.write(len(encoded).to_bytes(8, "little"))
            handle.write(encoded)
            for part, source, _, nbytes in group:
                if source not in streams:
                    streams[source] = _TensorBytes(source, fetch(source), specs[source])
                streams[source].copy(handle, nbytes)
                if last_entry[source] == part:
                    stream = streams.pop(source)
                    stream.finish()
                    if digests is not None:
                        digests[source] = DIGEST_PREFIX + stream.hash.hexdigest()
                weight_map[part] = filename
                total += nbytes
        if progress:
            progress("writing", i + 1, len(groups))
    metadata: dict[str, Any] = {"total_size": total}
    if parts:
        metadata["parts"] = parts
    index = {"metadata": metadata, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return index


PART_SEPARATOR = "::part"
# bytes of a safetensors file besides its entries: length prefix, metadata, padding
_HEADER_BASE = 8 + len(b'{"__metadata__":{"format":"pt"}}') + 7


def _entry_header_bytes(name: str, shape: list[int]) -> int:
    """An upper bound of one entry's header bytes (offsets at their widest)."""
    entry = {name: {"dtype": "BOOL", "shape": shape, "data_offsets": [10**20, 10**20]}}
    return len(json.dumps(entry, separators=(",", ":"))) + 1


def _shard_entries(specs: dict[str, torch.Tensor], limit: int
                   ) -> list[tuple[str, str, list[int], int]]:
    """(entry name, tensor name, shape, bytes) of every stored entry, in order: a tensor
    that cannot fit one shard becomes blocks of rows along its first axis."""
    entries = []
    for name, spec in specs.items():
        if spec.dtype not in _SAFETENSORS_DTYPES:
            raise MoEError(f"cannot store {name} of dtype {spec.dtype} in safetensors")
        shape, nbytes = list(spec.shape), _nbytes(spec)
        if _HEADER_BASE + _entry_header_bytes(name, shape) + nbytes <= limit:
            entries.append((name, name, shape, nbytes))
            continue
        rows = shape[0] if shape else 1
        row_bytes = nbytes // rows if rows else 0
        room = limit - _HEADER_BASE - _entry_header_bytes(f"{name}{PART_SEPARATOR}{rows}", shape)
        per_part = room // row_bytes if row_bytes and room > 0 else 0
        if not shape or per_part < 1:
            raise MoEError(
                f"{name} ({tuple(shape)}, {nbytes:,} bytes) cannot be stored within the shard "
                f"size limit of {limit:,} bytes: one row along its first axis takes "
                f"{row_bytes if shape else nbytes:,} bytes; raise max_shard_bytes"
            )
        for j, start in enumerate(range(0, rows, per_part)):
            count = min(per_part, rows - start)
            entries.append((f"{name}{PART_SEPARATOR}{j}", name, [count, *shape[1:]],
                            count * row_bytes))
    return entries


class _TensorBytes:
    """The bytes of one tensor as its ``fetch`` chunks give them, copied into shard
    files a given number at a time (a split tensor's parts take consecutive runs)."""

    def __init__(self, name: str, chunks: Iterable[torch.Tensor], spec: torch.Tensor) -> None:
        self.name, self.spec = name, spec
        self.chunks = iter(chunks)
        self.pending = None
        self.written = 0
        self.hash = hashlib.sha256()  # of every byte written: the tensor's digest

    def _next(self):
        chunk = next(self.chunks, None)
        if chunk is None:
            return None
        chunk = chunk.detach().to("cpu").contiguous().reshape(-1)
        if chunk.dtype != self.spec.dtype:
            raise MoEError(f"{self.name}: got {chunk.dtype}, expected {self.spec.dtype}")
        return chunk.view(torch.uint8).numpy()

    def copy(self, handle, count: int) -> None:
        while count:
            if self.pending is None or not len(self.pending):
                self.pending = self._next()
                if self.pending is None:
                    raise MoEError(f"{self.name}: wrote {self.written} bytes, expected "
                                   f"{_nbytes(self.spec)}")
            piece = self.pending[:count]
            try:
                handle.write(piece)
            except OSError as error:  # name the shard in the message (`moeify.fs`)
                error.filename = error.filename or handle.name
                raise
            self.hash.update(piece)
            self.pending = self.pending[len(piece):]
            self.written += len(piece)
            count -= len(piece)

    def finish(self) -> None:
        extra = 0 if self.pending is None else len(self.pending)
        while (chunk := self._next()) is not None:
            extra += len(chunk)
        if extra or self.written != _nbytes(self.spec):
            raise MoEError(f"{self.name}: wrote {self.written + extra} bytes, expected "
                           f"{_nbytes(self.spec)}")


def _checkpoint_meta(plan: ConversionPlan, source: Source | None, aliases, specs,
                     digests: dict[str, str] | None = None) -> dict[str, Any]:
    """``moeify.json``. ``digests``: tensor name -> ``"sha256:<hex>"`` of its bytes in the
    shards, for every stored tensor (tied aliases are not stored); ``source``: see
    `Source` (its ``weights`` fingerprint tells whether a source found later is the one
    that was converted)."""
    meta = {
        "format": "moeify",
        "format_version": FORMAT_VERSION,
        "moeify_version": __version__,
        "plan": plan.to_dict(),
        "source": None if source is None else source.to_dict(),
        "aliases": aliases,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in specs.values()}),
    }
    if digests is not None:
        meta["digests"] = dict(digests)
    return meta


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

    need = sum(_nbytes(t) for t in specs.values())
    with atomic_directory(path, force=force, need=need) as tmp:
        digests: dict[str, str] = {}
        write_shards(specs, tmp, tensors_of, max_shard_bytes, progress, digests=digests)
        meta = _checkpoint_meta(plan, source, aliases, specs, digests)
        (tmp / CHECKPOINT_FILE).write_text(json.dumps(meta, indent=1))
    return Path(path)


# --- reading -------------------------------------------------------------------------------


def read_tensors(path: Path, index: dict[str, Any]) -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint, shard by shard; a damaged shard names its file. A
    tensor stored in parts (``metadata.parts``) is yielded once, reassembled."""
    from safetensors import safe_open

    parts = index.get("metadata", {}).get("parts", {})
    part_of = {part: (name, j) for name, entries in parts.items()
               for j, (part, _) in enumerate(entries)}
    pieces: dict[str, dict[int, torch.Tensor]] = {}
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
                    if name not in part_of:
                        yield name, handle.get_tensor(name)
                        continue
                    whole, j = part_of[name]
                    pieces.setdefault(whole, {})[j] = handle.get_tensor(name)
                    if len(pieces[whole]) == len(parts[whole]):
                        done = pieces.pop(whole)
                        yield whole, torch.cat([done[k] for k in range(len(done))])
        except MoEError:
            raise
        except Exception as error:  # noqa: BLE001 - safetensors raises several kinds
            raise MoEError(
                f"shard {shard} is damaged or truncated ({error}); re-create the checkpoint"
            ) from None
    if pieces:
        name = next(iter(pieces))
        raise MoEError(f"checkpoint {path} lacks parts of {name}: its index lists "
                       f"{len(parts[name])}, the shards hold {len(pieces[name])}")


@dataclass(frozen=True)
class CheckpointMeta:
    """A checkpoint's ``moeify.json``, checked.

    plan: the stored conversion plan (format 2); None for format 1, which stored only
        ``config``, ``seq_len`` and the converted site paths (``sites``).
    digests: tensor name -> ``"sha256:<hex>"`` (None: written before digests were
        recorded).
    """

    path: Path
    version: int
    plan: ConversionPlan | None
    config: MoEConfig
    seq_len: int | None
    sites: tuple[str, ...]
    source: Source | None
    aliases: dict[str, str]
    digests: dict[str, str] | None = None

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
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MoEError(f"{file} is not valid JSON ({error}); re-create the checkpoint") from None
    except OSError as error:
        raise MoEError(f"cannot read {file}: {error.strerror or error}") from None
    if not isinstance(meta, dict):
        raise MoEError(f"{file} is not a moeify checkpoint description (a JSON "
                       f"{type(meta).__name__}, not an object); re-create the checkpoint")
    if meta.get("format") != "moeify":
        found = f"\"format\" is {meta['format']!r}" if "format" in meta else "no \"format\""
        raise MoEError(f"{file} is not a moeify checkpoint description ({found}, not "
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
        digests = meta.get("digests")
        if digests is not None and not (
                isinstance(digests, dict) and all(
                    isinstance(v, str) and v.startswith(DIGEST_PREFIX) for v in digests.values())):
            raise MoEError(f"\"digests\" must map tensor names to \"{DIGEST_PREFIX}<hex>\"")
    except KeyError as error:
        raise MoEError(f"{file} lacks {error} (format {version}); re-create the "
                       "checkpoint") from None
    except (MoEError, TypeError, ValueError, AttributeError) as error:
        raise MoEError(f"{file}: {error}") from None
    return CheckpointMeta(path, version, plan, config, seq_len, sites, source, aliases, digests)


def _dense_skeleton(source: Source, file: Path | None = None) -> nn.Module:
    """The source architecture, its parameters about to be replaced (`_params_to_meta`).

    A factory (``package.module:function``) is called again, on the meta device; should
    it fail there, or leave buffers that no checkpoint restores (non-persistent ones) on
    meta, it is called once more on the CPU. A problem is one `MoEError` naming ``file``.
    """
    import transformers

    where = f"{file}: " if file is not None else ""
    if source.kind == "factory":
        return _factory_skeleton(source, where)
    if source.hf_config is None or source.model_class is None:
        raise MoEError(
            f"{where}the checkpoint's source ({source.kind} {source.ref!r}) cannot be rebuilt: "
            "pass the dense model to moeify.load(path, model=...)"
        )
    if not isinstance(getattr(transformers, source.model_class, None), type):
        raise MoEError(
            f"{where}the source's model class {source.model_class!r} is not a transformers "
            f"class (transformers {transformers.__version__}): upgrade transformers, or pass "
            "the dense model to moeify.load(path, model=...)"
        )
    try:
        config_dict = dict(source.hf_config)
        config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    except (KeyError, ValueError, TypeError) as error:
        raise MoEError(f"{where}cannot rebuild the source's transformers config "
                       f"({type(error).__name__}: {error})") from None
    model = build_hf(source.model_class, config)
    return model


def _factory_skeleton(source: Source, where: str) -> nn.Module:
    from moeify.sources import _from_factory

    module_name, _, attr = source.ref.partition(":")
    try:
        model, _ = _from_factory(source.ref, module_name, attr, dtype=None, device="meta")
    except Exception:  # noqa: BLE001 - some factories cannot run on meta: try the CPU
        model = None
    if model is not None:
        persistent = set(model.state_dict())
        if not any(b.is_meta for n, b in model.named_buffers() if n not in persistent):
            return model
    try:
        model, _ = _from_factory(source.ref, module_name, attr, dtype=None, device=None)
    except MoEError as error:
        raise MoEError(f"{where}rebuilding the source architecture: {error}") from None
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
    path: str | os.PathLike, *, model: nn.Module | None = None, check_digests: bool = True,
) -> tuple[nn.Module, CheckpointWeights]:
    """The converted architecture of a checkpoint with parameters on the meta device.

    Returns the model (buffers real, parameters meta: no weight memory) and a
    `CheckpointWeights` that reads any parameter from the shards on demand. `load` assigns
    them all; `moeify.export_onnx` streams them into an ONNX file one at a time. Every
    whole tensor read is checked against its recorded digest (``check_digests``) and
    every parameter for NaN / inf: either problem is a `MoEError` naming the tensor.
    """
    path = Path(path)
    meta = read_meta(path)
    index = read_index(path)
    if model is None:
        if meta.source is None:
            raise MoEError(
                f"checkpoint {path} records no source architecture: pass the dense model "
                "to moeify.load(path, model=...)"
            )
        model = _dense_skeleton(meta.source, meta.file)
    _params_to_meta(model)
    apply(model, _plan_of(meta, model))
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return model.eval(), CheckpointWeights(path, index, meta.aliases,
                                           digests=meta.digests if check_digests else None,
                                           finite=params)


def read_index(path: Path) -> dict[str, Any]:
    """A checkpoint's ``model.safetensors.index.json``, checked; problems name the file."""
    file = Path(path) / INDEX_FILE
    if not file.exists():
        raise MoEError(f"checkpoint {path} has no {INDEX_FILE}")
    try:
        index = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MoEError(f"{file} is not valid JSON ({error}); re-create the checkpoint") from None
    except OSError as error:
        raise MoEError(f"cannot read {file}: {error.strerror or error}") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise MoEError(f"{file} has no \"weight_map\" object; re-create the checkpoint")
    return index


class CheckpointWeights:
    """Name -> tensor access to a checkpoint's shards, aliases (tied weights) resolved.

    digests: name -> recorded ``"sha256:<hex>"``; each whole tensor read (`get`, `all`)
        is hashed and compared, a mismatch is a `MoEError` naming tensor and shard
        (None: not checked; `get_slice` reads part of a tensor and cannot be checked).
    finite: names (parameters) refused when they hold NaN or inf.
    """

    def __init__(self, path: Path, index: dict[str, Any], aliases: dict[str, str], *,
                 digests: dict[str, str] | None = None,
                 finite: set[str] | frozenset[str] = frozenset()) -> None:
        self.digests = digests
        self.finite = set(finite)
        self.path, self.index = path, index
        self.files = dict(index["weight_map"])
        # a tensor split over shards: name -> [(part, rows), ...] (`write_shards`)
        self.parts = {name: [(part, int(rows)) for part, rows in entries]
                      for name, entries in index.get("metadata", {}).get("parts", {}).items()}
        for alias, canonical in aliases.items():
            if canonical in self.files:
                self.files[alias] = self.files[canonical]
        self.aliases = dict(aliases)

    def __contains__(self, name: str) -> bool:
        return name in self.files or self.aliases.get(name, name) in self.parts

    def _shard_of(self, name: str) -> str:
        """The shard file(s) holding a tensor (a split tensor: those of its parts)."""
        name = self.aliases.get(name, name)
        if name in self.parts:
            return ", ".join(sorted({self.files.get(part, "?") for part, _ in self.parts[name]}))
        return self.files.get(name, "?")

    def check(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the whole of ``name``) if it holds no NaN / inf where a parameter
        must not and matches its recorded digest; else a `MoEError` naming it."""
        canonical = self.aliases.get(name, name)
        bad = non_finite(tensor) if (name in self.finite or canonical in self.finite) else None
        expected = None if self.digests is None else self.digests.get(canonical)
        changed = expected is not None and tensor_digest(tensor) != expected
        where = f"tensor {canonical} in shard {self.path / self._shard_of(canonical)}"
        if bad:
            why = ("" if expected is None else
                   "; it does not match its recorded digest either: the file changed after "
                   "it was written" if changed else "; its digest matches: it was saved that way")
            raise MoEError(f"{where} holds non-finite values ({bad}){why}")
        if changed:
            raise MoEError(f"{where} does not match its recorded digest (the file changed "
                           "after it was written: damaged or edited); re-create the checkpoint "
                           "or restore it from a copy")
        return tensor

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard (only that tensor comes into memory)."""
        parts = self.parts.get(self.aliases.get(name, name))
        if parts is not None:
            return self.check(name, torch.cat([self.get(part) for part, _ in parts]))
        return self.check(name, self._read(name, lambda handle, key: handle.get_tensor(key)))

    def get_slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor's first axis, reading only those bytes (of a
        tensor stored in parts, only the rows needed from each part)."""
        parts = self.parts.get(self.aliases.get(name, name))
        if parts is None:
            return self._read(name, lambda handle, key: handle.get_slice(key)[start:stop])
        start, stop, _ = slice(start, stop).indices(sum(rows for _, rows in parts))
        pieces, offset = [], 0
        for part, rows in parts:
            a, b = max(start, offset) - offset, min(stop, offset + rows) - offset
            if a < b or (not pieces and part == parts[-1][0]):
                a, b = (a, b) if a < b else (0, 0)
                pieces.append(self._read(part, lambda h, k, a=a, b=b: h.get_slice(k)[a:b]))
            offset += rows
        return torch.cat(pieces)

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
        state = {name: self.check(name, tensor)
                 for name, tensor in read_tensors(self.path, self.index)}
        for alias, canonical in self.aliases.items():
            state[alias] = state[canonical]
        return state


def load(path: str | os.PathLike, *, model: nn.Module | None = None,
         check_digests: bool = True) -> nn.Module:
    """Rebuild a converted model from a moeify checkpoint and load its weights.

    The architecture comes from the checkpoint's source (a transformers class and config,
    or a ``package.module:function`` factory called again; or ``model``, a dense model of
    that architecture), built with its parameters on the meta device; the stored plan is
    applied to it (no tracing), then every parameter is assigned straight from the
    shards, so peak memory stays near one copy of the checkpoint.

    check_digests: compare every tensor with the sha256 digest recorded when it was
        written (checkpoints from before digests load unchecked); a tensor that differs
        is a `MoEError` naming it and its shard. A parameter holding NaN or inf is
        refused either way.
    """
    model, weights = load_skeleton(path, model=model, check_digests=check_digests)
    try:
        model.load_state_dict(weights.all(), strict=True, assign=True)
    except RuntimeError as error:
        raise MoEError(f"checkpoint {path} does not match its architecture: {error}") from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()
