"""`optimize_graph`: ONNX Runtime's transformer fusions on an exported graph, with the
static-capacity expert subgraph left exactly as it was.

What runs, in order:

1. ONNX Runtime's Python fusions (``onnxruntime.transformers.optimizer.optimize_model``)
   for the model type: ``bert`` (encoder-only graphs), ``gpt2`` (decoder-only), ``t5``
   (encoder-decoder); by default the type follows the graph's ``inputs`` metadata.
   They run with ``opt_level=0``: no InferenceSession optimizes the graph before the
   fusions and saves it. Level 1 would only fold what every session folds again when it
   loads the graph, and levels 2 and 99 save kernels of the provider that optimized it
   (NCHWc layouts, CPU-only fused ops). The written graph holds standard ops and
   ``com.microsoft`` contrib ops that the CPU and CUDA providers both run; each session
   still applies its own provider's optimizations when it loads it.
2. For ``bert``: moeify's attention fusion (`find_attention_sites`, `fuse_attention`),
   which replaces each self-attention block by one ``com.microsoft.Attention`` (Q, K
   and V projections packed into one weight), because ORT's does not match what the
   dynamo exporter writes (table below).
3. `check_expert_subgraph`: the routing ops (ArgMax / TopK, CumSum, ScatterElements,
   GatherElements), the routers (float32 ``[d, E]`` weights, same bytes) and the expert
   MatMuls with their ``[E, ...]`` weights and biases are as they were, or nothing is
   written. The fusions leave them alone by construction (they match attention,
   normalization and activations; an expert's activation may become a ``Gelu``, which
   computes the same function); the check makes that a guarantee.

What matches a graph from ``torch.onnx.export(dynamo=True)`` (torch 2.13, transformers
5, onnxruntime 1.32); counts for all-MiniLM-L6-v2 with 8 experts (6 layers, 3 Switch):

- SkipLayerNormalization (12, 9 of them taking the bias Add before it): yes, the
  residual ``Add`` + ``LayerNormalization``.
- Gelu (3) and BiasGelu (3): yes, the erf GELU. An expert's bias is ``[E, 1, f]``,
  which BiasGelu does not take, so the experts' activations become plain Gelu nodes.
- ORT's Attention / MultiHeadAttention: no. The exporter writes SDPA with a NaN guard
  (``Where(IsNaN(p), 0, p)``) between the Softmax and the MatMul with V, scales Q and K
  each by a ``Mul`` with a folded constant, and transposes K by Reshape-Transpose-
  Reshape; ORT's patterns expect the Softmax to feed the MatMul and Div or
  Mul(Sqrt(...)) scores.
- moeify's Attention (6): matches exactly that form (`find_attention_sites`).
- EmbedLayerNormalization: no; not pursued (the embeddings are ~1% of the time).
- ``gpt2`` (tiny GPT-2): SkipLayerNormalization and FastGelu (the tanh GELU, experts'
  included) match, and ORT rewrites each Gemm as MatMul + Add; ``t5`` and RMSNorm
  decoders: SimplifiedLayerNormalization and SkipSimplifiedLayerNormalization match.

The time goes to MatMuls, most of it to the experts' (which stay as they are), so the
fusions shorten the rest: attention, normalization and activations.

Parity: the fusions reorder float32 arithmetic only; outputs agree with the unoptimized
graph within 1e-4 (max abs), unless a router's top choice for some token is a near tie
that the reordering flips (then that token's output differs; the tests pick inputs
without such ties). The fused Attention gives a fully masked row (a sequence whose
attention mask is all 0) the same output as the graph does, because the exporter's mask
is finite (``float32`` lowest, not ``-inf``): sites whose mask may hold ``-inf`` are
not fused (the graph's NaN guard would then give 0 where Attention gives NaN).

The output keeps the input's ``metadata_props`` and adds ``optimized`` (the fusions
applied). Written like `moeify.export_onnx` writes: staged beside ``dst`` and moved into
place when complete (`moeify.io.files.atomic_file`), checked with ``onnx.checker`` first; an
existing ``dst`` is replaced only with ``force``. A graph whose weights are external data
is optimized in memory and written with its weights in ``<dst>.data``; one over 2 GB of
weights is refused (ORT's fusions run ONNX shape inference, which serializes the whole
graph, and protobuf stops at 2 GB).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moeify.errors import MoEError, Param
from moeify.io.files import atomic_file, check_output, refuse_existing
from moeify.onnx.external_data import EXTERNAL_DATA_BYTES, has_external_data
from moeify.onnx.sharding import check_sharding

# model type -> the exported graph it is for (its ``inputs`` metadata)
MODEL_TYPES = {
    "bert": "input_ids,attention_mask",
    "gpt2": "input_ids",
    "t5": "input_ids,attention_mask,decoder_input_ids",
}
MS_DOMAIN = "com.microsoft"
# the destination messages name: ``dst`` in Python; on the command line the export's ``--onnx``
DST = Param("dst", "--onnx")
ROUTING_OPS = ("ArgMax", "TopK", "CumSum", "ScatterElements", "GatherElements")


# --- reading and writing graphs ------------------------------------------------------------


def load_graph(src: str | os.PathLike) -> onnx.ModelProto:
    """The graph at ``src`` with its external data (if any) in memory; a `MoEError` when
    there is no file or it is not an ONNX graph."""
    src = Path(src)
    if not src.is_file():
        raise MoEError(f"{src} is not a file: pass the .onnx file moeify export wrote")
    try:
        return onnx.load(str(src))
    except Exception as error:  # noqa: BLE001 - DecodeError, FileNotFoundError of data, ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise MoEError(f"cannot read {src} as an ONNX graph ({type(error).__name__}: {first}); "
                       "pass the .onnx file moeify export wrote, with its .data beside it"
                       ) from error


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the graph's initializers (all of them: weights, biases, constants)."""
    return sum(tensor_bytes(t) for t in model.graph.initializer)


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes of a tensor's data (inline or external)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return int(next((e.value for e in tensor.external_data if e.key == "length"), 0))
    if tensor.raw_data:
        return len(tensor.raw_data)
    return numpy_helper.to_array(tensor).nbytes


