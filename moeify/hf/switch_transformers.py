"""Write a converted T5 (v1.0) as a Hugging Face SwitchTransformers checkpoint.

T5 v1.0 maps one to one onto ``SwitchTransformersForConditionalGeneration``: the
dense parts keep their names with ``DenseReluDense`` renamed ``mlp``; a Switch layer's
experts become ``mlp.experts.expert_{j}.{wi,wo}`` (transposed back to ``nn.Linear``
layout) and its router ``mlp.router.classifier``. What HF's classes can express limits
what converts:

- the source is a T5 v1.0 model (ReLU FFN without biases; v1.1's gated GELU has no
  SwitchTransformers counterpart);
- top-1 token-choice routing with the softmax gate over softmax scores, no routed
  scaling and no shared experts (`moeify.hf.decoder_moe.check_routing`; expert choice has
  no HF counterpart), ``copy`` or ``random`` experts (``partition`` changes the experts'
  width); with ``bias_balancing`` the selection bias is not carried, so it must still be
  0;
- sparse layers at the odd indices of each stack (``every`` 1 or 2), as HF places them;
- one capacity: HF's ``expert_capacity`` is a number of slots per sequence, so it is
  written as the *evaluation* capacity at the declared ``seq_len``. Loaded with
  ``from_pretrained``, the model computes what moeify's module computes in eval mode.

Anything else raises `MoEError` suggesting the moeify checkpoint format (``format='torch'``,
``--format torch``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeify.compiler.plan import plan_of
from moeify.config import Gate, Init, RouterKind, config_param
from moeify.errors import MoEError, Param
from moeify.hf.decoder_moe import (
    FORMAT,
    SWITCH_TRANSFORMERS,
    check_routing,
    check_selection_bias,
)
from moeify.hf.decoder_moe import _fail as _refused
from moeify.io.files import atomic_directory
from moeify.io.tokenizer import Tokenizer

MODEL_CLASS = "SwitchTransformersForConditionalGeneration"  # the class a checkpoint loads as


def _fail(reason: str, **values: Any) -> MoEError:
    """The SwitchTransformers format refused: ``reason`` is a message template over
    ``values``; the message suggests the moeify checkpoint format instead."""
    return _refused(reason + "; use {torch}", torch=FORMAT.given("torch"), **values)


def switch_config(model: nn.Module):
    """The ``SwitchTransformersConfig`` equivalent to a converted T5 v1.0 model."""
    import transformers

    conversion = plan_of(model)
    if conversion is None:
        raise MoEError("the model is not converted: run moeify.convert first")
    if not isinstance(model, transformers.T5ForConditionalGeneration):
        raise _fail("the source is {name}, not a T5ForConditionalGeneration",
                    name=type(model).__name__)
    t5 = model.config
    if t5.is_gated_act or t5.dense_act_fn != "relu":
        raise _fail("the source T5 uses the {ffn!r} FFN (HF's Switch classes have T5 v1.0's "
                    "ReLU FFN only)", ffn=t5.feed_forward_proj)
    c = conversion.config
    if c.router == RouterKind.EXPERT_CHOICE:
        raise _fail("the model routes by expert choice in its encoder; HF's "
                    "SwitchTransformers routes by token choice (each token picks its expert)")
    check_routing(SWITCH_TRANSFORMERS, c)
    if c.top_k != 1 or c.gate != Gate.SOFTMAX:
        raise _fail("{top_k}, {gate} (HF routes top-1 with the softmax gate)",
                    top_k=config_param("top_k").given(c.top_k),
                    gate=config_param("gate").given(c.gate))
    if c.init == Init.PARTITION:
        raise _fail("{partition} gives experts a narrower FFN than HF's dense layers",
                    partition=config_param("init").given(Init.PARTITION))
    if conversion.seq_len is None or c.group_size is not None:
        raise _fail("HF's expert_capacity is per sequence: declare {seq_len} (and no group size)",
                    seq_len=Param("seq_len"))
    layer_index = {}
    for site in conversion.selected_sites:
        match = re.fullmatch(r"(encoder|decoder)\.block\.(\d+)\.layer\.\d+\.DenseReluDense", site.path)
        if match is None:
            raise _fail("site {path} is not a T5 FFN block", path=site.path)
        layer_index.setdefault(match.group(1), []).append(int(match.group(2)))
    steps = {}
    for stack, num in (("encoder", t5.num_layers), ("decoder", t5.num_decoder_layers)):
        chosen = sorted(layer_index.get(stack, []))
        for step in (2, 1):
            if chosen == [i for i in range(num) if i % step == 1 or step == 1]:
                steps[stack] = step
                break
        else:
            raise _fail("{stack} layers {chosen} are not HF's sparse layout (odd indices, or "
                        "all)", stack=stack, chosen=chosen)
    fields = {k: v for k, v in t5.to_dict().items() if k in (
        "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
        "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance",
        "dropout_rate", "layer_norm_epsilon", "initializer_factor", "pad_token_id",
        "eos_token_id", "decoder_start_token_id", "tie_word_embeddings", "is_encoder_decoder",
    )}
    return transformers.SwitchTransformersConfig(
        **fields,
        num_experts=c.num_experts,
        num_sparse_encoder_layers=t5.num_layers // steps["encoder"],
        num_sparse_decoder_layers=t5.num_decoder_layers // steps["decoder"],
        expert_capacity=c.capacity(conversion.seq_len, training=False),
        router_bias=False,
        router_jitter_noise=c.jitter_eps,
        router_dtype=c.router_dtype,
        router_ignore_padding_tokens=False,
        router_z_loss_coef=c.z_loss_coef,
        router_aux_loss_coef=c.aux_loss_coef,
        dense_act_fn="relu",
        feed_forward_proj="relu",
        use_cache=True,
    )


def switch_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """moeify's state dict renamed (and experts split) to SwitchTransformers names; a
    router's selection bias (``bias_balancing``, 0: `check_selection_bias`) is left out."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(".router.expert_bias"):
            continue
        name = name.replace(".DenseReluDense.", ".mlp.")
        experts = re.fullmatch(r"(.*\.mlp)\.experts\.(w_in|w_out)", name)
        if experts:
            prefix, which = experts.groups()
            target = "wi" if which == "w_in" else "wo"
            for j in range(tensor.shape[0]):
                state[f"{prefix}.experts.expert_{j}.{target}.weight"] = tensor[j].T
            continue
        state[name.replace(".mlp.router.weight", ".mlp.router.classifier.weight")] = tensor
    return state


def save_hf_switch(model: nn.Module, path: str | os.PathLike, *, force: bool = False,
                   tokenizer: Tokenizer | None = None) -> Path:
    """Write ``model`` (a converted T5 v1.0) as a SwitchTransformers checkpoint directory,
    with ``tokenizer``'s files (`moeify.io.tokenizer`) when given."""
    import transformers

    config = switch_config(model)
    check_selection_bias(model, SWITCH_TRANSFORMERS)
    with torch.device("meta"):
        switch = getattr(transformers, MODEL_CLASS)(config)
    state = switch_state_dict(model)
    expected = set(switch.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise MoEError(f"SwitchTransformers layout mismatch: missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]}")
    switch.load_state_dict({k: v.contiguous() for k, v in state.items()}, assign=True)
    switch.tie_weights()
    need = sum(t.numel() * t.element_size() for t in state.values())
    with atomic_directory(path, force=force, need=need) as tmp:  # locked, space checked
        switch.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.copy_to(tmp)
    return Path(path)
