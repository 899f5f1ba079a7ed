"""The ``moeify`` command line: thin commands that translate options into API calls.

Heavy imports (torch, transformers) happen inside commands so ``moeify --help`` is
instant. Library errors (`moeify.MoEError`, worded with the options' names) are printed
as one line with exit code 1; set ``MOEIFY_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from inspect import Parameter, signature
from typing import Annotated, Any, Callable, Optional, get_type_hints

import typer

from moeify.config import MoEConfig  # torch-free: --help stays instant

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


# --- options generated from MoEConfig ------------------------------------------------------


def config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command`` one option per `MoEConfig` field in place of its ``config`` parameter.

    Each field's metadata names its option and help (see `moeify.config`); its default is
    the field's. The command is called with ``config=MoEConfig(...)`` built from them; a
    value the config refuses is a `ConfigError`, which `main` prints with the option's
    name (``--experts 0 must be an integer >= 2``).
    """
    own = signature(command, eval_str=True)
    names = {f.name for f in dataclasses.fields(MoEConfig)}
    clash = names & (set(own.parameters) - {"config", "explicit"})
    assert "config" in own.parameters and not clash, f"{command.__name__}: {sorted(clash)}"
    hints = get_type_hints(MoEConfig)
    params: list[Parameter] = []
    for param in own.parameters.values():
        if param.name == "config":
            params.extend(_config_option(f, hints[f.name]) for f in dataclasses.fields(MoEConfig))
        elif param.name != "explicit":  # keyword-only: Typer passes keywords, and options
            params.append(param.replace(kind=Parameter.KEYWORD_ONLY))  # may then follow freely
    # Typer hands the command's context to a parameter annotated typer.Context: it says
    # which options the user gave
    params.append(Parameter(_CONTEXT, Parameter.KEYWORD_ONLY, annotation=typer.Context))

    @functools.wraps(command)
    def run(**options: Any) -> Any:
        values = {name: options.pop(name) for name in names}
        context = options.pop(_CONTEXT, None)
        config = MoEConfig(**values)  # a ConfigError names the option (`main`)
        if "explicit" in own.parameters:  # the fields given on the command line
            options["explicit"] = _explicit_fields(context, names)
        return command(config=config, **options)

    run.__signature__ = own.replace(parameters=params)  # read by Typer (inspect.signature)
    run.__annotations__ = {p.name: p.annotation for p in params}  # and by get_type_hints
    return run


_CONTEXT = "_moeify_context"
_GIVEN = ("COMMANDLINE", "ENVIRONMENT", "PROMPT")  # ParameterSource names: not defaults


def _explicit_fields(context: Any, names: set[str]) -> frozenset[str]:
    """The config fields whose option the user gave (command line or environment), as
    opposed to left at the default: what a target such as ``--hf-arch mixtral`` may fill
    in itself and must otherwise refuse."""
    if context is None:
        return frozenset()
    sources = {n: context.get_parameter_source(n) for n in names}
    return frozenset(n for n, source in sources.items()
                     if source is not None and source.name in _GIVEN)


def _config_option(field: dataclasses.Field, hint: Any) -> Parameter:
    """The parameter declaring ``field``'s option, with the field's default."""
    parser, metavar = _PARSERS.get(hint, (None, None))
    option = typer.Option(*field.metadata["cli"], help=field.metadata["help"], parser=parser,
                          metavar=metavar)
    annotation = Optional[str] if parser else hint  # a parser takes the option's text
    return Parameter(field.name, Parameter.KEYWORD_ONLY, default=field.default,
                     annotation=Annotated[annotation, option])


def _parse_indices(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:  # BadParameter, not ValueError: Typer would prefix "Value error, "
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of integers, "
                                 "e.g. 1,3,5") from None


# Field types Typer does not parse itself: type -> (parser of the option's text, metavar).
# int, float, str, their Optional forms and the enums (choices) it handles.
def _parse_switch(text: str) -> bool:
    values = {"on": True, "off": False, "true": True, "false": False}
    if text.lower() not in values:
        raise typer.BadParameter(f"{text!r} is not on or off")
    return values[text.lower()]


_PARSERS: dict[Any, tuple[Callable[[str], Any], str]] = {
    tuple[int, ...] | None: (_parse_indices, "<i,j,...>"),
    bool | None: (_parse_switch, "<on|off>"),
}


# --- other shared options: each declared once, used by every command that takes it --------