def check_destination(src: str | os.PathLike, dst: str | os.PathLike, force: bool) -> Path:
    """Refuse ``dst`` before any work: the input itself, an existing file without
    ``force``, a directory that cannot be written."""
    dst = Path(dst)
    check_output(dst, inputs=[src], force=force, what=DST)
    if not force:
        refuse_existing(dst, what=DST)
    return dst


def write_graph(model: onnx.ModelProto, dst: Path, *, force: bool, external_data: bool,
                what: str) -> None:
    """Write ``model`` to ``dst`` atomically (weights in ``<dst>.data`` when
    ``external_data``), after ``onnx.checker.check_model(full_check=True)`` on the staged
    file; ``what`` names the graph in the checker's error ("the quantized graph")."""
    with atomic_file(dst, force=force, need=weight_bytes(model), what=DST) as tmp:
        staged = Path(tmp) / dst.name
        if external_data:
            onnx.save_model(model, str(staged), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=f"{dst.name}.data",
                            size_threshold=1024)
        else:
            onnx.save_model(model, str(staged))
        try:
            if ORT_ONLY_OPS & {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}:
                _check_in_onnx_runtime(staged)
            else:
                onnx.checker.check_model(str(staged), full_check=True)
        except Exception as error:  # noqa: BLE001 - ValidationError, InferenceError, ...
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise MoEError(f"{what} does not pass onnx.checker ({type(error).__name__}: "
                           f"{first}); nothing was written (MOEIFY_DEBUG=1 shows the "
                           "details)") from error


