"""`export_onnx`: a converted model as an ONNX graph with static expert capacity.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), opset
18 by default. The sequence axis is static (the capacity is a constant fixed for it);
the batch axis is dynamic unless ``batch_size`` is given, because groups are sequences.
Inputs and outputs by model kind:

| model | inputs | output |
| --- | --- | --- |
| encoder-only (BERT) | input_ids, attention_mask | last_hidden_state |
| decoder-only (GPT-2, Llama) | input_ids | logits (no KV cache) |
| encoder-decoder (T5) | input_ids, attention_mask, decoder_input_ids | logits |
| other modules | input (one tensor) | the module's output |

``metadata_props`` carry the moeify version, experts, top-k, router (the config's; a
T5's causal decoder keeps token choice), capacity (eval), group size and exporter,
which `OnnxRunner` reads to refuse inputs of another length.

Half precision: a bfloat16 or float16 model (in memory or a checkpoint directory)
exports as a **float32 graph**. Its weights are widened exactly (every bf16/fp16 value
is a float32 value) while they are traced or streamed into the file, the router is
float32 already, and the graph computes in float32: what ONNX Runtime's CPU provider
runs (it has few bf16 kernels), and the same function as the PyTorch model computed in
float32 from the same rounded weights. The metadata says ``dtype = float32`` and
``source_dtype = bfloat16`` (or ``float16``). A model in memory is widened for the
export and given back its own tensors afterwards.

Every export ends with ``onnx.checker.check_model(path, full_check=True)`` on the
written file (by path, so external data is checked where it lies); a graph that does
not pass raises `MoEError` and nothing is left at ``path``. Third-party warnings and
log lines of the exporter (torch.onnx, onnxscript, onnx_ir) are silenced during the
export; ``MOEIFY_DEBUG=1`` keeps them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeify import __version__
from moeify.compiler.plan import plan_of
from moeify.errors import MoEError, Param
from moeify.io.checkpoint import load_skeleton
from moeify.io.files import atomic_file, check_output
from moeify.onnx.external_data import external_data_name, graph_bytes
from moeify.onnx.moe_op import MOE_OP, check_moe_op, describe, ort_experts, translation_table
from moeify.onnx.postprocess import check_postprocess_args, postprocess, summary
from moeify.onnx.sharding import annotate_expert_sharding, check_sharding
from moeify.switch import switch_layers

MIN_OPSET = 18
DEFAULT_OPSET = 18
# the parameters messages name (`moeify.errors`); the destination is ``path`` in Python and
# ``--onnx`` on the command line
PATH, SEQ_LEN = Param("path", "--onnx"), Param("seq_len")
SHARD_EXPERTS = Param("shard_experts")


class _EncoderOnly(nn.Module):
    inputs = ("input_ids", "attention_mask")

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _DecoderOnly(nn.Module):
    inputs = ("input_ids",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


class _EncoderDecoder(nn.Module):
    inputs = ("input_ids", "attention_mask", "decoder_input_ids")

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          decoder_input_ids=decoder_input_ids, use_cache=False).logits


class _Plain(nn.Module):
    inputs = ("input",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input):
        return self.model(input)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder-only language model (an LM head, no encoder)."""
    return hasattr(model, "lm_head") or type(model).__name__.endswith("ForCausalLM")


def _wrap(model: nn.Module) -> nn.Module:
    config = getattr(model, "config", None)
    if config is None:
        return _Plain(model)
    if getattr(config, "is_encoder_decoder", False):
        return _EncoderDecoder(model)
    if is_causal_lm(model):
        return _DecoderOnly(model)
    return _EncoderOnly(model)


def _example(wrapper: nn.Module, model: nn.Module, batch: int, seq_len: int) -> tuple:
    if isinstance(wrapper, _Plain):
        d = getattr(model, "d_model", None)  # the model's own (a Switch layer's is not it)
        if not isinstance(d, int):
            raise MoEError("export_onnx needs a transformers model or a module with d_model")
        # on the weights' device: a skeleton streamed from a checkpoint is on meta
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return (torch.randn(batch, seq_len, d, device=device),)
    vocab = getattr(model.config, "vocab_size", 100)
    generator = torch.Generator().manual_seed(0)
    ids = lambda: torch.randint(2, vocab, (batch, seq_len), generator=generator)  # noqa: E731
    values = {"input_ids": ids(), "attention_mask": torch.ones(batch, seq_len, dtype=torch.long),
              "decoder_input_ids": ids()}
    return tuple(values[name] for name in wrapper.inputs)


