"""moeify checkpoints: sharded safetensors + ``moeify.json``, written atomically.

Layout of a checkpoint directory::

    moeify.json                     format version, the whole `ConversionPlan` (config,
                                    declared seq_len, sites, sharding), source
                                    (architecture), tied-weight aliases, dtypes
    model.safetensors.index.json    {"metadata": {"total_size": ...}, "weight_map": {...}}
                                    (+ "parts" in the metadata for a tensor larger than
                                    a shard, stored as row blocks NAME::part0, ...)
    model-00001-of-0000N.safetensors

The shard files and the index are `moeify.io.shards`' format (planned, streamed and
hashed there, one shard at a time: no shard is assembled in memory). The directory is
assembled under a temporary name beside the target and renamed into place: an
interrupted write leaves no partial output, and the previous output stays intact until
the rename (`moeify.io.files`: the destination is locked for the whole write, free space is
checked first, and temporaries of killed writers are removed by the next write).

Loading applies the stored plan to the source architecture built on the meta device,
then assigns the tensors: it never traces the model, so a later change to FFN discovery
cannot change what an existing checkpoint loads as. Every tensor's sha256 digest is
recorded in ``moeify.json`` and checked on load. A checkpoint of an earlier format (one
without a stored plan or without digests) is refused: convert the source again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeify import __version__
from moeify.compiler.pipeline import apply_program
from moeify.compiler.plan import ConversionPlan, plan_of
from moeify.config import MoEConfig
from moeify.errors import MoEError
from moeify.io.files import atomic_directory
from moeify.io.tokenizer import Tokenizer
from moeify.io.shards import (
    DEFAULT_SHARD_BYTES,
    DIGEST_PREFIX,
    INDEX_FILE,
    ShardReader,
    nbytes,
    plan_shards,
    read_index,
    read_json,
    write_shards,
)
from moeify.io.sources import CHECKPOINT_FILE, Source, _from_factory, build_hf
from moeify.switch import switch_layers

FORMAT_VERSION = 2


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


def checkpoint_meta(plan: ConversionPlan, source: Source | None, aliases: dict[str, str],
                    specs: dict[str, torch.Tensor], digests: dict[str, str]) -> dict[str, Any]:
    """``moeify.json``. ``digests``: tensor name -> ``"sha256:<hex>"`` of its bytes in the
    shards, for every stored tensor (tied aliases are not stored); ``source``: see
    `Source` (its ``weights`` fingerprint tells whether a source found later is the one
    that was converted)."""
    return {
        "format": "moeify",
        "format_version": FORMAT_VERSION,
        "moeify_version": __version__,
        "plan": plan.to_dict(),
        "source": None if source is None else source.to_dict(),
        "aliases": aliases,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in specs.values()}),
        "digests": dict(digests),
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
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Write a converted model as a moeify checkpoint directory (see the module docs).

    ``fetch(name)``: the chunks of a parameter still on the meta device (the streaming
    converter's Switch layers, `moeify.io.streaming`). ``tokenizer``: the source's
    tokenizer files, copied in beside the weights (`moeify.io.tokenizer`).
    """
    plan = plan_of(model)
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

    need = sum(nbytes(t) for t in specs.values())
    with atomic_directory(path, force=force, need=need) as tmp:
        digests = write_shards(tmp, plan_shards(specs, max_shard_bytes), tensors_of, progress)
        meta = checkpoint_meta(plan, source, aliases, specs, digests)
        (tmp / CHECKPOINT_FILE).write_text(json.dumps(meta, indent=1))
        if tokenizer is not None:
            tokenizer.copy_to(tmp)
    return Path(path)