Model = Annotated[str, typer.Argument(help="HF directory, hub id, preset id or module:factory.")]
Out = Annotated[str, typer.Option(
    "--out", "-o", help="The output: a directory (the .onnx file with --format onnx).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
SeqLen = Annotated[Optional[int], typer.Option(
    "--seq-len", help="Declared sequence length that fixes each layer's capacity (and an "
    "ONNX graph's sequence axis).")]
Dtype = Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")]
RandomInit = Annotated[bool, typer.Option(
    "--random-init", help="Build the architecture (preset or config.json) with fresh weights.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout.")]
OnnxFile = Annotated[Optional[str], typer.Option(
    "--onnx", help="An .onnx graph: the one export writes; for verify, one exported from "
    "the checkpoint to compare with the PyTorch model (default: the .onnx files in DIR and "
    "DIR.onnx beside it).")]

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not one of {', '.join(sorted(set(DTYPES)))}")
    return getattr(torch, DTYPES[name])


def _console():
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
    console.print(f"experts: {report.experts_init}", markup=False)
    console.print(f"router: {report.router_text}", markup=False)


@app.command()
@config_options
def inspect(
    model: Model, config: MoEConfig, seq_len: SeqLen = None, dtype: Dtype = "float32",
    json_out: JsonOut = False,
) -> None:
    """Plan a conversion on the meta device (no weights allocated) and report it."""
    import json

    import moeify
    from moeify.io.sources import load_source

    dense, source = load_source(model, random_init=True if _is_preset(model) else False,
                                dtype=_dtype(dtype), device="meta")
    report = moeify.inspect(dense, config, seq_len=seq_len)
    data = {**report.to_dict(), "source": source.ref,
            "bytes": report.nbytes(_dtype(dtype)),
            "bytes_per_dtype": {name: report.nbytes(_dtype(name))
                                for name in ("float32", "bfloat16")}}
    if json_out:
        typer.echo(json.dumps(data))
        return
    console = _console()
    _print_report(report, console, title=f"moeify inspect {model}")
    for name, sizes in data["bytes_per_dtype"].items():
        console.print(f"weights in {name}: {sizes['dense']:,} bytes dense -> "
                      f"{sizes['moe']:,} bytes MoE")


def _is_preset(ref: str) -> bool:
    from pathlib import Path

    from moeify.io.sources import PRESETS

    return ref in PRESETS and not Path(ref).exists()


@app.command()
@config_options
def convert(
    model: Model, out: Out, config: MoEConfig, seq_len: SeqLen = None,
    dtype: Dtype = "float32", random_init: RandomInit = False,
    format: Annotated[str, typer.Option(
        "--format", help="torch (moeify checkpoint), hf (Hugging Face's MoE classes, see "
        "--hf-arch) or onnx (--out is the .onnx file).")] = "torch",
    hf_arch: Annotated[Optional[str], typer.Option(
        "--hf-arch", help="With --format hf: switch_transformers (T5 v1.0; the default for "
        "T5), mixtral (Llama/Mistral; their default), qwen2_moe (Llama/Mistral/Qwen2; "
        "Qwen2's default; the only one with shared experts) or qwen3_moe (Qwen3; its "
        "default).")
    ] = None,
    force: Force = False, json_out: JsonOut = False, explicit: frozenset = frozenset(),
) -> None:
    """Convert MODEL into a Switch Transformer and write a moeify checkpoint to --out."""
    import json

    import torch

    import moeify
    from moeify.hf import decoder_moe
    from moeify.io.sources import check_finite, load_source
    from moeify.writer import Writer, check_format

    check_format(format, hf_arch, seq_len=seq_len)  # before loading anything
    console = _console()
    with console.status(f"planning {model}"):  # on the meta device: no weights yet
        skeleton, _ = load_source(model, random_init=random_init or _is_preset(model),
                                  dtype=_dtype(dtype), device="meta")
        if format == "hf":  # the target fills its defaults and refuses what conflicts
            hf_arch = hf_arch or decoder_moe.default_arch(skeleton)
            config = decoder_moe.target_config(hf_arch, skeleton, config, explicit)
        plan = moeify.plan(skeleton, config, seq_len=seq_len)
        writer = Writer(skeleton, out, plan=plan, format=format, hf_arch=hf_arch, force=force,
                        inputs=[model])
    with writer:  # memory planned; --out checked and ours until written
        torch.manual_seed(config.seed)
        with console.status(f"loading {model}"):
            dense, source = load_source(model, random_init=random_init, dtype=_dtype(dtype))
            check_finite(dense, model)  # NaN / inf in the source: refused, naming the tensor
        with _progress(console) as progress:
            written = writer.write(dense, source=source, progress=progress.callback)
    report = written.report
    data = {**report.to_dict(), "source": source.ref, "out": str(out), "format": format}
    if format == "hf":
        data["hf"] = written.hf_dict()
    if written.tokenizer is not None:
        data["tokenizer"] = list(written.tokenizer)
    if json_out:
        typer.echo(json.dumps(data))
        return
    _print_report(report, console, title=f"moeify convert {model}")
    if written.hf is not None:
        for note in written.hf.notes:
            console.print(f"{written.hf_arch}: {note}", markup=False)
    if written.tokenizer:
        console.print(f"tokenizer: {', '.join(written.tokenizer)}", markup=False)
    elif written.tokenizer is not None:
        console.print(f"tokenizer: none in {model}, none written: transformers' pipelines "
                      "and llama.cpp's converter need one; copy the model's tokenizer files "
                      f"into {out}", markup=False)
    console.print(f"wrote {out}" + (f" ({written.hf.model_class})" if written.hf else ""))


@app.command()
def verify(
    path: Annotated[str, typer.Argument(help="A moeify checkpoint directory.")],
    onnx: OnnxFile = None, json_out: JsonOut = False,
) -> None:
    """Run the verification checks that apply to a checkpoint; exit 1 if any fails.

    Integrity (every tensor against its recorded sha256) always runs; the weight and
    identity checks need the source model, and a check that cannot run says why.
    """
    import json

    from rich.table import Table

    from moeify.verify import checks_to_dict
    from moeify.verify import verify as run_checks

    console = _console()
    with console.status(f"verifying {path}"):
        checks = run_checks(path, onnx=onnx)
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
    onnx_path: OnnxFile,
    seq_len: SeqLen,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="Static batch size (default: dynamic batch axis).")] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (>= 18).")] = 18,
    shard_experts: Annotated[Optional[int], typer.Option(
        "--shard-experts", help="Annotate expert weights as split over N devices.")] = None,
    optimize: Annotated[bool, typer.Option(
        "--optimize", help="Run ONNX Runtime's transformer fusions (attention, skip layer "
        "norm, gelu; bert, gpt2, t5) on the graph(s); the expert subgraph stays as it is.")] = False,
    quantize: Annotated[Optional[str], typer.Option(
        "--quantize", help="int4 or int8: weight-only quantization of the expert weights "
        "with ONNX Runtime's MatMulNBits (the router stays float32).")] = None,
    quantize_all: Annotated[bool, typer.Option(
        "--quantize-all", help="With --quantize: every linear weight, not only the experts' "
        "(int8 advised: int4 everywhere costs accuracy).")] = False,
    task: Annotated[Optional[str], typer.Option(
        "--task", help="text-generation (decoder-only: GPT-2, Llama) or text2text-generation "
        "(T5): --onnx is then a directory of graphs with a KV cache (prefill/encoder and "
        "decode steps) and generation.json, for moeify.onnx.OnnxGenerator.")] = None,
    moe_op: Annotated[str, typer.Option(
        "--moe-op", help="static (standard ONNX ops over fixed-capacity expert buffers) or "
        "ort (ONNX Runtime's com.microsoft.MoE: each expert runs on its routed tokens only, "
        "the capacity applied as a mask; ONNX Runtime only; ReLU, tanh-GELU, SiLU and SwiGLU "
        "experts).")] = "static",
    force: Force = False,
    json_out: JsonOut = False,
) -> None:
    """Export a converted model to ONNX with fixed capacity tensors (ONNX Runtime ready)."""
    import json
    from pathlib import Path

    import moeify
    from moeify.io.sources import CHECKPOINT_FILE, load_source
    from moeify.onnx.export import check_export_args

    check_export_args(seq_len, batch_size, opset)  # before loading anything
    from moeify.onnx.postprocess import check_postprocess_args

    check_postprocess_args(quantize, quantize_all)
    from moeify.onnx.export import check_moe_op_args

    check_moe_op_args(moe_op, quantize=quantize, shard_experts=shard_experts)
    if task is not None:
        from moeify.errors import MoEError
        from moeify.onnx.generation import TASKS

        if task not in TASKS:
            raise MoEError(f"unknown --task {task!r}: choose {' or '.join(TASKS)}")
        if shard_experts is not None or batch_size is not None:
            raise MoEError("--shard-experts and --batch-size apply to single-graph exports, "
                           "not to --task (its batch axis is dynamic)")
    from moeify.errors import Param
    from moeify.io.files import hold_output

    # never over the checkpoint it reads; the only writer until this command ends
    hold_output(onnx_path, inputs=[model], force=force, what=Param("onnx_path", "--onnx"),
                inside_ok=True)
    console = _console()
    with console.status(f"loading {model}"):
        if (Path(model) / CHECKPOINT_FILE).exists():
            loaded = model  # exported from the shards, one weight in memory at a time
        else:
            loaded, _ = load_source(model)
            console.print(f"{model} is not converted: exporting the dense model")
    if task is not None:
        from moeify.onnx.generation import export_generation

        with console.status(f"exporting {onnx_path}"):
            manifest = export_generation(loaded, onnx_path, seq_len=seq_len, task=task,
                                         tokenizer=model,
                                         opset=opset, force=force, optimize=optimize,
                                         quantize=quantize, quantize_all=quantize_all,
                                         moe_op=moe_op)
        if json_out:
            typer.echo(json.dumps({"onnx": onnx_path, "manifest": manifest}))
        else:
            files = ", ".join(graph["file"] for graph in manifest["graphs"].values())
            console.print(f"wrote {onnx_path} ({manifest['task']}): {files}, generation.json")
            console.print("tokenizer: " + (", ".join(manifest["tokenizer"]) or
                                           f"none in {model}, none written"), markup=False)
            if moe_op != "static":
                for name, graph in manifest["graphs"].items():
                    console.print(f"{name}: experts {graph['moe_op']}")
            for graph, done in manifest.get("postprocess", {}).items():
                console.print(f"{graph}: " + done.replace("\n", f"\n{graph}: "))
        return
    with console.status(f"exporting {onnx_path}"):
        metadata = moeify.export_onnx(loaded, onnx_path, seq_len=seq_len, batch_size=batch_size,
                                      opset=opset, force=force, shard_experts=shard_experts,
                                      optimize=optimize, quantize=quantize,
                                      quantize_all=quantize_all, moe_op=moe_op)
    if json_out:
        typer.echo(json.dumps({"onnx": onnx_path, "metadata": metadata}))
    else:
        console.print(f"wrote {onnx_path}: " + ", ".join(f"{k}={v}" for k, v in metadata.items()))