def _stream_weights(program, weights, stored: dict[str, torch.dtype]) -> None:
    """Point every meta initializer at its tensor in the checkpoint, read when saved.

    A tensor stored in another floating dtype than the graph declares (a bf16 / fp16
    checkpoint exports as a float32 graph) is widened as it is read; ``stored`` collects
    the dtype each tensor had in the checkpoint."""
    import onnx_ir as ir
    from onnx_ir.tensor_adapters import TorchTensor

    for name, value in program.model.graph.initializers.items():
        current = value.const_value
        raw = getattr(current, "raw", None)
        if not (isinstance(raw, torch.Tensor) and raw.is_meta):
            continue
        key = name.removeprefix("model.")
        if key not in weights:
            raise MoEError(f"the graph needs weight {key!r}, which the checkpoint does not hold")

        def read(key: str = key, name: str = name, dtype: torch.dtype = raw.dtype) -> TorchTensor:
            tensor = weights.get(key)
            stored[key] = tensor.dtype
            if tensor.dtype != dtype:
                if not (tensor.is_floating_point() and dtype.is_floating_point):
                    raise MoEError(f"checkpoint tensor {key!r} is {tensor.dtype}, but the graph "
                                   f"declares {dtype}")
                tensor = tensor.to(dtype)
            return TorchTensor(tensor.contiguous(), name=name)

        value.const_value = ir.LazyTensor(read, dtype=current.dtype, shape=current.shape,
                                          name=name)


HALF = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def _widened(model: nn.Module):
    """Every bf16 / fp16 parameter and buffer of ``model`` as float32 (exact), inside the
    block; afterwards the model gets its own parameter and buffer objects back.

    New float32 objects take their places (the old ones are not mutated), so an exported
    program that holds them keeps float32 tensors after the block. Meta tensors cost
    nothing; a parameter shared by several modules (tied weights) stays one parameter."""
    widened: dict[int, nn.Parameter] = {}
    replaced: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and param.dtype in HALF:
                    if id(param) not in widened:
                        widened[id(param)] = nn.Parameter(param.detach().float(),
                                                          requires_grad=param.requires_grad)
                    replaced.append((module._parameters, name, param))
                    module._parameters[name] = widened[id(param)]
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.dtype in HALF:
                    replaced.append((module._buffers, name, buffer))
                    module._buffers[name] = buffer.float()
        yield
    finally:
        for table, name, original in reversed(replaced):
            table[name] = original


def exporter_name(opset: int) -> str:
    """The ``exporter`` entry of a graph's metadata."""
    return f"torch.onnx.export(dynamo=True), torch {torch.__version__}, opset {opset}"


def routing_metadata(config, group: int) -> dict[str, str]:
    """The routing facts a graph's ``metadata_props`` carry for a converted model whose
    groups hold ``group`` tokens in that graph (`OnnxRunner` and the optimizer read them)."""
    c = config
    metadata = {"num_experts": str(c.num_experts), "top_k": str(c.top_k),
                "expert_capacity": str(c.capacity(group, training=False)),
                "group_size": str(group), "router": c.router.value}
    if c.dropless:
        metadata["dropless"] = dropless_cost(c.num_experts, c.top_k, group)
    return metadata


def set_metadata(proto, metadata: dict[str, str]) -> None:
    """Append ``metadata`` to the graph proto's ``metadata_props``."""
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


@contextlib.contextmanager
def declarations_restored(model: nn.Module):
    """``model`` in eval mode inside the block, its Switch layers free to be declared for
    the graph being exported; afterwards every layer's declared length and the model's
    mode are what they were."""
    layers = [layer for _, layer in switch_layers(model)]
    saved = [layer.tokens_per_group for layer in layers]
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        for layer, tokens in zip(layers, saved):
            layer.set_tokens_per_group(tokens)
        model.train(was_training)


