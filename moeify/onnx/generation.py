"""`export_generation`: a converted generator as ONNX graphs with a KV cache.

One graph per model serves an encoder; a generator re-running its whole fixed-length
decoder for every new token does not. ``export_generation`` writes a directory:

| task | graphs | what each does |
| --- | --- | --- |
| ``text-generation`` (GPT-2, Llama, Mistral, Qwen2: decoder-only) | ``prefill.onnx`` | the prompt, ``[batch, seq_len]`` left-padded -> next-token logits, the keys/values of every layer |
| | ``decode.onnx`` | one new token per sequence and the past keys/values -> logits, the keys/values one longer |
| ``text2text-generation`` (T5) | ``encoder.onnx`` | the input, ``[batch, seq_len]`` right-padded -> encoder states |
| | ``decoder_init.onnx`` | the decoder's first token and the encoder states -> logits, self-attention keys/values, cross-attention keys/values |
| | ``decoder.onnx`` | one token per sequence, past self-attention and cross-attention keys/values -> logits, self-attention keys/values one longer |

plus ``generation.json``, the manifest `moeify.onnx.OnnxGenerator` reads (graph files,
input and output names, cache layout, special tokens, the declared length).

Expert capacity in these graphs follows the rule everywhere else: a group is one
sequence's tokens of one forward, each sequence's capacity comes from its real tokens
(the attention mask), padding takes no slot. The prefill (encoder) graph holds groups
of ``seq_len`` tokens, so prompt tokens can drop as they do in PyTorch; in a decode step
a group is that step's one token of one sequence, and its capacity is at least
``min_capacity`` (>= 1), so a decode step never drops a token. The PyTorch model run by
Hugging Face ``generate()`` does the same per call, which is why the tokens agree.

Inputs are named ``input_ids``, ``attention_mask`` (the whole sequence so far, past
included), ``position_ids`` (decoder-only: as ``generate()`` derives them, the running
count of real tokens), ``past.{i}.key`` / ``past.{i}.value`` (``[batch, kv_heads, past,
head_dim]``), and for T5 ``decoder_input_ids``, ``encoder_hidden_states``,
``encoder_attention_mask``, ``cross.{i}.key`` / ``cross.{i}.value``. Outputs:
``logits`` (``[batch, vocab]``, the last position only) and ``present.{i}.key`` /
``present.{i}.value`` (and ``cross.*`` from ``decoder_init``). Batch and past length
are dynamic axes; the prompt axis is static at ``seq_len``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeify import __version__
from moeify.compiler.plan import plan_of
from moeify.config import config_param
from moeify.errors import MoEError, Param
from moeify.io.checkpoint import load
from moeify.io.files import atomic_directory, check_output
from moeify.io.tokenizer import find_tokenizer
from moeify.onnx.export import (
    DEFAULT_OPSET,
    _check_written,
    _quiet,
    _save_ir,
    _widened,
    check_export_args,
    check_moe_op_args,
    declarations_restored,
    exporter_name,
    is_causal_lm,
    max_positions,
    routing_metadata,
    set_metadata,
)
from moeify.onnx.external_data import external_data_name
from moeify.onnx.generator import FORMAT, MANIFEST
from moeify.onnx.moe_op import (
    describe,
    ort_experts,
    refuse_static,
    translation_table,
    unsupported,
)
from moeify.onnx.postprocess import check_postprocess_args, postprocess, summary
from moeify.switch import switch_layers

TASKS = ("text-generation", "text2text-generation")
# the destination directory messages name: ``out`` in Python, ``--onnx`` on the command line
OUT = Param("out", "--onnx")
MAX_BATCH = 1024


class _CausalLM(nn.Module):
    """Prefill (no past) or one decode step (past given) of a decoder-only model."""

    def __init__(self, model: nn.Module, with_past: bool) -> None:
        super().__init__()
        self.model, self.with_past = model, with_past

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        config = self.model.config
        cache = (DynamicCache(list(zip(past[0::2], past[1::2])), config=config) if past
                 else DynamicCache(config=config))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return (out.logits[:, -1], *_flat(out.cache))


class _Encoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.get_encoder()(input_ids=input_ids,
                                        attention_mask=attention_mask).last_hidden_state


class _Seq2SeqDecoder(nn.Module):
    """The decoder's first step (no past: writes the cross-attention keys/values too) or
    a later step (self-attention and cross-attention keys/values given)."""

    def __init__(self, model: nn.Module, with_past: bool) -> None:
        super().__init__()
        self.model, self.with_past = model, with_past

    def forward(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask, *past):
        from transformers import DynamicCache, EncoderDecoderCache

        config = self.model.config
        if past:
            layers = len(past) // 4
            own, cross = past[: 2 * layers], past[2 * layers:]
            cache = EncoderDecoderCache(
                DynamicCache(list(zip(own[0::2], own[1::2])), config=config),
                DynamicCache(list(zip(cross[0::2], cross[1::2])), config=config))
        else:
            cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
        out = self.model(decoder_input_ids=decoder_input_ids,
                         encoder_outputs=(encoder_hidden_states,),
                         attention_mask=encoder_attention_mask, cache=cache, use_cache=True)
        own = _flat(out.cache.self_attention_cache)
        if past:
            return (out.logits[:, -1], *own)
        return (out.logits[:, -1], *own, *_flat(out.cache.cross_attention_cache))


def _flat(cache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def _kv_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.{i}.{part}" for i in range(layers) for part in ("key", "value")]


def task_of(model: nn.Module) -> str:
    """The generation task ``model`` exports for, or a `MoEError` naming what it is."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", type(model).__name__)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        if kind == "t5":
            return "text2text-generation"
    elif config is not None and is_causal_lm(model):
        return "text-generation"
    raise MoEError(
        "{kind} has no generation export: text-generation takes decoder-only models with an "
        "LM head (GPT-2, Llama, Mistral, Qwen2), text2text-generation takes T5; export other "
        "models as one graph with {export_onnx}", kind=kind,
        export_onnx=Param("export_onnx", "`moeify export --onnx FILE`", owner="moeify"))