@app.command()
def distill(
    path: Annotated[str, typer.Argument(help="A moeify checkpoint (the Switch teacher).")],
    out: Out,
    rule: Annotated[str, typer.Option(
        "--rule", help="How each Switch layer's experts merge into one FFN: mean (plain "
        "mean) or usage (weighted by the tokens each expert processed on --data).")] = "mean",
    data: Annotated[Optional[str], typer.Option(
        "--data", help="For --rule usage: a text file of token ids, one sequence per line "
        "(whitespace-separated integers, all lines of one length), run through the teacher "
        "as one batch.")] = None,
    force: Force = False,
    json_out: JsonOut = False,
) -> None:
    """Write the dense student of a converted checkpoint as a transformers model.

    Each Switch layer's experts are merged into one FFN (--rule mean: their plain mean;
    --rule usage: weighted by the tokens each processed on --data); every other weight
    is copied.
    """
    import json

    import moeify
    from moeify.errors import MoEError
    from moeify.io.files import atomic_directory

    if rule not in ("mean", "usage"):
        raise MoEError(f"--rule {rule!r} is not one of mean, usage")
    if rule == "usage" and data is None:
        raise MoEError("--rule usage weighs each expert by the tokens it processed: pass "
                       "--data FILE (token ids, one sequence per line)")
    if rule == "mean" and data is not None:
        raise MoEError("--data is read only by --rule usage (the mean needs no data)")
    from moeify.io.files import hold_output

    hold_output(out, inputs=[path], force=force)  # never over the checkpoint it reads
    ids = _token_ids(data) if data is not None else None
    console = _console()
    with console.status(f"loading {path}"):
        teacher = moeify.load(path)
    if not hasattr(teacher, "save_pretrained"):
        raise MoEError(f"{path} was converted from a factory model: use moeify.distill(model, "
                       "dense=...) in Python and save the student yourself")
    if ids is not None:
        with console.status(f"running the teacher on {data} ({ids.shape[0]} sequences)"):
            _run_teacher(teacher, ids, data)
    with console.status("building the dense student"):
        student = moeify.distill(teacher, rule=rule)
    need = sum(t.numel() * t.element_size() for t in student.state_dict().values())
    with atomic_directory(out, force=force, need=need) as tmp:  # space checked first
        student.save_pretrained(tmp)
    params = sum(p.numel() for p in student.parameters())
    teacher_params = sum(p.numel() for p in teacher.parameters())
    report = {"out": out, "student_parameters": params, "teacher_parameters": teacher_params,
              "rule": rule}
    if json_out:
        typer.echo(json.dumps(report))
    else:
        how = ("averaged" if rule == "mean"
               else f"averaged, weighted by their tokens on {data},")
        console.print(f"wrote {out}: dense student with {params:,} parameters (teacher "
                      f"{teacher_params:,}); each Switch layer's experts {how} into one FFN")