# --- reading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointMeta:
    """A checkpoint's ``moeify.json``, checked.

    plan: the stored conversion plan (what loading applies, without tracing).
    digests: tensor name -> ``"sha256:<hex>"`` of its bytes in the shards, for every
        stored tensor.
    """

    path: Path
    plan: ConversionPlan
    source: Source | None
    aliases: dict[str, str]
    digests: dict[str, str]

    @property
    def file(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def config(self) -> MoEConfig:
        return self.plan.config

    @property
    def seq_len(self) -> int | None:
        return self.plan.seq_len


def _refuse_earlier_format(file: Path, what: str) -> MoEError:
    """The one error for a checkpoint written by an earlier moeify, whose format this one
    no longer reads."""
    return MoEError(f"{file} was written by an earlier moeify ({what}); this moeify reads "
                    f"only checkpoints of format {FORMAT_VERSION} with tensor digests: convert "
                    "the source again")


def read_meta(path: str | os.PathLike) -> CheckpointMeta:
    """Read and check a checkpoint's ``moeify.json``; every problem is one `MoEError`
    line that names the file."""
    path = Path(path)
    file = path / CHECKPOINT_FILE
    meta = read_json(file, missing=f"{path} is not a moeify checkpoint (no {CHECKPOINT_FILE})")
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
        raise MoEError(f"{file} is format {version}; this moeify reads format "
                       f"{FORMAT_VERSION}: upgrade moeify")
    if version < FORMAT_VERSION:
        raise _refuse_earlier_format(file, f"format {version}, without a stored conversion "
                                           "plan")
    if "digests" not in meta:
        raise _refuse_earlier_format(file, "no tensor digests recorded")
    try:
        source = Source.from_dict(meta["source"]) if meta.get("source") else None
        plan = ConversionPlan.from_dict(meta["plan"])
        aliases = dict(meta.get("aliases", {}))
        digests = meta["digests"]
        if not (isinstance(digests, dict) and all(
                isinstance(v, str) and v.startswith(DIGEST_PREFIX) for v in digests.values())):
            raise MoEError(f"\"digests\" must map tensor names to \"{DIGEST_PREFIX}<hex>\"")
    except KeyError as error:
        raise MoEError(f"{file} lacks {error} (format {version}); re-create the "
                       "checkpoint") from None
    except (MoEError, TypeError, ValueError, AttributeError) as error:
        raise MoEError(f"{file}: {error}") from None
    return CheckpointMeta(path, plan, source, aliases, dict(digests))


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


def load_skeleton(
    path: str | os.PathLike, *, model: nn.Module | None = None, check_digests: bool = True,
) -> tuple[nn.Module, ShardReader]:
    """The converted architecture of a checkpoint with parameters on the meta device.

    Returns the model (buffers real, parameters meta: no weight memory) and a
    `moeify.io.shards.ShardReader` that reads any parameter from the shards on demand.
    `load` assigns them all; `moeify.export_onnx` streams them into an ONNX file one at a time. Every
    whole tensor read is checked against its recorded digest (``check_digests``) and
    every parameter (and Switch layer buffer: a selection bias) for NaN / inf: either
    problem is a `MoEError` naming the tensor.
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
    apply_program(model, meta.plan)
    install_save_pretrained(model)
    # parameters, and the Switch layers' buffers (bias balancing's selection bias)
    finite = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    finite |= {f"{path}.{name}" for path, layer in switch_layers(model)
               for name, _ in layer.named_buffers()}
    return model.eval(), ShardReader(path, index, meta.aliases,
                                     digests=meta.digests if check_digests else None,
                                     finite=finite)


def load(path: str | os.PathLike, *, model: nn.Module | None = None,
         check_digests: bool = True) -> nn.Module:
    """Rebuild a converted model from a moeify checkpoint and load its weights.

    The architecture comes from the checkpoint's source (a transformers class and config,
    or a ``package.module:function`` factory called again; or ``model``, a dense model of
    that architecture), built with its parameters on the meta device; the stored plan is
    applied to it (no tracing), then every parameter is assigned straight from the
    shards, so peak memory stays near one copy of the checkpoint.

    check_digests: compare every tensor with the sha256 digest recorded when it was
        written; a tensor that differs is a `MoEError` naming it and its shard. A
        parameter holding NaN or inf is refused either way.
    """
    model, weights = load_skeleton(path, model=model, check_digests=check_digests)
    try:
        model.load_state_dict(weights.all(), strict=True, assign=True)
    except RuntimeError as error:
        raise MoEError(f"checkpoint {path} does not match its architecture: {error}") from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


# --- save_pretrained on converted transformers models -----------------------------------
#
# ``save_pretrained`` on a converted transformers model writes a moeify checkpoint.
#
# A converted model keeps its transformers class (`moeify.apply`), so its inherited
# ``save_pretrained`` would write a ``config.json`` and weights that the dense class loads
# with ``from_pretrained``: silently, with freshly initialized FFNs in place of the Switch
# layers (transformers only logs the missing and unexpected keys). `moeify.apply` therefore
# gives every converted transformers model a ``save_pretrained`` of its own (an instance
# attribute; the class is untouched), which writes the moeify checkpoint into the
# directory instead: ``moeify.load(directory)`` reads it back exactly, and
# ``AutoModel*.from_pretrained`` refuses it (there is no ``config.json``). The dense class's
# own ``from_pretrained`` falls back to its default config: it fails on any shape that
# differs, and otherwise reports the Switch layers' keys as unexpected and the FFNs' as
# missing (transformers' load report). ``Trainer`` checkpoints go
# through the same method, and its resume and best-model reloading read the shards through
# the standard ``model.safetensors.index.json``.

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