def dropless_cost(num_experts: int, top_k: int, group: int) -> str:
    """What a dropless layer costs in a static graph (its metadata's ``dropless``).

    A graph's capacity is a constant; dropless, it is the group's length, so every
    expert's buffer has a slot for every token of a group, and the experts run on all of
    them: ``E x T`` rows per group where the routed choices are ``k x T``."""
    return (f"capacity = the group's {group} tokens; the experts compute {num_experts} x "
            f"{group} slots per group for {top_k} x {group} routed choices "
            f"({num_experts / top_k:g}x the expert work of the routed tokens)")


def _source_dtype(model: nn.Module, stored: dict[str, torch.dtype] | None = None) -> str:
    """The floating dtype(s) of the model's weights outside the routers (float32 in any
    model), as the metadata's ``source_dtype``; ``stored``: the dtypes read from a
    checkpoint's shards, when the model is a skeleton of one."""
    routers = tuple(f"{name}.router." for name, _ in switch_layers(model))
    found: set[str] = set()
    for name, param in model.named_parameters():
        if name.startswith(routers):
            continue
        dtype = param.dtype if stored is None else stored.get(name)
        if dtype is not None and dtype.is_floating_point:
            found.add(str(dtype).removeprefix("torch."))
    return ",".join(sorted(found)) or "none"


# loggers of the exporter and the libraries under it, silenced during an export
QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo",
                 "torch.fx", "torch.utils._sympy", "onnxscript", "onnx_ir", "onnx")