# Ops ONNX Runtime's optimizer writes in the default domain that only ONNX Runtime
# registers (its RMSNorm fusion for T5 and Llama): onnx.checker knows no schema for them,
# so a graph holding them is checked by loading it into an ONNX Runtime session instead.
ORT_ONLY_OPS = {"SimplifiedLayerNormalization"}


def _check_in_onnx_runtime(path: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ensure_ms_opset(model: onnx.ModelProto) -> None:
    """Declare the ``com.microsoft`` domain, which the contrib ops need (the checker skips
    ops of a declared domain it has no schemas for, and refuses undeclared ones)."""
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def prune(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is used (transitively) and initializers no node
    reads; graph inputs and outputs stay."""
    live = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if not any(out in live for out in node.output):
            continue
        kept.append(node)
        live.update(node.input)
        for attribute in node.attribute:
            for sub in [attribute.g, *attribute.graphs]:
                live.update(name for n in sub.node for name in n.input)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    used = [t for t in graph.initializer if t.name in live]
    del graph.initializer[:]
    graph.initializer.extend(used)


@contextlib.contextmanager
def quiet_logging():
    """ONNX Runtime's transformer optimizer logs through the logging module (a warning
    about the producer name, every fusion's count); silenced unless ``MOEIFY_DEBUG=1``."""
    if os.environ.get("MOEIFY_DEBUG"):
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


# --- the static-capacity expert subgraph ---------------------------------------------------


@dataclass(frozen=True)
class Weight:
    """An initializer as the check compares it: name, shape, ONNX dtype, sha1 of its bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: int
    digest: str


@dataclass(frozen=True)
class ExpertSubgraph:
    """What `check_expert_subgraph` keeps: the static-capacity routing and the experts.

    routing: (op type, count) for the routing ops (`ROUTING_OPS`).
    routers: the router weights ``[d, E]``: MatMuls whose output feeds a Softmax that
        feeds an ArgMax or TopK.
    experts: the expert weights ``[E, in, out]`` of batched MatMuls (input 1).
    expert_biases: the expert biases, ``[E, 1, out]`` initializers of Adds.
    num_experts: E, from the graph's metadata (0 for a dense graph).
    """

    routing: tuple[tuple[str, int], ...]
    routers: tuple[Weight, ...]
    experts: tuple[Weight, ...]
    expert_biases: tuple[Weight, ...]
    num_experts: int


def _weight(tensor: onnx.TensorProto) -> Weight:
    data = tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
    return Weight(tensor.name, tuple(tensor.dims), tensor.data_type,
                  hashlib.sha1(data).hexdigest())


def find_expert_subgraph(model: onnx.ModelProto) -> ExpertSubgraph:
    """The routing ops, routers and experts of ``model`` (see `ExpertSubgraph`)."""
    graph = model.graph
    num_experts = int(metadata(model).get("num_experts", 0))
    initializers = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    counts = collections.Counter(n.op_type for n in graph.node if n.op_type in ROUTING_OPS)
    routers: dict[str, Weight] = {}
    for node in graph.node:
        if node.op_type not in ("ArgMax", "TopK"):
            continue
        softmax = producer.get(node.input[0])
        matmul = producer.get(softmax.input[0]) if softmax is not None else None
        if (softmax is not None and softmax.op_type == "Softmax" and matmul is not None
                and matmul.op_type == "MatMul" and matmul.input[1] in initializers):
            tensor = initializers[matmul.input[1]]
            if len(tensor.dims) == 2 and tensor.dims[1] == num_experts:
                routers[tensor.name] = _weight(tensor)
    experts: dict[str, Weight] = {}
    biases: dict[str, Weight] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            tensor = initializers.get(name)
            if not num_experts or tensor is None or len(tensor.dims) != 3 \
                    or tensor.dims[0] != num_experts or name in experts or name in biases:
                continue
            if node.op_type == "MatMul" and position == 1:
                experts[name] = _weight(tensor)
            elif node.op_type == "Add" and tensor.dims[1] == 1:
                biases[name] = _weight(tensor)
    return ExpertSubgraph(
        routing=tuple(sorted(counts.items())),
        routers=tuple(sorted(routers.values(), key=lambda w: w.name)),
        experts=tuple(sorted(experts.values(), key=lambda w: w.name)),
        expert_biases=tuple(sorted(biases.values(), key=lambda w: w.name)),
        num_experts=num_experts,
    )


def check_expert_subgraph(before: ExpertSubgraph, after: ExpertSubgraph, *, what: str,
                          expert_weights: bool = True) -> None:
    """Raise `MoEError` unless ``after`` has the routing ops, routers and expert biases of
    ``before`` (and, with ``expert_weights``, its expert MatMul weights) unchanged;
    ``what`` names the step ("the optimizer")."""
    parts = [("routing ops", before.routing, after.routing),
             ("router weights", before.routers, after.routers),
             ("expert biases", before.expert_biases, after.expert_biases)]
    if expert_weights:
        parts.append(("expert MatMul weights", before.experts, after.experts))
    for label, old, new in parts:
        if old != new:
            changed = sorted({item.name if isinstance(item, Weight) else item[0]
                              for item in set(old) ^ set(new)})
            raise MoEError(f"{what} changed the static-capacity expert subgraph ({label}: "
                           f"{', '.join(changed[:4])}); nothing was written")


# --- attention fusion for dynamo-exported encoders -----------------------------------------


@dataclass(frozen=True)
class AttentionSite:
    """One self-attention block as `find_attention_sites` matched it.

    input: [B, S, D_in], the input the Q, K and V projections share.
    weights, biases: the three projections' initializers (q, k, v), [D_in, D] and [D].
    mask: the additive mask [B or 1, 1 or N, S, S] added to the scores, or None.
    num_heads, scale: N (D = N * H) and the factor on Q K^T (the two Muls' product).
    output: [B, S, D], the heads merged (the Reshape after the last Transpose).
    """

    input: str
    weights: tuple[str, str, str]
    biases: tuple[str, str, str]
    mask: str | None
    num_heads: int
    scale: float
    output: str


@dataclass(frozen=True)
class _Projection:
    input: str
    weight: str
    bias: str
    num_heads: int
    head_size: int


class _Index:
    """Producers, consumers and constants of a graph, for matching (reads only)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            value = next((a for a in node.attribute if a.name == "value"), None)
            return numpy_helper.to_array(value.t) if value is not None else None
        return None

    def node(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_consumer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) != 1 or users[0].op_type != op_type or name in self.outputs:
            return None
        return users[0]


def _attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def _perm(node: onnx.NodeProto | None) -> list[int] | None:
    return None if node is None else list(_attribute(node, "perm", []))


def _projection(index: _Index, heads: str) -> _Projection | str:
    """``heads`` [B, N, S, H] as Transpose(0, 2, 1, 3) <- Reshape([*, S, N, H]) <-
    Add(bias) <- MatMul(x, W): the projection, or why not."""
    transpose = index.node(heads, "Transpose")
    if _perm(transpose) != [0, 2, 1, 3]:
        return "heads are not a Transpose(0, 2, 1, 3)"
    reshape = index.node(transpose.input[0], "Reshape")
    shape = index.const(reshape.input[1]) if reshape is not None else None
    if shape is None or shape.shape != (4,) or min(shape[2:]) < 1:
        return "heads are not split by a Reshape to a constant [B, S, N, H]"
    add = index.node(reshape.input[0], "Add")
    if add is None:
        return "a projection has no bias Add"
    for matmul_input, bias in (add.input, reversed(add.input)):
        matmul = index.node(matmul_input, "MatMul")
        bias_value = index.const(bias)
        weight = index.const(matmul.input[1]) if matmul is not None else None
        if matmul is not None and bias_value is not None and bias_value.ndim == 1 \
                and weight is not None and weight.ndim == 2 and bias in index.initializers \
                and matmul.input[1] in index.initializers:
            if weight.shape[1] != shape[2] * shape[3] or bias_value.shape[0] != weight.shape[1]:
                return "a projection's width is not N x H"
            return _Projection(matmul.input[0], matmul.input[1], bias, int(shape[2]),
                               int(shape[3]))
    return "a projection is not MatMul(x, W) + b with constant W [D_in, D] and b [D]"


def _scaled(index: _Index, name: str) -> tuple[str, float]:
    """``name`` as Mul(x, scalar constant): (x, scalar); otherwise (name, 1.0)."""
    mul = index.node(name, "Mul")
    if mul is not None:
        for x, factor in (mul.input, reversed(mul.input)):
            value = index.const(factor)
            if value is not None and value.size == 1:
                return x, float(value.reshape(()))
    return name, 1.0


def _shape_parts(index: _Index, name: str, of: str) -> list | None:
    """A Concat of constants and Slices of Shape(``of``) (rank 4) as a list of ints (the
    constants) and (start, end) ranges of ``of``'s axes; None for anything else."""
    concat = index.node(name, "Concat")
    if concat is None:
        return None
    parts: list = []
    for item in concat.input:
        value = index.const(item)
        if value is not None:
            parts.extend(int(v) for v in value.reshape(-1))
            continue
        piece = index.node(item, "Slice")
        shape = index.node(piece.input[0], "Shape") if piece is not None else None
        if shape is None or shape.input[0] != of or _attribute(shape, "start", 0) != 0 \
                or _attribute(shape, "end") is not None or len(piece.input) > 3:
            return None
        bounds = [index.const(x) for x in piece.input[1:3]]
        if any(b is None or b.size != 1 for b in bounds):
            return None
        parts.append(tuple(_axis(int(b.reshape(()))) for b in bounds))
    return parts


def _axis(bound: int, rank: int = 4) -> int:
    """A Slice bound on a rank-``rank`` shape as an index in [0, rank] (ONNX clamps)."""
    return min(max(bound + rank if bound < 0 else bound, 0), rank)


def _keys_transposed(index: _Index, name: str) -> str | None:
    """The [B, N, S, H] heads whose last two axes ``name`` swaps, or None. Two forms: a
    Transpose(0, 1, 3, 2), and the exporter's Reshape([-1, S, H]) -> Transpose(0, 2, 1)
    -> Reshape([B, N, H, S]) with both shapes read from Shape(heads)."""
    transpose = index.node(name, "Transpose")
    if transpose is not None:
        return transpose.input[0] if _perm(transpose) == [0, 1, 3, 2] else None
    last = index.node(name, "Reshape")
    middle = index.node(last.input[0], "Transpose") if last is not None else None
    first = index.node(middle.input[0], "Reshape") if middle is not None else None
    if first is None or _perm(middle) != [0, 2, 1]:
        return None
    heads = first.input[0]
    if _shape_parts(index, first.input[1], heads) != [-1, (2, 3), (3, 4)]:
        return None
    if _shape_parts(index, last.input[1], heads) != [(0, 2), (3, 4), (2, 3)]:
        return None
    return heads


def _finite_mask(index: _Index, mask: str) -> bool:
    """Whether ``mask`` has only finite values: a finite constant, or Where(condition,
    a, b) of two finite constants (the exporter's boolean-mask form)."""
    value = index.const(mask)
    if value is not None:
        return bool(np.isfinite(value).all())
    where = index.node(mask, "Where")
    if where is None:
        return False
    branches = [index.const(x) for x in where.input[1:]]
    return all(b is not None and np.isfinite(b).all() for b in branches)


def value_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """The rank of every value ONNX shape inference can tell, run on a copy that declares
    the large weights as graph inputs instead of holding their bytes (shapes are all it
    needs from them; small constants stay, for Reshape targets). It cannot see through
    contrib ops, so it runs on the graph before ORT's fusions (which keep value names)."""
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    graph = light.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    for tensor in model.graph.initializer:
        if tensor_bytes(tensor) <= 4096:
            graph.initializer.append(tensor)
        else:
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                             list(tensor.dims)))
    inferred = onnx.shape_inference.infer_shapes(light)
    return {info.name: len(info.type.tensor_type.shape.dim)
            for info in [*inferred.graph.value_info, *inferred.graph.input]
            if info.type.tensor_type.HasField("shape")}


def _match_attention(index: _Index, softmax: onnx.NodeProto,
                     ranks: dict[str, int]) -> AttentionSite | str:
    if _attribute(softmax, "axis", -1) not in (-1, 3):
        return "the Softmax is not over the last axis"
    probs = softmax.output[0]
    users = index.consumers.get(probs, [])
    if sorted(u.op_type for u in users) == ["IsNaN", "Where"]:
        isnan, where = sorted(users, key=lambda u: u.op_type)
        zero = index.const(where.input[1])
        if where.input[0] != isnan.output[0] or where.input[2] != probs \
                or zero is None or zero.any():
            return "the Softmax's NaN guard is not Where(IsNaN(p), 0, p)"
        probs = where.output[0]
    context = index.only_consumer(probs, "MatMul")
    if context is None or context.input[0] != probs:
        return "the probabilities do not feed one MatMul with V"
    merge = index.only_consumer(context.output[0], "Transpose")
    output = index.only_consumer(merge.output[0], "Reshape") if merge is not None else None
    if output is None or _perm(merge) != [0, 2, 1, 3]:
        return "the heads are not merged by Transpose(0, 2, 1, 3) and a Reshape"
    scores, mask = softmax.input[0], None
    add = index.node(scores, "Add")
    if add is not None:
        first, second = add.input
        scores, mask = first, second
        if index.node(first, "MatMul") is None:
            scores, mask = second, first
    qk = index.node(scores, "MatMul")
    if qk is None:
        return "the Softmax's input is not Q K^T (+ mask)"
    query, q_scale = _scaled(index, qk.input[0])
    keys_t, k_scale = _scaled(index, qk.input[1])
    keys = _keys_transposed(index, keys_t)
    if keys is None:
        return "K^T is neither a Transpose(0, 1, 3, 2) nor the exporter's Reshape-Transpose-Reshape"
    projections = [_projection(index, heads) for heads in (query, keys, context.input[1])]
    for name, found in zip("QKV", projections):
        if isinstance(found, str):
            return f"{name}: {found}"
    q, k, v = projections
    if not (q.input == k.input == v.input):
        return "Q, K and V are projections of different inputs (not self-attention)"
    if ranks.get(q.input) != 3:
        return "the projections' input is not known to be 3-D [B, S, D]"
    if len({(p.num_heads, p.head_size) for p in projections}) != 1:
        return "Q, K and V split into different heads"
    width = index.const(output.input[1])
    if width is None or width.shape != (3,) or width[2] != q.num_heads * q.head_size:
        return "the merged heads are not reshaped to a constant [B, S, N x H]"
    if mask is not None:
        if ranks.get(mask) != 4:
            return "the mask is not 4-D [B, 1, S, S]"
        if not _finite_mask(index, mask):
            return "the mask may hold -inf (fully masked rows would differ)"
    return AttentionSite(
        input=q.input, weights=(q.weight, k.weight, v.weight), biases=(q.bias, k.bias, v.bias),
        mask=mask, num_heads=q.num_heads, scale=q_scale * k_scale, output=output.output[0],
    )


def find_attention_sites(model: onnx.ModelProto, ranks: dict[str, int] | None = None,
                         ) -> tuple[list[AttentionSite], list[str]]:
    """Every self-attention block of a dynamo-exported encoder that `fuse_attention` can
    replace, and for each Softmax that is not one, why (the reasons). Reads only.

    Matched, from the Softmax (axis -1) outward: scores ``MatMul(Mul(q, s1), Mul(k^T,
    s2)) (+ mask)``; an optional NaN guard ``Where(IsNaN(p), 0, p)``; ``MatMul(p, v)``,
    ``Transpose(0, 2, 1, 3)`` and a Reshape to ``[B, S, D]``; q, k and v each
    ``Transpose(0, 2, 1, 3)(Reshape(MatMul(x, W) + b))`` of one input ``x``; k^T as a
    Transpose or as the exporter's Reshape-Transpose-Reshape; a 3-D ``x``; a finite 4-D
    mask. A Softmax that feeds an ArgMax or TopK is a router's and is not considered.
    ``ranks``: `value_ranks` of the graph before ORT's fusions (computed from ``model``
    when None).
    """
    index = _Index(model)
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax" and not any(
        user.op_type in ("ArgMax", "TopK") for user in index.consumers[n.output[0]])]
    if ranks is None:
        ranks = value_ranks(model) if softmaxes else {}
    sites, reasons = [], []
    for softmax in softmaxes:
        found = _match_attention(index, softmax, ranks)
        if isinstance(found, str):
            reasons.append(f"{softmax.name}: {found}")
        else:
            sites.append(found)
    return sites, reasons