def _check_cache_layout(model: nn.Module) -> None:
    """Refuse models whose cache is not a plain key/value per layer (sliding windows,
    linear attention): their decode graph would need another past layout."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    odd = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer})
    if odd:
        raise MoEError(
            f"{model.config.model_type} keeps a {', '.join(odd)} cache (sliding-window or "
            "linear attention), which the generation export does not lay out: convert a "
            "config without a sliding window (e.g. sliding_window=None)")


def _declare(layers: list[tuple[str, nn.Module]], tokens: int) -> None:
    for _, layer in layers:
        layer.set_tokens_per_group(tokens)


def _export_graph(wrapper: nn.Module, example: tuple, inputs: list[str], outputs: list[str],
                  dynamic: dict[str, Any], path: Path, opset: int, tokens: int,
                  layers: list[tuple[str, nn.Module]], moe_op: str,
                  external_data: bool | None) -> str:
    """Export one graph to ``path`` with its ``metadata_props`` (as `export_onnx` writes
    them, for the group length ``tokens`` this graph routes) and check it. ``layers``:
    the Switch layers this graph runs, declared for ``tokens``. Returns the graph's
    ``moe_op`` line (`moeify.onnx.moe_op.describe`). Weights go to ``<file>.data`` beside
    it when ``external_data`` is true, or by default when the graph is over 2 GB."""
    import onnx

    with torch.no_grad(), ort_experts(layers, moe_op, refuse_none=False) as static:
        program = torch.onnx.export(wrapper.eval(), example, dynamo=True, opset_version=opset,
                                    input_names=inputs, output_names=outputs,
                                    dynamic_shapes=dynamic, verbose=False, optimize=True,
                                    custom_translation_table=translation_table())
    kind = describe(layers, static)
    _save_ir(program.model, path, external_data_name(program, path, external_data))
    proto = onnx.load(str(path), load_external_data=False)  # the weights stay where they are
    conversion = plan_of(wrapper.model)
    metadata = {"moeify_version": __version__, "inputs": ",".join(inputs),
                "moeify_converted": "true" if conversion is not None else "false",
                "exporter": exporter_name(opset)}
    if conversion is not None:
        metadata.update(routing_metadata(conversion.config, tokens))
        metadata["moe_op"] = kind
    set_metadata(proto, metadata)
    onnx.save_model(proto, str(path))
    _check_written(path)
    return kind


def _dims(names: list[str], axes: dict[str, dict[int, Any]]) -> dict[str, Any]:
    """dynamic_shapes for torch.export: the leading named inputs by name, past tensors
    (the wrapper's ``*past``) as one tuple under ``past``."""
    fixed = {name: axes[name] for name in names if not name.startswith(("past.", "cross."))}
    past = tuple(axes[name] for name in names if name.startswith(("past.", "cross.")))
    return {**fixed, "past": past} if past else fixed


def export_generation(
    model: nn.Module | str | os.PathLike,
    out: str | os.PathLike,
    *,
    seq_len: int,
    task: str | None = None,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    optimize: bool = False,
    quantize: str | None = None,
    quantize_all: bool = False,
    moe_op: str = "static",
    external_data: bool | None = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Export a (converted) generator to the directory ``out``; returns the manifest.

    ``model``: a module or a moeify checkpoint directory. ``seq_len``: the longest
    prompt (the static axis of the prefill or encoder graph). ``task``: checked against
    the model (default: the model's own, see `task_of`). Refused with a `MoEError`: a
    task the model has no graphs for, a model whose groups are not sequences
    (``MoEConfig.group_size``: a decode step holds one token per sequence), a cache
    layout other than one key/value per layer, and the refusals of `export_onnx`.
    ``out`` is written atomically and not replaced without ``force``. ``quantize`` /
    ``quantize_all`` / ``optimize`` post-process every graph as `export_onnx` does (the
    optimizer's fusions for T5 with ``t5``, for decoder-only models with ``gpt2``); the
    manifest's ``postprocess`` says what each did. ``moe_op="ort"``: the expert layers
    that `moeify.onnx.moe_op` can express become ONNX Runtime's ``com.microsoft.MoE``
    node, in every graph (a decode step then reads only its tokens' experts); each
    graph's ``moe_op`` entry in the manifest says which layers. ``external_data``: each
    graph's weights in ``<file>.data`` beside it (ONNX external data); by default only
    for a graph over 2 GB, which protobuf cannot hold in one file. ``tokenizer``: where
    the tokenizer files come from (`moeify.io.tokenizer.find_tokenizer`; default: the
    checkpoint directory ``model`` names), copied beside the graphs; the manifest's
    ``tokenizer`` lists them (empty: none was found).
    """

    check_export_args(seq_len, None, opset)
    check_postprocess_args(quantize, quantize_all)
    check_moe_op_args(moe_op, quantize=quantize)
    if task is not None and task not in TASKS:
        raise MoEError("unknown {task!r}: choose one of {tasks}",
                       task=Param("task").given(task), tasks=", ".join(TASKS))
    out = Path(out)
    check_output(out, inputs=[] if isinstance(model, nn.Module) else [model], force=force,
                 what=OUT)
    if tokenizer is None and not isinstance(model, nn.Module):
        tokenizer = model
    tokenizer = find_tokenizer(tokenizer)
    if not isinstance(model, nn.Module):
        model = load(model)
    own = task_of(model)
    if task is not None and task != own:
        raise MoEError("{kind} exports for {own}, not {task}: pass {task_own}",
                       kind=model.config.model_type, own=own, task=task,
                       task_own=Param("task").given(own))
    limit = max_positions(model)
    if limit is not None and seq_len >= limit:
        param = Param("seq_len")
        raise MoEError("{seq_len!r} leaves no room to generate within the model's {limit} "
                       "positions: export with {param} < {limit}",
                       seq_len=param.given(seq_len), param=param, limit=limit)
    conversion = plan_of(model)
    if conversion is not None and conversion.config.group_size is not None:
        raise MoEError(
            "the model routes fixed groups of {size} tokens ({group_size}), but a decode "
            "step holds one token per sequence: convert with groups = sequences (no "
            "{group_size}) to export for generation", size=conversion.config.group_size,
            group_size=config_param("group_size"))
    _check_cache_layout(model)
    layers = switch_layers(model)
    with declarations_restored(model), _widened(model), _quiet():
        with atomic_directory(out, force=force, what=OUT) as tmp:
            if own == "text-generation":
                graphs = _export_causal(model, layers, tmp, seq_len, opset,
                                        (moe_op, external_data))
            else:
                encoder = [(n, l) for n, l in layers if n.startswith("encoder.")]
                decoder = [(n, l) for n, l in layers if not n.startswith("encoder.")]
                graphs = _export_seq2seq(model, encoder, decoder, tmp, seq_len, opset,
                                         (moe_op, external_data))
            if moe_op == "ort" and all(g["moe_op"].startswith("static")
                                       for g in graphs["graphs"].values()):
                refuse_static(filter(None, (unsupported(layer) for _, layer in layers)))
            manifest = _manifest(model, own, seq_len, graphs, opset, limit)
            done = _postprocess(tmp, graphs["graphs"], optimize=optimize, quantize=quantize,
                                quantize_all=quantize_all,
                                model_type="t5" if own == "text2text-generation" else "gpt2")
            if done:
                manifest["postprocess"] = done
            manifest["tokenizer"] = [] if tokenizer is None else list(tokenizer.copy_to(tmp))
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _postprocess(tmp: Path, graphs: dict[str, Any], **options: Any) -> dict[str, str]:
    """Quantize / optimize every staged graph; the summary line of each, by graph."""

    done = {}
    for name, graph in graphs.items():
        reports = postprocess(tmp / graph["file"], **options)
        if reports:
            done[name] = summary(reports)
    return done


def _prompt(model: nn.Module, batch: int, seq_len: int, left: bool):
    """Example ids and a padded mask (the first sequence shorter by a quarter)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, model.config.vocab_size, (batch, seq_len), generator=generator)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    short = max(1, seq_len // 4) if seq_len > 1 else 0
    if short:
        if left:
            mask[0, :short] = 0
        else:
            mask[0, seq_len - short:] = 0
    return ids, mask


def _export_causal(model, layers, tmp: Path, seq_len: int, opset: int,
                   options: tuple[str, bool | None]) -> dict[str, Any]:
    """``options``: (moe_op, external_data) for `_export_graph`."""
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    past_len = torch.export.Dim("past", min=1, max=2**16)
    ids, mask = _prompt(model, 2, seq_len, left=True)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits", *_kv_names("present", num_layers)]
    _declare(layers, seq_len)
    axes = {name: {0: batch} for name in inputs}
    prefill_op = _export_graph(_CausalLM(model, False), (ids, mask, positions), inputs,
                               outputs, _dims(inputs, axes), tmp / "prefill.onnx", opset,
                               seq_len, layers, *options)
    with torch.no_grad():
        first = _CausalLM(model, False)(ids, mask, positions)
    past = first[1:]
    step = torch.full((2, 1), 2, dtype=torch.long)
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    step_positions = positions[:, -1:] + 1
    past_names = _kv_names("past", num_layers)
    _declare(layers, 1)
    axes.update({name: {0: batch, 2: past_len} for name in past_names})
    axes["attention_mask"] = {0: batch, 1: past_len + 1}
    decode_op = _export_graph(_CausalLM(model, True), (step, step_mask, step_positions, *past),
                              inputs + past_names, outputs, _dims(inputs + past_names, axes),
                              tmp / "decode.onnx", opset, 1, layers, *options)
    kv_heads, head_dim = past[0].shape[1], past[0].shape[3]
    return {
        "layers": num_layers, "kv_heads": kv_heads, "head_dim": head_dim,
        "graphs": {
            "prefill": {"file": "prefill.onnx", "inputs": inputs, "outputs": outputs,
                        "tokens_per_group": seq_len, "moe_op": prefill_op},
            "decode": {"file": "decode.onnx", "inputs": inputs + past_names, "outputs": outputs,
                       "tokens_per_group": 1, "moe_op": decode_op},
        },
    }


def _export_seq2seq(model, encoder_layers, decoder_layers, tmp: Path, seq_len: int,
                    opset: int, options: tuple[str, bool | None]) -> dict[str, Any]:
    """``options``: (moe_op, external_data) for `_export_graph`."""
    num_layers = model.config.num_decoder_layers
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    past_len = torch.export.Dim("past", min=1, max=2**16)
    ids, mask = _prompt(model, 2, seq_len, left=False)
    _declare(encoder_layers, seq_len)
    encoder_inputs = ["input_ids", "attention_mask"]
    encoder_op = _export_graph(_Encoder(model), (ids, mask), encoder_inputs,
                               ["encoder_hidden_states"],
                               {name: {0: batch} for name in encoder_inputs},
                               tmp / "encoder.onnx", opset, seq_len, encoder_layers, *options)
    with torch.no_grad():
        states = _Encoder(model)(ids, mask)
    start = torch.full((2, 1), model.config.decoder_start_token_id, dtype=torch.long)
    _declare(decoder_layers, 1)
    inputs = ["decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask"]
    present, cross = _kv_names("present", num_layers), _kv_names("cross", num_layers)
    axes: dict[str, dict[int, Any]] = {name: {0: batch} for name in inputs}
    init_op = _export_graph(_Seq2SeqDecoder(model, False), (start, states, mask), inputs,
                            ["logits", *present, *cross], _dims(inputs, axes),
                            tmp / "decoder_init.onnx", opset, 1, decoder_layers, *options)
    with torch.no_grad():
        first = _Seq2SeqDecoder(model, False)(start, states, mask)
    own, cross_kv = first[1: 1 + 2 * num_layers], first[1 + 2 * num_layers:]
    past = _kv_names("past", num_layers)
    axes.update({name: {0: batch, 2: past_len} for name in past})
    axes.update({name: {0: batch} for name in cross})
    decoder_op = _export_graph(_Seq2SeqDecoder(model, True), (start, states, mask, *own,
                                                              *cross_kv),
                               inputs + past + cross, ["logits", *present],
                               _dims(inputs + past + cross, axes), tmp / "decoder.onnx", opset,
                               1, decoder_layers, *options)
    return {
        "layers": num_layers, "kv_heads": own[0].shape[1], "head_dim": own[0].shape[3],
        "graphs": {
            "encoder": {"file": "encoder.onnx", "inputs": encoder_inputs,
                        "outputs": ["encoder_hidden_states"], "tokens_per_group": seq_len,
                        "moe_op": encoder_op},
            "decoder_init": {"file": "decoder_init.onnx", "inputs": inputs,
                             "outputs": ["logits", *present, *cross], "tokens_per_group": 1,
                             "moe_op": init_op},
            "decoder": {"file": "decoder.onnx", "inputs": inputs + past + cross,
                        "outputs": ["logits", *present], "tokens_per_group": 1,
                        "moe_op": decoder_op},
        },
    }


def _manifest(model, task: str, seq_len: int, graphs: dict[str, Any], opset: int,
              limit: int | None) -> dict[str, Any]:
    config = model.config
    generation = getattr(model, "generation_config", None)

    def token(name: str):
        value = getattr(generation, name, None)
        value = getattr(config, name, None) if value is None else value
        return list(value) if isinstance(value, (list, tuple)) else value

    conversion = plan_of(model)
    c = conversion.config if conversion is not None else None
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "task": task,
        "model_type": config.model_type,
        "seq_len": seq_len,
        "max_positions": limit,
        "vocab_size": config.vocab_size,
        "pad_token_id": token("pad_token_id"),
        "eos_token_id": token("eos_token_id"),
        "moeify_version": __version__,
        "exporter": exporter_name(opset),
        "moeify_converted": c is not None,
        **graphs,
    }
    if task == "text2text-generation":
        manifest["decoder_start_token_id"] = config.decoder_start_token_id
    if c is not None:
        manifest.update({"num_experts": c.num_experts, "top_k": c.top_k,
                         "expert_capacity": {
                             name: c.capacity(graph["tokens_per_group"], training=False)
                             for name, graph in graphs["graphs"].items()
                             if name in ("prefill", "encoder", "decode", "decoder")}})
    return manifest