@contextlib.contextmanager
def _quiet():
    """Third-party warnings, log records and prints of the exporter, silenced (stderr
    keeps moeify's own progress and messages; stdout stays free for ``--json``).
    ``MOEIFY_DEBUG=1`` lets them through."""
    if os.environ.get("MOEIFY_DEBUG"):
        yield
        return
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL + 1)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows (``max_position_embeddings`` /
    ``n_positions``), or None where it has no such limit (T5's relative positions)."""
    config = getattr(model, "config", None)
    for attribute in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_export_args(seq_len: Any, batch_size: Any, opset: Any = DEFAULT_OPSET) -> None:
    """Refuse a sequence length, batch size or opset an export cannot honour, before any
    work (`export_onnx` and the ``moeify export`` command call it first)."""
    def positive(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise MoEError(f"opset {opset} is too old: moeify exports with opset >= {MIN_OPSET}")
    if not positive(seq_len):
        raise MoEError(f"seq_len must be a positive int (the static sequence axis), got {seq_len!r}")
    if batch_size is not None and not positive(batch_size):
        raise MoEError(f"batch size must be a positive int (a static batch axis), or none for "
                       f"a dynamic one, got {batch_size!r}")


def check_moe_op_args(moe_op: str, *, quantize: str | None = None,
                      shard_experts: int | None = None) -> None:
    """Refuse ``moe_op`` values and combinations before any work."""
    check_moe_op(moe_op)
    if moe_op != "ort":
        return
    if quantize is not None:
        raise MoEError("{quantize} rewrites the expert MatMuls of the static graph, and with "
                       "{ort} the experts are one com.microsoft.MoE node per layer: export "
                       "with {static} to quantize", quantize=Param("quantize"),
                       ort=MOE_OP.given("ort"), static=MOE_OP.given("static"))
    if shard_experts is not None:
        raise MoEError("{shard_experts} annotates the static graph's expert tensors: export "
                       "with {static} to shard", shard_experts=SHARD_EXPERTS,
                       static=MOE_OP.given("static"))


def _check_positions(model: nn.Module, seq_len: int) -> None:
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise MoEError("{seq_len} exceeds the model's maximum of {limit} positions (its "
                       "config's max_position_embeddings): export with {param} <= {limit}",
                       seq_len=SEQ_LEN.given(seq_len), param=SEQ_LEN, limit=limit)


def _check_written(path: Path) -> None:
    """`onnx.checker.check_model(full_check=True)` on the file at ``path`` (by path, so
    external data beside it is found); a failure is a `MoEError`."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:  # noqa: BLE001 - ValidationError, InferenceError, ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MoEError(f"the exported graph does not pass onnx.checker ({first}); nothing was "
                       "written (MOEIFY_DEBUG=1 shows the details)") from error


def export_onnx(
    model: nn.Module | str | os.PathLike,
    path: str | os.PathLike,
    *,
    seq_len: int,
    batch_size: int | None = None,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    shard_experts: int | None = None,
    external_data: bool | None = None,
    optimize: bool = False,
    quantize: str | None = None,
    quantize_all: bool = False,
    moe_op: str = "static",
) -> dict[str, str]:
    """Export ``model`` to ``path`` (see the module docs); returns the metadata written.

    ``model`` is a module or the directory of a moeify checkpoint. From a checkpoint the
    graph is traced on meta parameters and each weight is read from its shard only while
    it is written, so a model far larger than memory exports (peak: one tensor).
    A converted model's Switch layers are declared for ``seq_len`` for the export (a
    model converted for another length is refused). A dense model exports as it is; the
    metadata then says ``moeify_converted = false``. ``shard_experts=N`` writes the
    expert-parallel plan over N devices into the graph (`moeify.onnx.sharding`), checked
    before saving. Weights go to ``<path>.data`` beside the file (ONNX external data) when
    ``external_data`` is true, or by default when the graph is over 2 GB.
    A bf16 / fp16 model exports as a float32 graph (see the module docs).
    ``quantize`` (``int4`` / ``int8``: the expert weights, every linear weight with
    ``quantize_all``) and ``optimize`` (ONNX Runtime's transformer fusions) post-process
    the staged graph (`moeify.onnx.postprocess`); the metadata returned then says what
    they did under ``quantized`` / ``optimized``. ``moe_op="ort"`` writes the expert
    layers that it can express as ONNX Runtime's ``com.microsoft.MoE`` operator, the
    capacity applied as a mask (`moeify.onnx.moe_op`; the metadata's ``moe_op`` says
    which layers); a checkpoint directory is then loaded whole. Refused with a
    `MoEError`: ``seq_len`` or ``batch_size`` below 1, ``seq_len`` beyond the model's
    maximum positions (where its config has one), and a graph `onnx.checker` rejects.
    """
    import onnx


    check_export_args(seq_len, batch_size, opset)
    check_postprocess_args(quantize, quantize_all)
    check_moe_op_args(moe_op, quantize=quantize, shard_experts=shard_experts)
    if shard_experts is not None and quantize is not None:
        raise MoEError("{quantize} writes per-expert MatMulNBits, which an expert-parallel "
                       "plan does not describe: export with {shard_experts} or {quantize}",
                       quantize=Param("quantize"), shard_experts=SHARD_EXPERTS)
    path = Path(path)
    check_output(path, inputs=[] if isinstance(model, nn.Module) else [model], force=force,
                 what=PATH, inside_ok=True)  # never over the checkpoint being read
    weights = None
    if not isinstance(model, nn.Module):
        if moe_op == "static":
            model, weights = load_skeleton(model)
        else:  # the operator's weight layout is computed from the loaded experts
            from moeify.io.checkpoint import load

            model = load(model)
    conversion = plan_of(model)
    named_layers = switch_layers(model)
    layers = [layer for _, layer in named_layers]
    declared = {layer.tokens_per_group for layer in layers} - {None}
    if conversion is not None and conversion.config.group_size is None and declared - {seq_len}:
        raise MoEError(
            "the model's Switch layers are declared for {declared} tokens, not {n}: export "
            "with {seq_len}, or declare the other length first (moeify.set_seq_len(model, "
            "{n}))", declared=sorted(declared), n=seq_len,
            seq_len=SEQ_LEN.given(min(declared)))
    _check_positions(model, seq_len)
    if weights is None and any(p.is_meta for p in model.parameters()):
        raise MoEError("the model has parameters on the meta device: load its weights, or "
                       "pass the checkpoint directory to export_onnx")
    with declarations_restored(model), _widened(model), _quiet():
        graph_dtype = _source_dtype(model)  # float32 for a bf16 / fp16 model
        for layer in layers:
            if layer.config.group_size is None:
                layer.set_tokens_per_group(seq_len)
        wrapper = _wrap(model).eval()
        example = _example(wrapper, model, batch_size or 2, seq_len)
        dynamic = None
        if batch_size is None:
            batch = torch.export.Dim("batch", min=1, max=4096)
            dynamic = {name: {0: batch} for name in wrapper.inputs}
        with torch.no_grad(), ort_experts(named_layers, moe_op) as static:
            # the optimizer folds small constants: with weights still on meta it runs
            # once they are attached (it never reads tensors above its size limit)
            program = torch.onnx.export(wrapper, example, dynamo=True, opset_version=opset,
                                        input_names=list(wrapper.inputs), output_names=["output"],
                                        dynamic_shapes=dynamic, verbose=False,
                                        optimize=weights is None,
                                        custom_translation_table=translation_table())
    stored: dict[str, torch.dtype] | None = None
    if weights is not None:
        stored = {}
        _stream_weights(program, weights, stored)
        with _quiet():
            program.optimize()
    c = conversion.config if conversion is not None else None
    data = external_data_name(program, path, external_data)
    metadata = {
        "moeify_version": __version__,
        "moeify_converted": "true" if c is not None else "false",
        "seq_len": str(seq_len),
        "batch_size": "dynamic" if batch_size is None else str(batch_size),
        "exporter": exporter_name(opset),
        "inputs": ",".join(wrapper.inputs),
        "external_data": data or "none",
        "dtype": graph_dtype,
    }
    if c is not None:
        metadata.update(routing_metadata(c, c.group_size or seq_len))
        metadata["moe_op"] = describe(named_layers, static)
    # staged beside `path` under the destination's lock, space checked; moved into place
    # (external data first, the graph last) when the block succeeds (`moeify.io.files`)
    with atomic_file(path, force=force, need=graph_bytes(program), what=PATH) as tmp:
        staged = Path(tmp) / path.name
        _save_ir(program.model, staged, data)
        metadata["source_dtype"] = _source_dtype(model, stored)  # stored: read while saved
        # metadata and sharding go onto the graph proto; external weights stay on disk
        proto = onnx.load(str(staged), load_external_data=False)
        if shard_experts is not None:
            if conversion is None or conversion.sharding is None:
                raise MoEError("{shard_experts} needs a converted model (its conversion plan "
                               "says which weights shard)", shard_experts=SHARD_EXPERTS)
            metadata["sharded_nodes"] = str(
                annotate_expert_sharding(proto, shard_experts, conversion.sharding))
            metadata["shard_experts"] = str(shard_experts)
            check_sharding(proto)
        set_metadata(proto, metadata)
        onnx.save_model(proto, str(staged))
        _check_written(staged)  # with its external data, before anything reaches `path`
        reports = postprocess(staged, optimize=optimize, quantize=quantize,
                              quantize_all=quantize_all)
        for name, key in (("quantize", "quantized"), ("optimize", "optimized")):
            if name in reports:
                metadata[key] = summary({name: reports[name]})
    return metadata


def _save_ir(model, path: Path, external_data: str | None) -> None:
    import onnx_ir as ir

    with _quiet():
        if external_data is None:
            ir.save(model, path)
        else:  # written tensor by tensor: lazy (checkpoint) weights are read one at a time
            ir.save(model, path, external_data=external_data, max_workers=1)


class OnnxRunner:
    """Runs an exported graph in ONNX Runtime, refusing inputs it was not built for."""

    def __init__(self, path: str | os.PathLike) -> None:
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(path), load_external_data=False)
        self.metadata = {p.key: p.value for p in model.metadata_props}
        self.seq_len = int(self.metadata["seq_len"]) if "seq_len" in self.metadata else None
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, **inputs: Any):
        missing = [name for name in self.inputs if name not in inputs]
        if missing:
            raise MoEError(f"the graph needs inputs {self.inputs}; missing {missing}")
        feeds = {}
        for name in self.inputs:
            value = inputs[name]
            value = value.numpy() if isinstance(value, torch.Tensor) else value
            if self.seq_len is not None and value.ndim >= 2 and value.shape[1] != self.seq_len:
                raise MoEError(
                    "{name} has sequence length {n}, but this graph's expert capacity is fixed "
                    "for {fixed} tokens: pad or truncate to {fixed}, or export again with "
                    "{seq_len}", name=name, n=value.shape[1], fixed=self.seq_len,
                    seq_len=SEQ_LEN.given(value.shape[1]))
            feeds[name] = value
        return self.session.run(None, feeds)[0]