def fuse_attention(model: onnx.ModelProto, sites: list[AttentionSite]) -> int:
    """Replace each site by one ``com.microsoft.Attention`` (Q, K, V weights and biases
    packed along the output axis; the mask as its ``attention_bias``), then remove what
    nothing uses any more. Preserves the computation up to float32 rounding (see the
    module docs). Returns the number of sites fused."""
    graph = model.graph
    index = _Index(model)
    by_output = {site.output: site for site in sites}
    packed = []
    nodes = []
    for node in graph.node:
        site = by_output.get(node.output[0]) if node.output else None
        if site is None:
            nodes.append(node)
            continue
        weight = np.concatenate([index.const(w) for w in site.weights], axis=1)
        bias = np.concatenate([index.const(b) for b in site.biases])
        base = f"{site.output}.attention"
        packed += [numpy_helper.from_array(weight, f"{base}.qkv_weight"),
                   numpy_helper.from_array(bias, f"{base}.qkv_bias")]
        inputs = [site.input, f"{base}.qkv_weight", f"{base}.qkv_bias"]
        if site.mask is not None:
            inputs += ["", "", site.mask]
        nodes.append(helper.make_node("Attention", inputs, [site.output], name=base,
                                      domain=MS_DOMAIN, num_heads=site.num_heads,
                                      scale=site.scale))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(packed)
    ensure_ms_opset(model)
    prune(graph)
    return len(sites)


