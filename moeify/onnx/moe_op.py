"""Expert layers as ONNX Runtime's ``com.microsoft.MoE`` operator (``moe_op="ort"``).

The default export (``moe_op="static"``) writes each Switch layer in standard ONNX ops
over static ``[E, G*C, d]`` expert buffers: every expert runs on all its C slots, used
or not. ONNX Runtime's contrib operator ``com.microsoft.MoE`` (its CPU kernel, checked
with onnxruntime 1.32) instead groups the tokens by expert and runs each expert on the
rows routed to it only, so a decode step with one token per sequence reads one expert's
weights per token, not E.

The operator has no capacity: it routes every token. moeify keeps its function exact
around it:

- the router, the routing and the capacity stay in the graph as in the static form
  (float32 logits, slot positions, ``kept``); the operator receives the same float32
  logits and computes the same softmax gate: top-1 ``p * expert(x)``
  (``normalize_routing_weights=0``), top-k (k >= 2) renormalized over the k
  (``normalize_routing_weights=1``), a normalized gate ``normalize_routing_weights=1``,
  the raw gate at any k ``normalize_routing_weights=0``; a routed scaling factor is
  folded into the output projections (``fc2`` and its bias times the factor);
- its output is multiplied by the ``kept`` mask: a token that overflowed its expert's
  capacity (or a padding token) gets 0 and the residual carries it, as in the static
  graph. The operator computes that token's expert output and it is discarded: the
  work is the tokens', not the buffers' ``E x C`` slots.

Which layers can take the operator (`unsupported` says why not, and those layers keep
the static form):

| layer | operator form |
| --- | --- |
| ReLU, tanh GELU (``gelu_new``), SiLU experts, biases or not | ``relu`` / ``gelu`` / ``silu`` |
| gated SiLU (Llama's SwiGLU) | ``swiglu`` (interleaved fc1, alpha 1, beta 0, no limit) |
| exact (erf) GELU, gated GELU / ReLU | none: the operator's gelu is the tanh form |
| top-k (k >= 2) with capacity < group length | none: one of a token's choices can drop alone |
| expert choice | none: experts choose tokens |
| sigmoid scoring, a selection bias (bias balancing) | none: the operator selects and weighs by the softmax of the logits it gets |

A graph with the operator runs on ONNX Runtime only (``onnx.checker`` knows no schema
for the ``com.microsoft`` domain and skips the node); the expert weights are stored in
the operator's layout (``fc1 [E, f, d]``, ``fc2 [E, d, f]``; SwiGLU's fc1 ``[E, 2f, d]``
with gate and linear rows interleaved), ties between equal router probabilities may
break differently from PyTorch's argmax.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeify.config import Activation, Gate, RouterKind, Scoring
from moeify.errors import MoEError, Param
from moeify.switch.dispatch import Sizes
from moeify.switch.dispatchers import Dispatcher
from moeify.switch.layer import is_exporting
from moeify.switch.routing import Routing

MOE_OPS = ("static", "ort")
MOE_OP = Param("moe_op")  # ``moe_op='ort'`` in Python, ``--moe-op ort`` on the command line
# the reason of every layer when the static form is asked for (not shown in the metadata)
_ASKED = "the static form was asked for"
DOMAIN = "com.microsoft"
OP = f"{DOMAIN}.MoE"

# the operator's activation_type for an (activation, gated) expert
_ACTIVATION_TYPES = {
    (Activation.RELU, False): "relu",
    (Activation.GELU_TANH, False): "gelu",  # ORT: 0.5x(1 + tanh(0.79788(x + 0.044715x^3)))
    (Activation.SILU, False): "silu",
    (Activation.SILU, True): "swiglu",
}


def check_moe_op(moe_op: str) -> None:
    """Refuse an unknown ``moe_op`` before any work."""
    if moe_op not in MOE_OPS:
        raise MoEError("{moe_op!r} is not one of {ops}", moe_op=MOE_OP.given(moe_op),
                       ops=", ".join(MOE_OPS))


def unsupported(layer: nn.Module) -> str | None:
    """Why ``layer`` (a SwitchFFN declared for its group length) cannot be exported as
    the operator, or None when it can."""
    config, experts = layer.config, layer.experts
    if experts.w_in.dtype != torch.float32:  # bf16 / fp16 are widened for the export
        return (f"{str(experts.w_in.dtype).removeprefix('torch.')} experts: the operator "
                "computes in float32 (or float16)")
    if config.router == RouterKind.EXPERT_CHOICE:
        return "expert-choice routing (the operator routes tokens to experts)"
    if config.scoring == Scoring.SIGMOID:
        return "sigmoid scoring: the operator's scores are the softmax of the router logits"
    if config.bias_balancing:
        return ("a selection bias (bias balancing): the operator selects by the softmax of "
                "the router logits alone")
    if (experts.activation, experts.gated) not in _ACTIVATION_TYPES:
        if experts.activation == Activation.GELU and not experts.gated:
            return "exact (erf) GELU experts: the operator's gelu is the tanh approximation"
        kind = f"gated {experts.activation.value}" if experts.gated else experts.activation.value
        return f"{kind} experts: the operator's only gated form is SwiGLU (gated SiLU)"
    tokens = layer.tokens_per_group
    if config.top_k >= 2 and config.capacity(tokens, training=False) < tokens:
        return (f"top-{config.top_k} routing with capacity "
                f"{config.capacity(tokens, training=False)} < {tokens} tokens per group: one "
                "of a token's choices can drop without the others, which the operator "
                "cannot express")
    return None


@torch.library.custom_op("moeify::ort_moe", mutates_args=())
def ort_moe(x: Tensor, router_logits: Tensor, fc1: Tensor, fc1_bias: Optional[Tensor],
            fc2: Tensor, fc2_bias: Optional[Tensor], k: int, activation: str,
            normalize: bool) -> Tensor:
    """``com.microsoft.MoE`` in PyTorch: x ``[N, d]``, router_logits ``[N, E]`` ->
    ``[N, d]``, every token routed to its top-k experts by softmax probability.

    The eager body is the operator's reference (the export replaces the call by the
    node, see `translation_table`); tests compare it with ONNX Runtime's kernel.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, index = probs.topk(k, dim=-1)  # [N, k]
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    y = torch.zeros_like(x)
    for j in range(k):
        e = index[:, j]
        h = torch.einsum("nd,nfd->nf", x, fc1[e])
        if fc1_bias is not None:
            h = h + fc1_bias[e]
        if activation == "swiglu":
            h = F.silu(h[:, 0::2]) * h[:, 1::2]
        elif activation == "gelu":
            h = F.gelu(h, approximate="tanh")
        else:
            h = {"relu": F.relu, "silu": F.silu}[activation](h)
        out = torch.einsum("nf,ndf->nd", h, fc2[e])
        if fc2_bias is not None:
            out = out + fc2_bias[e]
        y = y + weights[:, j:j + 1].to(x.dtype) * out
    return y


