"""`quantize_graph`: weight-only int4 / int8 quantization of an exported graph with ONNX
Runtime's own ``com.microsoft.MatMulNBits``.

Weights are quantized in blocks of ``block_size`` along the input axis (K), each block
with a float32 scale and a zero point (asymmetric: a block's range need not be centred on
0, which keeps int4 closer to the float weights). The packing is ONNX Runtime's
(``DefaultWeightOnlyQuantizer.qbits_block_quant``, its C++ kernels); the nodes are built
here, because MatMulNBits takes a 2-D constant weight and an expert layer's weights are
3-D ``[E, K, N]`` for one batched MatMul over ``[E, C x batch, K]`` buffers. Each expert
MatMul becomes::

    Split(axis 0, E pieces [1, C x batch, K]) -> E x MatMulNBits (weight e: [K, N])
        -> Concat(axis 0) -> [E, C x batch, N]

MatMulNBits takes an activation of any rank, so no Squeeze / Unsqueeze is needed; the
expert biases (``[E, 1, N]`` Adds), the activation and the routing around are untouched.

Both widths use MatMulNBits (``bits=4`` or ``bits=8``) with ``accuracy_level=4``: the
CPU provider of ONNX Runtime 1.32 then quantizes the activations to int8 per block at run
time and multiplies them with the packed weights in integer arithmetic, its fastest path.
On all-MiniLM-L6-v2 with 8 experts (seq 128, 2 threads) both widths ran about as fast as
the float32 graph at batch 1 or faster, where 8-bit MatMulNBits with float activations
(``accuracy_level`` unset) ran slower than float32. The alternatives are worse fits:
dynamic quantization (``MatMulInteger``) quantizes a whole ``[E, C x batch, K]`` buffer
with one scale, and DequantizeLinear + MatMul dequantizes every weight on every run.

Scope: ``experts`` quantizes the expert weights only; ``all`` also every other MatMul or
Gemm with a constant 2-D weight (attention projections, dense FFNs, an LM head). The
**routers stay float32 always**: a router's logits decide which expert (and which
capacity slot) a token gets, a small change near a tie moves a token to another expert,
and the router is ``d x E`` weights, nothing to save. Embedding tables (Gather) and
weights fused into an ``Attention`` by `moeify.onnx.optimize_graph` are not MatMuls and
stay float32; quantize before optimizing to have the projections quantized instead (the
attention fusion then leaves those blocks, as it matches float MatMuls only).

The routing subgraph and the router weights are checked unchanged afterwards
(`moeify.onnx.optimize.check_expert_subgraph`). The output keeps the input's
``metadata_props`` and adds ``quantized``; it is written atomically, checked with
``onnx.checker``, and an existing ``dst`` is replaced only with ``force``; weights that
were external data stay external (``<dst>.data``), as does a result over 2 GB.

Accuracy on all-MiniLM-L6-v2 with 8 experts, sentence embeddings (mean pooled, L2
normalized) of `SENTENCES` against the float32 graph: int4 experts (block 32) keep a
cosine similarity >= 0.99 for every sentence, int8 >= 0.999 (the tests check both).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moeify.errors import MoEError, Param
from moeify.onnx.external_data import EXTERNAL_DATA_BYTES, has_external_data
from moeify.onnx.optimize import (
    MS_DOMAIN,
    check_destination,
    check_expert_subgraph,
    ensure_ms_opset,
    find_expert_subgraph,
    load_graph,
    metadata,
    prune,
    tensor_bytes,
    weight_bytes,
    write_graph,
)

BITS = (4, 8)
SCOPES = ("experts", "all")
ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations on CPU

# Sixteen varied English sentences: the fixed probe on which the tests and
# benchmarks/bench_onnx.py compare a quantized graph's sentence embeddings with float32's.
SENTENCES = (
    "The cat sat quietly on the warm windowsill all afternoon.",
    "Quarterly revenue rose by twelve percent despite weaker demand in Europe.",
    "How do I reset my password if I no longer have access to my email?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The orchestra played Beethoven's ninth symphony to a sold-out hall.",
    "Add two cups of flour and stir until the batter is smooth.",
    "The defendant pleaded not guilty to all charges on Monday.",
    "Heavy rain is expected across the northern coast tomorrow night.",
    "She scored the winning goal in the final minute of extra time.",
    "Quantum computers use qubits that can exist in superpositions of states.",
    "Please remember to water the tomatoes before you leave for the weekend.",
    "The museum's new exhibit explores the history of ancient Egyptian medicine.",
    "Interest rates were left unchanged at the central bank's latest meeting.",
    "My flight was delayed by three hours because of a mechanical problem.",
    "Regular exercise can lower blood pressure and improve sleep quality.",
    "The old lighthouse has guided ships safely into the harbor for a century.",
)


def check_quantize_args(bits: Any, scope: Any, block_size: Any) -> None:
    """Refuse a width, scope or block size MatMulNBits cannot take, before any work."""
    if bits not in BITS or isinstance(bits, bool):
        raise MoEError(f"bits must be 4 or 8 (MatMulNBits weights), got {bits!r}")
    if scope not in SCOPES:
        raise MoEError(f"scope must be 'experts' or 'all', got {scope!r}")
    if not (isinstance(block_size, int) and not isinstance(block_size, bool)
            and block_size >= 16 and block_size & (block_size - 1) == 0):
        raise MoEError(f"block_size must be a power of 2 >= 16 (MatMulNBits blocks), got "
                       f"{block_size!r}")


class _Packer:
    """Block-quantizes weights into MatMulNBits initializers, each weight once (a weight
    two MatMuls share is packed once and read by both)."""

    def __init__(self, bits: int, block_size: int) -> None:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )

        self.bits, self.block_size = bits, block_size
        self.quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=False, bits=bits))
        self.packed: dict[str, tuple[list[str], dict[str, int]]] = {}
        self.tensors: list[onnx.TensorProto] = []
        self.expert_bytes = 0  # of the packed expert weights, scales and zero points

    def matmul(self, activation: str, weight: np.ndarray, key: str, output: str,
               bias: str | None = None) -> onnx.NodeProto:
        """MatMulNBits(``activation``, ``weight`` [K, N] packed under the name ``key``)
        (+ ``bias`` [N]) -> ``output``."""
        if key not in self.packed:
            packed, scales, zero_points = self.quantizer.qbits_block_quant(
                np.ascontiguousarray(weight, dtype=np.float32))
            tensors = [numpy_helper.from_array(packed, f"{key}.q{self.bits}"),
                       numpy_helper.from_array(scales, f"{key}.scales"),
                       numpy_helper.from_array(zero_points, f"{key}.zero_points")]
            self.tensors += tensors
            K, N = weight.shape
            self.packed[key] = ([t.name for t in tensors],
                                {"K": K, "N": N, "bits": self.bits, "block_size": self.block_size,
                                 "accuracy_level": ACCURACY_LEVEL})
        names, attributes = self.packed[key]
        inputs = [activation, *names, *(["", bias] if bias is not None else [])]  # no g_idx
        return helper.make_node("MatMulNBits", inputs, [output], name=f"{output}.MatMulNBits",
                                domain=MS_DOMAIN, **attributes)

    def experts(self, node: onnx.NodeProto, weight: np.ndarray) -> list[onnx.NodeProto]:
        """One batched expert MatMul (``weight`` [E, K, N]) as Split -> E MatMulNBits ->
        Concat, computing the same [E, rows, N] output."""
        E = weight.shape[0]
        name, output = node.input[1], node.output[0]
        packed = len(self.tensors)
        pieces = [f"{output}.input{e}" for e in range(E)]
        outputs = [f"{output}.expert{e}" for e in range(E)]
        matmuls = [self.matmul(pieces[e], weight[e], f"{name}.expert{e}", outputs[e])
                   for e in range(E)]
        self.expert_bytes += sum(tensor_bytes(t) for t in self.tensors[packed:])
        return [
            helper.make_node("Split", [node.input[0]], pieces, name=f"{output}.Split", axis=0,
                             num_outputs=E),
            *matmuls,
            helper.make_node("Concat", outputs, [output], name=f"{output}.Concat", axis=0),
        ]


def _gemm_weight(node: onnx.NodeProto, constants: dict[str, np.ndarray],
                 initializers: dict[str, onnx.TensorProto],
                 ) -> tuple[np.ndarray, str | None] | None:
    """A Gemm as MatMul(A, W) + bias: (W [K, N], the bias's name or None), or None when it
    is not one (transposed A, alpha / beta other than 1, a non-constant or non-vector C)."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 \
            or attributes.get("beta", 1.0) != 1.0 or node.input[1] not in constants:
        return None
    weight = constants[node.input[1]]
    weight = weight.T if attributes.get("transB", 0) else weight
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and (bias not in initializers
                             or list(initializers[bias].dims) != [weight.shape[1]]):
        return None
    return weight, bias


def quantize_graph(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    bits: int = 4,
    scope: str = "experts",
    block_size: int = 32,
    force: bool = False,
) -> dict[str, Any]:
    """Quantize the weights of the exported graph ``src`` into ``dst`` (see the module docs).

    ``bits``: 4 or 8; ``scope``: ``experts`` or ``all``; ``block_size``: weights per
    scale along K (a power of 2 >= 16). Returns a report: ``bits``, ``block_size``,
    ``scope``, ``nodes_quantized`` (MatMulNBits nodes written), ``expert_bytes_before`` /
    ``_after`` (the expert MatMul weights; packed weights, scales and zero points after),
    ``expert_ratio``, ``weight_bytes_before`` / ``_after`` (every initializer),
    ``weight_ratio``. Refused with a `MoEError`: other bits, scopes or block sizes, a graph
    already quantized, one with an expert-parallel plan (``shard_experts``), scope
    ``experts`` on a graph without experts, and an existing ``dst`` without ``force``.
    """
    check_quantize_args(bits, scope, block_size)
    dst = check_destination(src, dst, force)
    model = load_graph(src)
    info = metadata(model)
    if "quantized" in info:
        raise MoEError(f"{src} is quantized already ({info['quantized']}): quantize the "
                       "float32 export")
    if "shard_experts" in info:
        raise MoEError("{src} carries an expert-parallel plan, which does not describe the "
                       "per-expert MatMulNBits that quantization writes: quantize an export "
                       "made without {shard_experts}", src=src,
                       shard_experts=Param("shard_experts"))
    before = find_expert_subgraph(model)
    if scope == "experts" and not before.experts:
        raise MoEError("{src} has no expert weights (a dense graph): quantize with scope "
                       "'all' ({quantize_all}) or export a converted model", src=src,
                       quantize_all=Param("quantize_all").given(True))
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    routers = {w.name for w in before.routers}
    experts = {w.name for w in before.experts}
    constants = {name: numpy_helper.to_array(t) for name, t in initializers.items()
                 if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) in (2, 3)
                 and name not in routers and (scope == "all" or name in experts)}
    bytes_before = weight_bytes(model)
    expert_before = sum(tensor_bytes(initializers[name]) for name in experts)

    packer = _Packer(bits, block_size)
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        weight = constants.get(node.input[1]) if len(node.input) > 1 else None
        gemm = _gemm_weight(node, constants, initializers) if node.op_type == "Gemm" else None
        if node.op_type == "MatMul" and node.input[1] in experts:
            nodes += packer.experts(node, weight)
        elif node.op_type == "MatMul" and weight is not None and weight.ndim == 2:
            nodes.append(packer.matmul(node.input[0], weight, node.input[1], node.output[0]))
        elif gemm is not None:
            nodes.append(packer.matmul(node.input[0], gemm[0], node.input[1], node.output[0],
                                       bias=gemm[1]))
        else:
            nodes.append(node)
    quantized = sum(n.op_type == "MatMulNBits" for n in nodes)
    expert_after = packer.expert_bytes
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(packer.tensors)
    ensure_ms_opset(model)
    prune(graph)
    after = find_expert_subgraph(model)
    check_expert_subgraph(before, after, what="quantization", expert_weights=False)
    if after.experts:
        raise MoEError(f"quantization left expert weights in float32 "
                       f"({', '.join(w.name for w in after.experts)}); nothing was written")

    bytes_after = weight_bytes(model)
    what = "experts" if scope == "experts" else "experts and every other linear weight"
    info["quantized"] = (f"int{bits} weight-only (com.microsoft.MatMulNBits, block {block_size}, "
                         f"asymmetric, accuracy_level {ACCURACY_LEVEL}): {what}, {quantized} "
                         "MatMuls; routers float32")
    del model.metadata_props[:]
    for key, value in info.items():
        model.metadata_props.add(key=key, value=value)
    external = has_external_data(src) or bytes_after > EXTERNAL_DATA_BYTES
    write_graph(model, dst, force=force, external_data=external, what="the quantized graph")
    return {
        "bits": bits,
        "block_size": block_size,
        "scope": scope,
        "nodes_quantized": quantized,
        "expert_bytes_before": expert_before,
        "expert_bytes_after": expert_after,
        "expert_ratio": expert_after / expert_before if expert_before else None,
        "weight_bytes_before": bytes_before,
        "weight_bytes_after": bytes_after,
        "weight_ratio": bytes_after / bytes_before,
    }
