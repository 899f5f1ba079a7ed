"""The sharded safetensors format: the one place that plans, writes, reads and hashes it.

Every moeify writer of safetensors shards (`moeify.save`, `moeify.distributed.save`, the
Mixtral / Qwen2-MoE writer) and every reader (`moeify.load`, `moeify.distributed.load`,
ONNX export from a checkpoint, `moeify verify`) goes through this module. A directory
holds::

    model.safetensors.index.json    {"metadata": {"total_size": N[, "parts": {...}]},
                                     "weight_map": {entry: file, ...}}
    model-00001-of-0000N.safetensors

A shard file is an 8-byte little-endian header length, the JSON header (``__metadata__``
then one ``{"dtype", "shape", "data_offsets"}`` per entry, offsets relative to the end of
the header, padded with spaces to a multiple of 8), then the entries' bytes back to back.
An entry is a whole tensor, or, for a tensor that cannot fit the shard size limit (or that
several ranks write), a block of rows along its first axis named ``NAME::partJ``; the
index's ``metadata.parts`` maps ``NAME`` to ``[[entry, rows], ...]`` in row order, and
every reader here reassembles them.

| step | here |
| --- | --- |
| plan | `plan_shards` (or `split_entries` / `row_blocks` + `group_entries` + `ShardPlan.of`): which entries go in which file, their sizes and header bytes, from shapes alone |
| write | `write_shards` (files and index), `write_files` (given files only): streamed chunk by chunk, no shard assembled in memory |
| read | `read_index`, `ShardReader` (one tensor at a time, row slices, or all), `stored_entries` (each tensor's entries) |
| hash | `tensor_digest` (a tensor in memory), `stored_digest` (its entries read raw from the files); the writer computes the same digest as it writes |

Writers write into a directory that `moeify.io.files.atomic_directory` renames into place when
complete, so an interrupted write leaves no partial output.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeify.errors import MoEError
from moeify.io.sources import non_finite

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 2**30
PART_SEPARATOR = "::part"

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
# bytes of a shard file besides its entries: length prefix, metadata, padding
_HEADER_BASE = 8 + len(b'{"__metadata__":{"format":"pt"}}') + 7
_MAX_HEADER = 100_000_000  # a longer header length prefix means a damaged file
_READ_BLOCK = 1 << 24  # raw reads for hashing: 16 MiB at a time


def nbytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor takes in a shard (also for a tensor on the meta device)."""
    return tensor.numel() * tensor.element_size()