@ort_moe.register_fake
def _(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k, activation, normalize):
    return torch.empty_like(x)


def _schema():
    from onnx.defs import OpSchema

    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attribute = OpSchema.Attribute
    return OpSchema(
        "MoE", DOMAIN, 1,
        inputs=[param("input", "T"), param("router_probs", "T"),
                param("fc1_experts_weights", "T"),
                param("fc1_experts_bias", "T", param_option=optional),
                param("fc2_experts_weights", "T"),
                param("fc2_experts_bias", "T", param_option=optional)],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float types")],
        attributes=[attribute("k", OpSchema.AttrType.INT, ""),
                    attribute("activation_type", OpSchema.AttrType.STRING, ""),
                    attribute("normalize_routing_weights", OpSchema.AttrType.INT, ""),
                    attribute("swiglu_fusion", OpSchema.AttrType.INT, ""),
                    attribute("activation_alpha", OpSchema.AttrType.FLOAT, ""),
                    attribute("activation_beta", OpSchema.AttrType.FLOAT, "")],
    )


@functools.cache
def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: `ort_moe` -> the node."""
    import onnxscript

    moe = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), "MoE", _schema())

    def translate(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k: int, activation: str,
                  normalize: bool):
        extra = {}
        if activation == "swiglu":  # interleaved gate/linear rows, silu(g) * l
            extra = {"swiglu_fusion": 1, "activation_alpha": 1.0, "activation_beta": 0.0}
        return moe(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k=k,
                   activation_type=activation, normalize_routing_weights=int(normalize),
                   **extra)

    return {torch.ops.moeify.ort_moe.default: translate}


class OrtDispatcher(Dispatcher):
    """The dispatcher of a layer exported with ``moe_op="ort"``: every token through its
    routed experts with the operator (the layer's expert weights copied into its layout,
    no capacity), then the capacity and padding applied as the ``kept`` mask.

    Outside an export (an eager forward inside `ort_experts`) it runs the layer's own
    dispatcher, ``fallback``.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        experts, config = layer.experts, layer.config
        self.fallback = layer.dispatcher
        self.activation = _ACTIVATION_TYPES[(experts.activation, experts.gated)]
        self.k = config.top_k
        self.normalize = config.gate == Gate.NORMALIZED or (
            config.top_k >= 2 and config.gate == Gate.SOFTMAX)
        scaling = config.routed_scaling  # folded into the output projections
        with torch.no_grad():
            w_in, b_in = experts.w_in.detach(), experts.b_in
            if experts.gated:  # rows 2i, 2i+1 = gate column i, linear column i
                w_in = torch.stack([experts.w_gate.detach(), w_in], dim=-1).flatten(-2)
                if b_in is not None:
                    b_in = torch.stack([experts.b_gate.detach(), b_in.detach()], -1).flatten(-2)
            self.register_buffer("fc1", w_in.transpose(1, 2).contiguous())  # [E, f, d]
            w_out, b_out = experts.w_out.detach(), experts.b_out
            if scaling != 1.0:
                w_out = w_out * scaling
                b_out = None if b_out is None else b_out.detach() * scaling
            self.register_buffer("fc2", w_out.transpose(1, 2).contiguous())  # [E, d, f]
            self.register_buffer("fc1_bias", None if b_in is None else b_in.detach().clone())
            self.register_buffer("fc2_bias", None if b_out is None else b_out.detach().clone())

    def forward(self, x: Tensor, routing: Routing, sizes: Sizes, experts: nn.Module, *,
                tracing: bool) -> tuple[Tensor, None]:
        if not is_exporting(x):
            return self.fallback(x, routing, sizes, experts, tracing=tracing)
        x_flat = x.flatten(0, 1)  # [G*T, d]
        router_logits = routing.router_logits.flatten(0, 1).to(x.dtype)  # [G*T, E]
        y = torch.ops.moeify.ort_moe(x_flat, router_logits, self.fc1, self.fc1_bias, self.fc2,
                                     self.fc2_bias, self.k, self.activation, self.normalize)
        y = y.unflatten(0, x.shape[:2])  # [G, T, d]
        if routing.valid is not None or sizes.expert_capacity < sizes.tokens_per_group:
            # top-1: the one choice; top-k reaches here only where nothing can drop
            y = y * routing.kept.any(dim=-1, keepdim=True).to(y.dtype)
        return y, None