# --- the optimizer -------------------------------------------------------------------------


def check_model_type(model_type: str | None) -> None:
    if model_type is not None and model_type not in MODEL_TYPES:
        raise MoEError(f"model type {model_type!r} is not supported by optimize: choose one "
                       f"of {', '.join(MODEL_TYPES)}")


def _model_type(model: onnx.ModelProto) -> str:
    """The type `MODEL_TYPES` gives the graph's ``inputs`` metadata."""
    inputs = metadata(model).get("inputs")
    by_inputs = {v: k for k, v in MODEL_TYPES.items()}
    if inputs not in by_inputs:
        raise MoEError(f"cannot tell the model type of a graph with inputs {inputs!r}: pass "
                       f"model_type (one of {', '.join(MODEL_TYPES)})")
    return by_inputs[inputs]


def _complete_gemm_biases(model: onnx.ModelProto) -> None:
    """Give every Gemm without a C input an explicit zero one: ORT's gpt2 fusion rewrites
    Gemm as MatMul + Add(C) and fails on a Gemm whose zero bias the exporter dropped."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) >= 3 or node.input[1] not in shapes:
            continue
        rows, cols = shapes[node.input[1]]
        width = rows if _attribute(node, "transB", 0) else cols
        name = f"{node.input[1]}.zero_bias"
        if name not in shapes:
            model.graph.initializer.append(
                numpy_helper.from_array(np.zeros(width, dtype=np.float32), name))
            shapes[name] = [width]
        node.input.append(name)


def _summary(fusions: dict[str, int]) -> str:
    return ", ".join(f"{name}={count}" for name, count in sorted(fusions.items())) or "none"


def optimize_graph(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    model_type: str | None = None,
    num_heads: int = 0,
    hidden_size: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Optimize the exported graph ``src`` into ``dst`` (see the module docs).

    ``model_type``: ``bert``, ``gpt2`` or ``t5``; None takes it from the graph's
    ``inputs`` metadata (encoder-only, decoder-only, encoder-decoder). ``num_heads`` and
    ``hidden_size``: for ORT's fusions; 0 lets ORT detect them. Returns a report:
    ``model_type``, ``fusions`` (op type -> how many the optimization created),
    ``attention_rejected`` (each Softmax moeify's attention fusion left, with why),
    ``nodes_before``, ``nodes_after``. Refused with a `MoEError`: another model type, an
    existing ``dst`` without ``force``, graphs over 2 GB of weights, and any change to the
    static-capacity expert subgraph.
    """
    from onnxruntime import __version__ as ort_version
    from onnxruntime.transformers.optimizer import optimize_model

    check_model_type(model_type)
    dst = check_destination(src, dst, force)
    model = load_graph(src)
    kind = model_type or _model_type(model)
    size = weight_bytes(model)
    if size > EXTERNAL_DATA_BYTES:
        raise MoEError(f"{src} holds {size / 2**30:.1f} GiB of weights, over the 2 GB that ONNX "
                       "shape inference (which the fusions run) can serialize: quantize it "
                       "first (int4 experts are ~0.16x the bytes), then optimize the result")
    external = has_external_data(src)
    info = metadata(model)
    before = find_expert_subgraph(model)
    ops_before = collections.Counter(n.op_type for n in model.graph.node)
    ranks = value_ranks(model) if kind == "bert" else {}
    if kind == "gpt2":
        _complete_gemm_biases(model)
    with quiet_logging():
        try:
            optimizer = optimize_model(model, model_type=kind, num_heads=num_heads,
                                       hidden_size=hidden_size, opt_level=0)
        except Exception as error:  # noqa: BLE001 - ORT's fusions raise anything
            raise MoEError(f"ONNX Runtime's {kind} optimizer failed on {src} "
                           f"({type(error).__name__}: {error}); nothing was written") from error
    model = optimizer.model
    ensure_ms_opset(model)
    rejected: list[str] = []
    if kind == "bert":
        sites, rejected = find_attention_sites(model, ranks)
        fuse_attention(model, sites)
    check_expert_subgraph(before, find_expert_subgraph(model), what="the optimizer")
    if "shard_experts" in info:
        check_sharding(model)
    ops_after = collections.Counter(n.op_type for n in model.graph.node)
    fusions = {op: ops_after[op] - ops_before[op] for op in ops_after
               if ops_after[op] > ops_before[op]}
    info["optimized"] = f"onnxruntime {ort_version} {kind} fusions: {_summary(fusions)}"
    del model.metadata_props[:]
    for key, value in info.items():
        model.metadata_props.add(key=key, value=value)
    write_graph(model, dst, force=force, external_data=external, what="the optimized graph")
    return {
        "model_type": kind,
        "fusions": dict(sorted(fusions.items())),
        "attention_rejected": rejected,
        "nodes_before": sum(ops_before.values()),
        "nodes_after": sum(ops_after.values()),
    }