def _token_ids(path: str):
    """``--data``: one sequence of whitespace-separated token ids per line, one length."""
    from pathlib import Path

    import torch

    from moeify.errors import MoEError

    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise MoEError(f"cannot read --data {path}: {getattr(error, 'strerror', None) or error}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append([int(v) for v in line.split()])
        except ValueError:
            raise MoEError(f"--data {path}, line {number}: not whitespace-separated integer "
                           "token ids") from None
    if not rows:
        raise MoEError(f"--data {path} holds no sequence")
    lengths = sorted({len(row) for row in rows})
    if len(lengths) > 1:
        raise MoEError(f"--data {path}: every sequence must have the same length, found "
                       f"lengths {', '.join(map(str, lengths[:4]))}")
    return torch.tensor(rows, dtype=torch.long)


def _run_teacher(teacher, ids, data: str) -> None:
    """One forward of the teacher (eval mode) on ``ids``, for ``--rule usage``."""
    import torch

    import moeify
    from moeify.errors import MoEError

    vocab = getattr(teacher.config, "vocab_size", None)
    if ids.min() < 0 or (vocab is not None and ids.max() >= vocab):
        raise MoEError(f"--data {data} holds token ids outside the vocabulary [0, {vocab})")
    plan = moeify.plan_of(teacher)
    declared = plan.seq_len if plan is not None and plan.config.group_size is None else None
    if declared is not None and ids.shape[1] != declared:
        raise MoEError(f"--data {data} has sequences of {ids.shape[1]} tokens, but the "
                       f"checkpoint's Switch layers are declared for {declared}")
    teacher.eval()
    with torch.no_grad():
        if getattr(teacher.config, "is_encoder_decoder", False):
            teacher(input_ids=ids, labels=ids)  # the decoder reads the same text, shifted
        else:
            teacher(input_ids=ids)


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


class Terminated(SystemExit):
    """SIGTERM, raised where the program is, so ``with`` blocks clean up (an output being
    written is discarded, its temporary removed) as on Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the cleanup finish
    raise Terminated(128 + signum)


def _os_error_text(error: OSError) -> str:
    """An ``OSError`` that reached the boundary (not mapped by a writer) as one line."""
    reason = error.strerror or str(error) or type(error).__name__
    names = [n for n in (error.filename, getattr(error, "filename2", None)) if n]
    return f"{reason}: {' -> '.join(map(str, names))}" if names else reason


def main() -> None:
    """Console entry point: run the app, turning library errors into one-line messages.

    `MoEError` (spelled with options, not Python parameters: `MoEError.render`),
    ``ValueError`` and ``OSError`` become one ``error:`` line and exit 1.
    SIGTERM is handled like Ctrl-C: the command unwinds (outputs in progress are
    discarded, previous ones stay) and exits 143.
    """
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    from moeify.io.files import command_scope

    try:
        with command_scope():  # output locks held by the command end with it
            app()
    except Terminated as stop:
        typer.echo("error: terminated (SIGTERM); an output being written was discarded and "
                   "any previous one is intact", err=True)
        sys.exit(stop.code)
    except Exception as error:  # noqa: BLE001 - the boundary where errors become messages
        from moeify.errors import MoEError

        if os.environ.get("MOEIFY_DEBUG") or not isinstance(error, (MoEError, ValueError,
                                                                     OSError)):
            raise
        if isinstance(error, MoEError):
            text = error.render(cli=True)
        else:
            text = _os_error_text(error) if isinstance(error, OSError) else str(error)
        typer.echo(f"error: {text}", err=True)
        sys.exit(1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