# --- planning ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One safetensors entry: all of tensor ``tensor`` (``name == tensor``) or a block of
    its rows (``name`` is ``tensor::partJ``)."""

    name: str
    tensor: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


@dataclass(frozen=True)
class ShardFile:
    """A shard file: its name and its entries in the order they are stored."""

    name: str
    entries: tuple[Entry, ...]

    def header(self) -> bytes:
        """The file's JSON header, padded to a multiple of 8 bytes (without the length)."""
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for e in self.entries:
            header[e.name] = {"dtype": _SAFETENSORS_DTYPES[e.dtype], "shape": list(e.shape),
                              "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        return encoded + b" " * (-len(encoded) % 8)


@dataclass(frozen=True)
class ShardPlan:
    """Every file of a sharded directory, in order: what `write_files` writes and
    `index` describes."""

    files: tuple[ShardFile, ...]

    @classmethod
    def of(cls, groups: Sequence[Sequence[Entry]]) -> ShardPlan:
        """The files holding ``groups`` (one file each), named ``model-0000i-of-0000N``."""
        n = len(groups)
        return cls(tuple(ShardFile(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(group))
                         for i, group in enumerate(groups)))

    @property
    def split_tensors(self) -> set[str]:
        """Tensors stored as row blocks (``NAME::partJ`` entries)."""
        return {e.tensor for file in self.files for e in file.entries if e.name != e.tensor}

    def index(self) -> dict[str, Any]:
        """The ``model.safetensors.index.json`` content: weight map, total size, and the
        parts of every tensor stored as row blocks."""
        weight_map: dict[str, str] = {}
        parts: dict[str, list[list[Any]]] = {}
        total = 0
        for file in self.files:
            for e in file.entries:
                weight_map[e.name] = file.name
                total += e.nbytes
                if e.name != e.tensor:
                    parts.setdefault(e.tensor, []).append([e.name, e.shape[0]])
        metadata: dict[str, Any] = {"total_size": total}
        if parts:
            metadata["parts"] = parts
        return {"metadata": metadata, "weight_map": weight_map}


def _entry_header_bytes(name: str, shape: Sequence[int]) -> int:
    """An upper bound of one entry's header bytes (offsets at their widest)."""
    entry = {name: {"dtype": "BOOL", "shape": list(shape), "data_offsets": [10**20, 10**20]}}
    return len(json.dumps(entry, separators=(",", ":"))) + 1


def _fits(name: str, shape: Sequence[int], size: int, limit: int) -> bool:
    """Whether an entry ``name`` of ``shape`` and ``size`` bytes fits a shard alone."""
    return _HEADER_BASE + _entry_header_bytes(name, shape) + size <= limit


def _check_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype not in _SAFETENSORS_DTYPES:
        raise MoEError(f"cannot store {name} of dtype {dtype} in safetensors")


def _row_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of one row along the first axis of a tensor of ``shape`` (a scalar: itself)."""
    return torch.Size(shape[1:]).numel() * torch.empty((), dtype=dtype).element_size()


def part_entries(name: str, shape: Sequence[int], dtype: torch.dtype, rows: Sequence[int],
                 first: int = 0) -> list[Entry]:
    """Entries ``NAME::part{first}``, ``NAME::part{first + 1}``, ... holding consecutive
    blocks of ``rows`` rows of tensor ``name`` (of ``shape``: only its trailing axes and
    ``dtype`` matter here)."""
    row_bytes = _row_bytes(shape, dtype)
    return [Entry(f"{name}{PART_SEPARATOR}{first + j}", name, (count, *shape[1:]), dtype,
                  count * row_bytes) for j, count in enumerate(rows)]


def row_blocks(name: str, shape: Sequence[int], dtype: torch.dtype, limit: int,
               widest: str) -> list[int]:
    """Row counts of the entries (blocks along the first axis) that a tensor ``name`` of
    ``shape`` is stored as, each fitting a shard of ``limit`` bytes with the entry name
    ``widest`` (the longest part name it may get) in the header: ``[rows]`` when all of
    it fits one."""
    _check_dtype(name, dtype)
    shape = list(shape)
    row_bytes = _row_bytes(shape, dtype)
    rows = shape[0] if shape else 0
    if shape and _fits(widest, shape, rows * row_bytes, limit):
        return [rows]
    room = limit - _HEADER_BASE - _entry_header_bytes(widest, shape)
    per_part = room // row_bytes if row_bytes and room > 0 else 0
    if not rows or per_part < 1:
        size = rows * row_bytes if shape else row_bytes
        raise MoEError(
            f"{name} ({tuple(shape)}, {size:,} bytes) cannot be stored within the shard "
            f"size limit of {limit:,} bytes: one row along its first axis takes "
            f"{row_bytes:,} bytes; raise max_shard_bytes"
        )
    return [min(per_part, rows - start) for start in range(0, rows, per_part)]


def split_entries(specs: dict[str, torch.Tensor], limit: int) -> list[Entry]:
    """The entries of ``specs`` (name -> a tensor or meta tensor of the stored shape and
    dtype), in order: a tensor that cannot fit one shard becomes blocks of rows."""
    entries = []
    for name, spec in specs.items():
        _check_dtype(name, spec.dtype)
        shape, size = tuple(spec.shape), nbytes(spec)
        if _fits(name, shape, size, limit):
            entries.append(Entry(name, name, shape, spec.dtype, size))
            continue
        rows = row_blocks(name, shape, spec.dtype, limit,
                          widest=f"{name}{PART_SEPARATOR}{shape[0] if shape else 1}")
        entries += part_entries(name, shape, spec.dtype, rows)
    return entries


def group_entries(entries: Sequence[Entry], limit: int) -> list[list[Entry]]:
    """``entries`` in order, cut into files of at most ``limit`` bytes (header included);
    an entry larger than that on its own takes a file by itself."""
    groups: list[list[Entry]] = [[]]
    size = _HEADER_BASE
    for e in entries:
        cost = _entry_header_bytes(e.name, e.shape) + e.nbytes
        if groups[-1] and size + cost > limit:
            groups.append([])
            size = _HEADER_BASE
        groups[-1].append(e)
        size += cost
    return groups if groups[-1] else []


def plan_shards(specs: dict[str, torch.Tensor], limit: int = DEFAULT_SHARD_BYTES) -> ShardPlan:
    """The files that store ``specs`` (name -> tensor or meta tensor, in order) with no
    file over ``limit`` bytes, header included."""
    return ShardPlan.of(group_entries(split_entries(specs, limit), limit))


# --- hashing -------------------------------------------------------------------------------

# Integrity: sha256 of each tensor's bytes as stored (safetensors: little-endian, C order,
# a tensor in parts: its entries in row order), recorded in moeify.json. sha256: in the
# standard library, collision-resistant (equal digests mean equal tensors, whatever
# changed them), and with the SHA extensions of current x86 and ARM CPUs (which OpenSSL
# uses) over 1.5 GB/s on one core. The writer, `tensor_digest` and `stored_digest` all
# hash the same bytes through `_hasher` and `_digest_text`.
DIGEST_PREFIX = "sha256:"


def _hasher():
    return hashlib.sha256()


def _digest_text(hasher) -> str:
    return DIGEST_PREFIX + hasher.hexdigest()


def _tensor_bytes(tensor: torch.Tensor):
    """A tensor's bytes as a shard stores them (a numpy uint8 view, no copy on the CPU)."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def tensor_digest(tensor: torch.Tensor) -> str:
    """``"sha256:<hex>"`` of a tensor's bytes, as the writer records it."""
    hasher = _hasher()
    hasher.update(_tensor_bytes(tensor))
    return _digest_text(hasher)


def read_header(file: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the first entry's bytes, JSON header) of a shard file."""
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 2 <= size <= _MAX_HEADER:
            raise ValueError(f"header length {size}")
        header = json.loads(handle.read(size))
    return 8 + size, header


def stored_digest(directory: Path, locations: Sequence[tuple[str, str]],
                  headers: dict[str, tuple[int, dict[str, Any]]] | None = None
                  ) -> tuple[str, int]:
    """(digest, bytes read) of a tensor hashed straight from the shard files: the raw
    bytes of its entries ``locations`` (``[(file, entry), ...]``, in row order), 16 MiB
    at a time. ``headers``: parsed headers by file name, filled and reused across calls.
    A file that is missing, damaged or truncated is a `MoEError` naming it."""
    headers = {} if headers is None else headers
    hasher = _hasher()
    total = 0
    for file, entry in locations:
        shard = Path(directory) / file
        try:
            if file not in headers:
                headers[file] = read_header(shard)
            start, header = headers[file]
            begin, end = header[entry]["data_offsets"]
            with open(shard, "rb") as handle:
                handle.seek(start + begin)
                left = end - begin
                while left:
                    block = handle.read(min(left, _READ_BLOCK))
                    if not block:
                        raise ValueError("truncated")
                    hasher.update(block)
                    left -= len(block)
                    total += len(block)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise MoEError(f"shard {shard} is missing, damaged or truncated "
                           f"({type(error).__name__}: {error})") from None
    return _digest_text(hasher), total


# --- writing -------------------------------------------------------------------------------


class _TensorBytes:
    """The bytes of one tensor as its chunks give them, copied into shard files a given
    number at a time (a split tensor's entries take consecutive runs) and hashed as they
    are written."""

    def __init__(self, name: str, chunks: Iterable[torch.Tensor], dtype: torch.dtype,
                 expected: int) -> None:
        self.name, self.dtype, self.expected = name, dtype, expected
        self.chunks = iter(chunks)
        self.pending = None
        self.written = 0
        self.hasher = _hasher()

    def _next(self):
        chunk = next(self.chunks, None)
        if chunk is None:
            return None
        if chunk.dtype != self.dtype:
            raise MoEError(f"{self.name}: got {chunk.dtype}, expected {self.dtype}")
        return _tensor_bytes(chunk)

    def copy(self, handle, count: int) -> None:
        while count:
            if self.pending is None or not len(self.pending):
                self.pending = self._next()
                if self.pending is None:
                    raise MoEError(f"{self.name}: wrote {self.written} bytes, expected "
                                   f"{self.expected}")
            piece = self.pending[:count]
            try:
                handle.write(piece)
            except OSError as error:  # name the shard in the message (`moeify.io.files`)
                error.filename = error.filename or handle.name
                raise
            self.hasher.update(piece)
            self.pending = self.pending[len(piece):]
            self.written += len(piece)
            count -= len(piece)

    def finish(self) -> str:
        """The digest of the bytes written, once every chunk was used exactly."""
        extra = 0 if self.pending is None else len(self.pending)
        while (chunk := self._next()) is not None:
            extra += len(chunk)
        if extra or self.written != self.expected:
            raise MoEError(f"{self.name}: wrote {self.written + extra} bytes, expected "
                           f"{self.expected}")
        return _digest_text(self.hasher)


def write_files(directory: Path, files: Sequence[ShardFile],
                chunks: Callable[[str], Iterable[torch.Tensor]], progress=None
                ) -> dict[str, str]:
    """Write ``files`` into ``directory``, streaming: each header first, then every chunk
    straight to the file, so no shard is ever assembled in memory.

    chunks(tensor): its CPU chunks whose bytes, in order, are those of its entries in
        ``files`` (a repeated chunk writes one expert copy after another without
        materializing them); called once per tensor, when its first entry is written.
    progress: called ``("writing", files done, files)`` after each file.
    Returns tensor -> ``"sha256:<hex>"`` of the bytes written for it here (its digest
    when ``files`` hold all of it), hashed as written: no second pass.
    """
    last = {e.tensor: e.name for file in files for e in file.entries}
    expected: dict[str, int] = {}
    for file in files:
        for e in file.entries:
            expected[e.tensor] = expected.get(e.tensor, 0) + e.nbytes
    streams: dict[str, _TensorBytes] = {}
    digests: dict[str, str] = {}
    for i, file in enumerate(files):
        header = file.header()
        with open(Path(directory) / file.name, "wb") as handle:
            handle.write(len(header).to_bytes(8, "little"))
            handle.write(header)
            for e in file.entries:
                if e.tensor not in streams:
                    streams[e.tensor] = _TensorBytes(e.tensor, chunks(e.tensor), e.dtype,
                                                     expected[e.tensor])
                streams[e.tensor].copy(handle, e.nbytes)
                if last[e.tensor] == e.name:
                    digests[e.tensor] = streams.pop(e.tensor).finish()
        if progress:
            progress("writing", i + 1, len(files))
    return digests


def write_index(directory: Path, plan: ShardPlan) -> dict[str, Any]:
    """Write ``model.safetensors.index.json`` for ``plan``; returns its content."""
    index = plan.index()
    (Path(directory) / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return index


def write_shards(directory: Path, plan: ShardPlan,
                 chunks: Callable[[str], Iterable[torch.Tensor]], progress=None
                 ) -> dict[str, str]:
    """Write every file of ``plan`` and the index (see `write_files`); returns the digest
    of every tensor."""
    digests = write_files(directory, plan.files, chunks, progress)
    write_index(directory, plan)
    return digests


# --- reading -------------------------------------------------------------------------------


def read_json(file: Path, missing: str) -> Any:
    """The JSON content of a checkpoint's description file (the index, ``moeify.json``);
    a file that is absent (``missing``: the message), unreadable or not JSON is one
    `MoEError` naming it."""
    if not file.exists():
        raise MoEError(missing)
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MoEError(f"{file} is not valid JSON ({error}); re-create the checkpoint") from None
    except OSError as error:
        raise MoEError(f"cannot read {file}: {error.strerror or error}") from None


def read_index(path: Path) -> dict[str, Any]:
    """The ``model.safetensors.index.json`` of a directory, checked; problems name the file."""
    file = Path(path) / INDEX_FILE
    index = read_json(file, missing=f"checkpoint {path} has no {INDEX_FILE}")
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise MoEError(f"{file} has no \"weight_map\" object; re-create the checkpoint")
    return index


def _parts(index: dict[str, Any]) -> dict[str, list[tuple[str, int]]]:
    """Tensor -> [(entry, rows), ...] of every tensor stored as row blocks."""
    return {name: [(part, int(rows)) for part, rows in entries]
            for name, entries in index.get("metadata", {}).get("parts", {}).items()}


def stored_entries(index: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """Tensor -> its entries ``[(file, entry), ...]`` in row order: whole tensors first
    (index order), then those stored in parts; a file the index lacks is ``"?"``."""
    weight_map: dict[str, str] = index["weight_map"]
    parts = _parts(index)
    part_names = {part for entries in parts.values() for part, _ in entries}
    tensors = {name: [(file, name)] for name, file in weight_map.items()
               if name not in part_names}
    for name, entries in parts.items():
        tensors[name] = [(weight_map.get(part, "?"), part) for part, _ in entries]
    return tensors


class ShardReader:
    """Name -> tensor access to a sharded directory, aliases (tied weights) resolved.

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
        self.path, self.index = Path(path), index
        self.files = dict(index["weight_map"])
        self.parts = _parts(index)
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

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every stored tensor, shard by shard (each file opened once); a damaged shard
        names its file. A tensor stored in parts is yielded once, reassembled; tied
        aliases are not yielded."""
        from safetensors import safe_open

        part_of = {part: (name, j) for name, entries in self.parts.items()
                   for j, (part, _) in enumerate(entries)}
        pieces: dict[str, dict[int, torch.Tensor]] = {}
        by_file: dict[str, list[str]] = {}
        for name, filename in self.index["weight_map"].items():
            by_file.setdefault(filename, []).append(name)
        for filename, names in by_file.items():
            shard = self.path / filename
            if not shard.exists():
                raise MoEError(f"checkpoint {self.path} is missing its shard {filename}")
            try:
                with safe_open(str(shard), framework="pt") as handle:
                    available = set(handle.keys())
                    missing = [n for n in names if n not in available]
                    if missing:
                        raise MoEError(f"shard {shard} lacks {missing[0]} "
                                       f"(and {len(missing) - 1} more)")
                    for name in names:
                        if name not in part_of:
                            yield name, handle.get_tensor(name)
                            continue
                        whole, j = part_of[name]
                        pieces.setdefault(whole, {})[j] = handle.get_tensor(name)
                        if len(pieces[whole]) == len(self.parts[whole]):
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
            raise MoEError(f"checkpoint {self.path} lacks parts of {name}: its index lists "
                           f"{len(self.parts[name])}, the shards hold {len(pieces[name])}")

    def all(self) -> dict[str, torch.Tensor]:
        """Every tensor, checked (`check`), aliases included."""
        state = {name: self.check(name, tensor) for name, tensor in self.tensors()}
        for alias, canonical in self.aliases.items():
            state[alias] = state[canonical]
        return state