@contextlib.contextmanager
def ort_experts(layers: list[tuple[str, nn.Module]], moe_op: str, *,
                refuse_none: bool = True) -> Iterator[dict[str, str]]:
    """Inside the block, each layer of ``layers`` (name, SwitchFFN; declared for the
    graph's group length) that the operator can express dispatches with an
    `OrtDispatcher`, so an export writes its experts as the operator; its own dispatcher
    is back afterwards. Yields ``{layer name: reason}`` for the layers that keep the
    static form (all of them for ``moe_op="static"``). With ``refuse_none``, ``"ort"`` is
    refused (`MoEError`, naming the reasons) when no layer can take the operator."""
    check_moe_op(moe_op)
    static = {name: _ASKED for name, _ in layers}
    swapped = []
    try:
        if moe_op == "ort":
            static = {}
            for name, layer in layers:
                reason = unsupported(layer)
                if reason is not None:
                    static[name] = reason
                    continue
                layer.dispatcher = OrtDispatcher(layer)
                swapped.append(layer)
            if refuse_none and layers and not swapped:
                refuse_static(static.values())
        yield static
    finally:
        for layer in swapped:
            layer.dispatcher = layer.dispatcher.fallback


def refuse_static(reasons) -> None:
    """The `MoEError` of ``moe_op="ort"`` where no expert layer can take the operator."""
    raise MoEError("{ort}: no expert layer can be written as {op} ({reasons}): export with "
                   "{static}", ort=MOE_OP.given("ort"), op=OP,
                   reasons="; ".join(sorted(set(reasons))), static=MOE_OP.given("static"))


def describe(layers: list[tuple[str, nn.Module]], static: dict[str, str]) -> str:
    """The ``moe_op`` metadata line: which layers use the operator, and why others not."""
    fused = len(layers) - len(static)
    reasons = "; ".join(sorted(set(static.values()) - {_ASKED}))
    if not fused:
        return f"static: {reasons}" if reasons else "static"
    line = f"{OP} in {fused} of {len(layers)} expert layers"
    return line + (f"; static elsewhere: {reasons}" if reasons else "")
