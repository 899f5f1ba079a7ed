"""Write a converted model, or a dense model and its plan, to a destination in a format.

`write` is the one entry point; the ``moeify convert`` command runs it too:

| format | what is written                                                 | how                    |
| ------ | --------------------------------------------------------------- | ---------------------- |
| torch  | a moeify checkpoint directory (`moeify.io.checkpoint`)          | streamed               |
| hf     | Hugging Face classes, by ``hf_arch``: switch_transformers       | in memory              |
|        | (T5 v1.0, `moeify.hf.switch_transformers`); mixtral, qwen2_moe  | streamed               |
|        | or qwen3_moe (Llama / Mistral / Qwen2 / Qwen3, `decoder_moe`)   |                        |
| onnx   | one ``.onnx`` graph (+ external data) with the capacity fixed   | in memory, then traced |
|        | at the plan's ``seq_len`` (`moeify.onnx.export`)                |                        |

Streamed: the plan is applied with the Switch layers on the meta device and each
layer's tensors are made when the writer reaches them (`moeify.io.streaming`): the dense
model plus one Switch layer in memory. In memory: the whole converted model is built
first. The directory formats (torch, hf) also get the source's tokenizer files
(`moeify.io.tokenizer`); `Written.tokenizer` says which, and none found is reported.

Every decision is taken before any work, from the model's architecture alone (a
skeleton on the meta device is enough): the format's requirements (an ``hf_arch`` that
fits, the HF layout of the plan, a declared ``seq_len`` where the output fixes one),
the memory the conversion needs (`check_memory`, for Python callers and the command
line alike), and the destination, checked once and held until the write ends
(`moeify.io.files.claim_output`: path, inputs it must not overlap, existing output without
``force``, the one-writer lock, free space for `ConversionPlan.nbytes`).

`Writer` splits this in two for a caller that loads the weights after deciding, as the
command line does: ``Writer(skeleton, out, plan=plan, ...)`` decides, ``with writer:``
checks memory and claims the destination, ``writer.write(dense)`` writes.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeify.api import apply, apply_program
from moeify.compiler.plan import ConversionPlan, plan_of
from moeify.compiler.program import Progress
from moeify.compiler.report import ConversionReport
from moeify.errors import MoEError, Param
from moeify.hf.decoder_moe import (
    ARCH,
    FORMAT,
    SWITCH_TRANSFORMERS,
    HFExport,
    default_arch,
    hf_layout,
    misfit,
    no_target,
    save_hf_moe,
)
from moeify.hf.switch_transformers import MODEL_CLASS, save_hf_switch
from moeify.io.checkpoint import save
from moeify.io.files import GiB, claim_output
from moeify.io.shards import DEFAULT_SHARD_BYTES
from moeify.io.sources import Source
from moeify.io.streaming import LayerTensors
from moeify.io.tokenizer import find_tokenizer

FORMATS = ("torch", "hf", "onnx")
# the parameters messages name, spelled for the caller (`moeify.errors`)
SEQ_LEN, DTYPE, OUT = Param("seq_len"), Param("dtype"), Param("out")
INSPECT = Param("moeify.inspect", option="moeify inspect")
PROCESS_OVERHEAD = 1 << 30  # interpreter, torch and transformers themselves


# --- memory --------------------------------------------------------------------------------


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can get (MemAvailable), if known."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def resident_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s tensors already in host memory (none for a meta skeleton)."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return sum(t.nbytes for t in tensors if t.device.type == "cpu")


def memory_need(plan: ConversionPlan, dtype: torch.dtype, *, streamed: bool) -> int:
    """Peak bytes of converting by ``plan`` in ``dtype``: the dense model, plus the largest
    Switch layer (streamed) or the converted model twice (built in memory, then copied
    into HF's layout or traced for ONNX), plus `PROCESS_OVERHEAD`."""
    sizes = plan.nbytes(dtype)
    extra = plan.largest_layer_params() * dtype.itemsize if streamed else 2 * sizes["moe"]
    return sizes["dense"] + extra + PROCESS_OVERHEAD


def check_memory(plan: ConversionPlan, dtype: torch.dtype, *, format: str, streamed: bool,
                 model: str, resident: int = 0) -> None:
    """Refuse a conversion `memory_need` says will not fit, before loading any weight.

    model: how the message names the model (its class).
    resident: bytes of the source already in memory (a loaded model), which the kernel
        no longer counts as available but the conversion has in hand.
    The message names the settings that help, spelled for the caller (`moeify.errors`).
    """
    available = available_memory()
    if available is None:
        return
    need = memory_need(plan, dtype, streamed=streamed)
    available += resident
    if need <= available:
        return
    options = []
    if dtype.itemsize > 2:
        half = (need - PROCESS_OVERHEAD) / 2 / GiB + 1
        options.append(f"{{bfloat16}} (about {half:.1f} GiB)")
    if not streamed:
        options.append("{torch} (streams one layer at a time)")
    options.append("{inspect} to plan without weights")
    raise MoEError(f"converting {{model}} needs about {need / GiB:.1f} GiB of memory ({{dtype}}, "
                   f"{{format}}), but {available / GiB:.1f} GiB are available; try "
                   + ", ".join(options), model=model, dtype=str(dtype).removeprefix("torch."),
                   format=FORMAT.given(format), bfloat16=DTYPE.given("bfloat16"),
                   torch=FORMAT.given("torch"), inspect=INSPECT)


# --- writing -------------------------------------------------------------------------------


def check_format(format: str, hf_arch: str | None, *, seq_len: int | None) -> None:
    """Refuse a ``format`` / ``hf_arch`` / ``seq_len`` combination no writer takes (the
    command line asks before loading anything, `Writer` again with the plan's).

    seq_len: the declared sequence length (``moeify.plan``'s), which format ``onnx``
        needs.
    """
    if format not in FORMATS:
        raise MoEError("{format!r} is not available; use {torch}, hf or onnx",
                       format=FORMAT.given(format), torch=FORMAT.given("torch"))
    if hf_arch is not None and format != "hf":
        raise MoEError("{hf_arch} chooses the class {hf} writes: add {hf}", hf_arch=ARCH,
                       hf=FORMAT.given("hf"))
    if format == "onnx" and seq_len is None:
        raise MoEError("{onnx} fixes the sequence axis and the capacity: pass {seq_len}",
                       onnx=FORMAT.given("onnx"), seq_len=SEQ_LEN)


@dataclass(frozen=True)
class Written:
    """What `write` wrote.

    path: the destination. format: ``torch``, ``hf`` or ``onnx``.
    report: the conversion's `ConversionReport`.
    hf_arch: the HF target (format ``hf``). hf: for mixtral, qwen2_moe, qwen3_moe, the
        `HFExport` (model class, notes on what did not map, bytes).
    tokenizer: the tokenizer files copied in (empty: the source has none; None: the
        format is a single file, format ``onnx``).
    """

    path: Path
    format: str
    report: ConversionReport
    hf_arch: str | None = None
    hf: HFExport | None = None
    tokenizer: tuple[str, ...] | None = None

    def hf_dict(self) -> dict[str, Any] | None:
        """The HF target as a JSON object (format ``hf``; None otherwise)."""
        if self.format != "hf":
            return None
        if self.hf is not None:
            return self.hf.to_dict()
        return {"arch": self.hf_arch, "model_class": MODEL_CLASS}


class Writer:
    """The decisions of one write, taken before any weight is loaded (see the module docs).

    model: the dense source with ``plan``, or a converted model without it; its
        architecture is all that is read here (a skeleton on the meta device will do).
        The weights are written in its dtype.
    plan: the `ConversionPlan` to convert ``model`` by (None: ``model`` is converted).
    format / hf_arch: see the module docs; ``hf_arch`` defaults to the first HF target
        that fits the architecture.
    force: replace an existing ``out``.
    inputs: local paths the caller reads (a source directory), which ``out`` must not
        overlap.
    max_shard_bytes: the largest safetensors shard of format ``torch``.
    """

    def __init__(self, model: nn.Module, out: str | os.PathLike, *,
                 plan: ConversionPlan | None = None, format: str = "torch",
                 hf_arch: str | None = None, force: bool = False,
                 inputs: Iterable[str | os.PathLike] = (),
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.converting = plan is not None
        self.plan = plan if plan is not None else plan_of(model)
        if self.plan is None:
            raise MoEError("the model is not converted: pass the plan to convert it by "
                           "(moeify.plan)")
        self.out, self.format, self.force = Path(out), format, force
        self.max_shard_bytes = max_shard_bytes
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                          torch.float32)
        check_format(format, hf_arch, seq_len=self.plan.seq_len)
        self.hf_arch = self._hf_target(model, hf_arch) if format == "hf" else None
        self.streamed = self.converting and (
            format == "torch" or (format == "hf" and self.hf_arch != SWITCH_TRANSFORMERS))
        self.resident = resident_bytes(model)
        self.model_class = type(model).__name__
        self.claim = claim_output(out, inputs=inputs, force=force, what=OUT,
                                  need=self.plan.nbytes(self.dtype)["moe"])

    def _hf_target(self, model: nn.Module, hf_arch: str | None) -> str:
        """The HF target, refused now when the model or the plan does not fit it."""
        arch = hf_arch or default_arch(model)
        if misfit(arch, model) is not None:  # an unknown arch is refused here too
            raise no_target(model, arch)
        if arch != SWITCH_TRANSFORMERS:
            hf_layout(model, self.plan, arch)
        elif self.plan.seq_len is None:
            raise MoEError("{arch} writes HF's per-sequence expert_capacity: pass {seq_len}",
                           arch=ARCH.given(arch), seq_len=SEQ_LEN)
        return arch

    def __enter__(self) -> Writer:
        if self.converting:
            check_memory(self.plan, self.dtype, format=self.format, streamed=self.streamed,
                         model=self.model_class, resident=self.resident)
        self.claim.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.claim.__exit__(*exc)

    def write(self, model: nn.Module, *, source: Source | None = None,
              progress: Progress | None = None, tokenizer: Any = None) -> Written:
        """Convert ``model`` (in place) by the plan, if there is one, and write it.

        model: the model the `Writer` was made for, with its weights.
        source: where the model came from, recorded by format ``torch`` (default: what
            its transformers config says).
        progress: called with (stage, done, total) while applying and writing.
        tokenizer: where the tokenizer files come from (a directory, a moeify checkpoint,
            a cached hub id; `moeify.io.tokenizer.find_tokenizer`); default: ``source``.
        """
        if not self.claim.lock.held:
            raise RuntimeError("Writer.write runs inside `with writer:` (the destination "
                               "is claimed there)")
        program = None
        if not self.converting:
            report = ConversionReport.from_plan(self.plan)
        elif self.streamed:  # Switch layers on the meta device, made one at a time
            program = apply_program(model, self.plan, lazy=True, progress=progress)
            report = ConversionReport.from_plan(program.plan)
        else:
            report = apply(model, self.plan, progress=progress).report
        hf = None
        found = None  # a single .onnx file has no directory to carry a tokenizer
        if self.format != "onnx":
            found = find_tokenizer(tokenizer if tokenizer is not None else source)
        copied = None if self.format == "onnx" else (() if found is None else found.names)
        if self.format == "torch":
            fetch = None if program is None else LayerTensors(model, program).fetch
            save(model, self.out, source=source, force=self.force, fetch=fetch,
                 max_shard_bytes=self.max_shard_bytes, progress=progress, tokenizer=found)
        elif self.format == "onnx":
            from moeify.onnx.export import export_onnx  # onnx: imported when used

            export_onnx(model, self.out, seq_len=self.plan.seq_len, force=self.force)
        elif self.hf_arch == SWITCH_TRANSFORMERS:
            save_hf_switch(model, self.out, force=self.force, tokenizer=found)
        else:
            hf = save_hf_moe(model, self.out, arch=self.hf_arch, force=self.force,
                             program=program, progress=progress, tokenizer=found)
        return Written(self.out, self.format, report, self.hf_arch, hf, copied)


def write(model: nn.Module, out: str | os.PathLike, *, plan: ConversionPlan | None = None,
          format: str = "torch", hf_arch: str | None = None, force: bool = False,
          source: Source | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
          progress: Progress | None = None, tokenizer: Any = None) -> Written:
    """Write ``model`` to ``out`` in ``format``: converted by ``plan`` (in place) when one
    is given, else as it is (it must be converted already).

    Checks the format's requirements, the memory and the destination before any work
    (see the module docs); the output appears complete or not at all. Arguments as
    `Writer` and `Writer.write`; ``moeify.write(dense, "out", plan=moeify.plan(dense,
    config))`` streams a moeify checkpoint with one Switch layer in memory at a time.
    Returns what was written (`Written`: the conversion report, the HF target).
    """
    with Writer(model, out, plan=plan, format=format, hf_arch=hf_arch, force=force,
                max_shard_bytes=max_shard_bytes) as writer:
        return writer.write(model, source=source, progress=progress, tokenizer=tokenizer)
