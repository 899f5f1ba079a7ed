"""The ``moeify`` command line: thin commands that translate options into API calls.

Heavy imports (torch, transformers) happen inside commands so ``moeify --help`` is
instant. Library errors (`moeify.MoEError`, ``ValueError`` from a config) are printed
as one line with exit code 1; set ``MOEIFY_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="moeify",
    help="Turn a dense Transformer into a Switch Transformer (Mixture-of-Experts).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """moeify: sparse upcycling of dense Transformers into Switch Transformers."""


@app.command()
def version() -> None:
    """Print the versions of moeify and of the libraries it runs on."""
    import torch
    import transformers

    import moeify

    typer.echo(f"moeify {moeify.__version__} (torch {torch.__version__}, "
               f"transformers {transformers.__version__})")


# --- shared options ------------------------------------------------------------------------

Experts = Annotated[int, typer.Option("--experts", "-e", help="Experts per Switch layer (>= 2).")]
Capacity = Annotated[float, typer.Option(
    "--capacity", help="Training capacity factor: slots per expert as a multiple of T/E.")]
EvalCapacity = Annotated[float, typer.Option("--eval-capacity", help="Evaluation capacity factor.")]
TopK = Annotated[int, typer.Option("--top-k", help="1 (Switch) or 2 (GShard random routing).")]
Every = Annotated[int, typer.Option(
    "--every", help="Convert every N-th FFN of each stack (2: odd indices 1, 3, 5, ...).")]
Layers = Annotated[Optional[str], typer.Option(
    "--layers", help="Explicit FFN indices to convert, e.g. 1,3,5 (overrides --every).")]
InitMode = Annotated[str, typer.Option("--init", help="Expert init: copy, partition or random.")]
Noise = Annotated[float, typer.Option("--noise", help="Relative noise added to copied experts.")]
GateKind = Annotated[str, typer.Option("--gate", help="softmax (Switch) or normalized.")]
Jitter = Annotated[float, typer.Option("--jitter", help="Router input jitter eps (training).")]
AuxCoef = Annotated[float, typer.Option("--aux-loss-coef", help="Load-balancing loss weight.")]
ZCoef = Annotated[float, typer.Option("--z-loss-coef", help="Router z-loss weight.")]
ExpertDropout = Annotated[Optional[float], typer.Option(
    "--expert-dropout", help="Dropout inside the experts; default: the dropout inside the "
    "source FFN (0 if none); the paper uses 0.4 for fine-tuning.")]
MinCapacity = Annotated[int, typer.Option("--min-capacity", help="Floor on expert capacity.")]
SeqLen = Annotated[Optional[int], typer.Option(
    "--seq-len", help="Declared sequence length that fixes each layer's capacity.")]
Dtype = Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")]
Seed = Annotated[int, typer.Option("--seed", help="Seeds every random initialization.")]
RandomInit = Annotated[bool, typer.Option(
    "--random-init", help="Build the architecture (preset or config.json) with fresh weights.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout.")]

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _moe_config(experts, capacity, eval_capacity, top_k, every, layers, init, noise, gate,
                jitter, aux_loss_coef, z_loss_coef, expert_dropout, min_capacity, seed):
    from moeify.config import MoEConfig

    if top_k > experts:
        raise ValueError(f"--top-k {top_k} exceeds --experts {experts}")
    parsed = None
    if layers:
        try:
            parsed = tuple(int(v) for v in layers.split(","))
        except ValueError:
            raise ValueError(f"--layers {layers!r} must be comma-separated integers, e.g. 1,3,5")
    return MoEConfig(
        num_experts=experts, capacity_factor=capacity, eval_capacity_factor=eval_capacity,
        top_k=top_k, every=every, layers=parsed, init=init, noise=noise, gate=gate,
        jitter_eps=jitter, aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef,
        expert_dropout=expert_dropout, min_capacity=min_capacity, seed=seed,
    )


def _dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not one of {', '.join(sorted(set(DTYPES)))}")
    return getattr(torch, DTYPES[name])


def _console(json_out: bool):
    from rich.console import Console

    return Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def _print_report(report, console, *, title: str) -> None:
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for column in ("", "FFN site", "#", "shape", "capacity", "dropout", "found by"):
        table.add_column(column, overflow="fold")
    for site in report.sites:
        capacity = "" if site.capacity_train is None else f"{site.capacity_train}/{site.capacity_eval}"
        dropout = "" if site.expert_dropout is None else f"{site.expert_dropout:g}"
        table.add_row("*" if site.selected else "", site.path, str(site.index), site.ffn,
                      capacity, dropout, site.found_by.split(" of ")[0])
    table.caption = ("* converted; capacity = slots per expert and sequence, train/eval; "
                     "dropout = inside the experts")
    console.print(table)
    import re

    groups: dict[str, list] = {}
    for r in report.rejected:  # one line per kind of rejection; --json lists each
        groups.setdefault(re.sub(r"\d+", "*", r.reason), []).append(r)
    for same in groups.values():
        r = same[0]
        more = f" (and {len(same) - 1} more like it)" if len(same) > 1 else ""
        console.print(f"rejected {r.where}: {r.reason}{more}", markup=False)
    console.print(
        f"{len(report.converted)} of {len(report.sites)} FFN sites -> {report.config.num_experts} "
        f"experts; parameters {report.params_dense:,} -> {report.params_moe:,} "
        f"({report.active_params_per_token:,} active per token)"
    )


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="HF directory, hub id, preset id or module:factory.")],
    experts: Experts = 8, capacity: Capacity = 1.25, eval_capacity: EvalCapacity = 2.0,
    top_k: TopK = 1, every: Every = 2, layers: Layers = None, init: InitMode = "copy",
    noise: Noise = 0.0, gate: GateKind = "softmax", jitter: Jitter = 0.01,
    aux_loss_coef: AuxCoef = 0.01, z_loss_coef: ZCoef = 0.001,
    expert_dropout: ExpertDropout = None, min_capacity: MinCapacity = 4, seq_len: SeqLen = None,
    dtype: Dtype = "float32", seed: Seed = 0, json_out: JsonOut = False,
) -> None:
    """Plan a conversion on the meta device (no weights allocated) and report it."""
    import json

    import moeify
    from moeify.sources import load_source

    config = _moe_config(experts, capacity, eval_capacity, top_k, every, layers, init, noise,
                         gate, jitter, aux_loss_coef, z_loss_coef, expert_dropout,
                         min_capacity, seed)
    dense, source = load_source(model, random_init=True if _is_preset(model) else False,
                                dtype=_dtype(dtype), device="meta")
    report = moeify.inspect(dense, config, seq_len=seq_len)
    data = {**report.to_dict(), "source": source.ref,
            "bytes": _bytes(report, _dtype(dtype)),
            "bytes_per_dtype": {name: _bytes(report, _dtype(name))
                                for name in ("float32", "bfloat16")}}
    if json_out:
        typer.echo(json.dumps(data))
        return
    console = _console(json_out)
    _print_report(report, console, title=f"moeify inspect {model}")
    for name, sizes in data["bytes_per_dtype"].items():
        console.print(f"weights in {name}: {sizes['dense']:,} bytes dense -> "
                      f"{sizes['moe']:,} bytes MoE")


def _is_preset(ref: str) -> bool:
    from pathlib import Path

    from moeify.sources import PRESETS

    return ref in PRESETS and not Path(ref).exists()


def _bytes(report, dtype) -> dict[str, int]:
    import torch

    size = torch.empty((), dtype=dtype).element_size()
    return {"dense": report.params_dense * size, "moe": report.params_moe * size}


@app.command()
def convert(
    model: Annotated[str, typer.Argument(help="HF directory, hub id, preset id or module:factory.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output checkpoint directory.")],
    experts: Experts = 8, capacity: Capacity = 1.25, eval_capacity: EvalCapacity = 2.0,
    top_k: TopK = 1, every: Every = 2, layers: Layers = None, init: InitMode = "copy",
    noise: Noise = 0.0, gate: GateKind = "softmax", jitter: Jitter = 0.01,
    aux_loss_coef: AuxCoef = 0.01, z_loss_coef: ZCoef = 0.001,
    expert_dropout: ExpertDropout = None, min_capacity: MinCapacity = 4, seq_len: SeqLen = None,
    dtype: Dtype = "float32", seed: Seed = 0, random_init: RandomInit = False,
    format: Annotated[str, typer.Option(
        "--format", help="torch (moeify checkpoint), hf (SwitchTransformers, T5 v1.0) or "
        "onnx (--out is the .onnx file).")] = "torch",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    json_out: JsonOut = False,
) -> None:
    """Convert MODEL into a Switch Transformer and write a moeify checkpoint to --out."""
    import json
    from pathlib import Path

    import torch

    import moeify
    from moeify.errors import MoEError
    from moeify.sources import load_source

    if format not in ("torch", "hf", "onnx"):
        raise MoEError(f"--format {format!r} is not available; use --format torch, hf or onnx")
    if format == "hf" and seq_len is None:
        raise MoEError("--format hf writes HF's per-sequence expert_capacity: pass --seq-len")
    if format == "onnx" and seq_len is None:
        raise MoEError("--format onnx fixes the sequence axis and the capacity: pass --seq-len")
    config = _moe_config(experts, capacity, eval_capacity, top_k, every, layers, init, noise,
                         gate, jitter, aux_loss_coef, z_loss_coef, expert_dropout,
                         min_capacity, seed)
    if Path(out).exists() and not force:
        raise MoEError(f"{out} already exists: choose another --out or pass --force")
    console = _console(json_out)
    with console.status(f"planning {model}"):
        _check_memory(model, config, format=format, dtype=dtype, random_init=random_init,
                      seq_len=seq_len)
    torch.manual_seed(seed)
    with console.status(f"loading {model}"):
        dense, source = load_source(model, random_init=random_init, dtype=_dtype(dtype))
    progress = _progress(console)
    with progress:
        if format == "hf":
            from moeify.hf_switch import save_hf_switch

            report = moeify.convert(dense, config, seq_len=seq_len,
                                    progress=progress.callback).report
            save_hf_switch(dense, out, force=force)
        elif format == "onnx":  # --out is the .onnx file
            report = moeify.convert(dense, config, seq_len=seq_len,
                                    progress=progress.callback).report
            moeify.export_onnx(dense, out, seq_len=seq_len, force=force)
        else:  # streamed: one Switch layer in memory at a time
            from moeify.stream import convert_to_checkpoint

            report = convert_to_checkpoint(dense, config, out, seq_len=seq_len, source=source,
                                           force=force, progress=progress.callback)
    data = {**report.to_dict(), "source": source.ref, "out": str(out), "format": format}
    if json_out:
        typer.echo(json.dumps(data))
        return
    _print_report(report, console, title=f"moeify convert {model}")
    console.print(f"wrote {out}")


@app.command()
def verify(
    path: Annotated[str, typer.Argument(help="A moeify checkpoint directory.")],
    json_out: JsonOut = False,
) -> None:
    """Run the verification checks that apply to a checkpoint; exit 1 if any fails."""
    import json

    from rich.table import Table

    from moeify.verify import checks_to_dict, verify as run_checks

    console = _console(json_out)
    with console.status(f"verifying {path}"):
        checks = run_checks(path)
    failed = [c for c in checks if c.failed]
    if json_out:
        typer.echo(json.dumps({"path": path, "passed": not failed,
                               "checks": checks_to_dict(checks)}))
    else:
        table = Table(title=f"moeify verify {path}")
        for column in ("check", "result", "detail"):
            table.add_column(column)
        for c in checks:
            style = {"pass": "green", "fail": "red", "skip": "yellow"}[c.status]
            table.add_row(c.name, f"[{style}]{c.status}[/{style}]", c.detail)
        console.print(table)
    if failed:
        raise typer.Exit(1)


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="A moeify checkpoint, or any MODEL source (dense).")],
    onnx_path: Annotated[str, typer.Option("--onnx", help="Output .onnx file.")],
    seq_len: Annotated[int, typer.Option("--seq-len", help="The static sequence length.")],
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="Static batch size (default: dynamic batch axis).")] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (>= 18).")] = 18,
    shard_experts: Annotated[Optional[int], typer.Option(
        "--shard-experts", help="Annotate expert weights as split over N devices.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    json_out: JsonOut = False,
) -> None:
    """Export a converted model to ONNX with fixed capacity tensors (ONNX Runtime ready)."""
    import json
    from pathlib import Path

    import moeify
    from moeify.sources import CHECKPOINT_FILE, load_source

    console = _console(json_out)
    with console.status(f"loading {model}"):
        if (Path(model) / CHECKPOINT_FILE).exists():
            loaded = model  # exported from the shards, one weight in memory at a time
        else:
            loaded, _ = load_source(model)
            console.print(f"{model} is not converted: exporting the dense model")
    with console.status(f"exporting {onnx_path}"):
        metadata = moeify.export_onnx(loaded, onnx_path, seq_len=seq_len, batch_size=batch_size,
                                      opset=opset, force=force, shard_experts=shard_experts)
    if json_out:
        typer.echo(json.dumps({"onnx": onnx_path, "metadata": metadata}))
    else:
        console.print(f"wrote {onnx_path}: " + ", ".join(f"{k}={v}" for k, v in metadata.items()))


@app.command()
def distill(
    path: Annotated[str, typer.Argument(help="A moeify checkpoint (the Switch teacher).")],
    out: Annotated[str, typer.Option("--out", help="Output directory for the dense student.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    json_out: JsonOut = False,
) -> None:
    """Write the dense student of a converted checkpoint as a transformers model.

    Each Switch layer's experts are averaged into one FFN; every other weight is copied.
    """
    import json
    from pathlib import Path

    import moeify
    from moeify.checkpoint import atomic_directory
    from moeify.errors import MoEError

    if Path(out).exists() and not force:
        raise MoEError(f"{out} already exists: choose another --out or pass --force")
    console = _console(json_out)
    with console.status(f"loading {path}"):
        teacher = moeify.load(path)
    if not hasattr(teacher, "save_pretrained"):
        raise MoEError(f"{path} was converted from a factory model: use moeify.distill(model, "
                       "dense=...) in Python and save the student yourself")
    with console.status("building the dense student"):
        student = moeify.distill(teacher)
    with atomic_directory(out, force=force) as tmp:
        student.save_pretrained(tmp)
    params = sum(p.numel() for p in student.parameters())
    teacher_params = sum(p.numel() for p in teacher.parameters())
    data = {"out": out, "student_parameters": params, "teacher_parameters": teacher_params,
            "rule": "mean"}
    if json_out:
        typer.echo(json.dumps(data))
    else:
        console.print(f"wrote {out}: dense student with {params:,} parameters (teacher "
                      f"{teacher_params:,}); each Switch layer's experts averaged into one FFN")


PROCESS_OVERHEAD = 1 << 30  # interpreter, torch and transformers themselves


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


def _check_memory(model, config, *, format, dtype, random_init, seq_len) -> None:
    """Refuse a conversion predicted not to fit, before loading anything."""
    import moeify
    from moeify.errors import MoEError
    from moeify.report import expert_params
    from moeify.sources import load_source

    available = available_memory()
    if available is None:
        return
    torch_dtype = _dtype(dtype)
    skeleton, _ = load_source(model, random_init=random_init or _is_preset(model),
                              dtype=torch_dtype, device="meta")
    report = moeify.inspect(skeleton, config, seq_len=seq_len)
    size = torch_dtype.itemsize
    dense = report.params_dense * size
    if format == "hf":  # built in memory, then copied into HF's per-expert layout
        need = dense + 2 * report.params_moe * size
    else:  # streamed: the dense model plus the largest Switch layer
        largest = max((s.moe_params for s in report.sites if s.selected), default=0)
        need = dense + largest * size
    need += PROCESS_OVERHEAD
    if need > available:
        gib = 2**30
        options = []
        if size > 2:
            options.append(f"--dtype bfloat16 (about {(need - PROCESS_OVERHEAD) / 2 / gib + 1:.1f} GiB)")
        if format == "hf":
            options.append("--format torch (streams one layer at a time)")
        options.append("moeify inspect to plan without weights")
        raise MoEError(
            f"converting {model} needs about {need / gib:.1f} GiB of memory ({dtype}, "
            f"--format {format}), but {available / gib:.1f} GiB are available; try "
            + ", ".join(options)
        )


class _progress:
    """Rich progress bars on stderr driven by the library's (stage, done, total) callback."""

    def __init__(self, console) -> None:
        from rich.progress import Progress

        self.progress = Progress(console=console, transient=True)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def callback(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)


def main() -> None:
    """Console entry point: run the app, turning library errors into one-line messages."""
    try:
        app()
    except Exception as error:  # noqa: BLE001 - the boundary where errors become messages
        from moeify.errors import MoEError

        if os.environ.get("MOEIFY_DEBUG") or not isinstance(error, (MoEError, ValueError)):
            raise
        typer.echo(f"error: {error}", err=True)
        sys.exit(1)
