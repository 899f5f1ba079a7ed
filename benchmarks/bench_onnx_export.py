"""ONNX export of a converted checkpoint at the paper's scale: time, peak memory, checks.

Converts ``MODEL --random-init --experts E --capacity CF --seq-len S`` to a moeify
checkpoint, then runs ``moeify export CKPT --onnx OUT --seq-len S`` in its own child
process and reports its wall time and peak RSS (`os.wait4`, that child alone), the
bytes of the graph and of its external data, and the checks the graph must pass:
``onnx.checker.check_model(path, full_check=True)`` and strict shape inference with the
static expert shapes ``[E, batch, C]``. The export traces the model on meta parameters
and streams each weight from the checkpoint into the external data file, so its peak
memory should stay near the dense model's, not the MoE model's.

    python benchmarks/bench_onnx_export.py                       # t5-base x 64, ~15 GB
    python benchmarks/bench_onnx_export.py --model t5-small --experts 2 --seq-len 16
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import Target, print_table, print_targets, run_child, timed


def expert_shapes(path: Path, num_experts: int) -> set[tuple]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(graph, strict_mode=True)
    shapes = set()
    for value in inferred.graph.value_info:
        dims = value.type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims)
        if shape and shape[0] == num_experts:
            shapes.add(shape)
    return shapes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="t5-base")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--capacity", type=float, default=1.25)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dir", help="scratch directory (default: a temporary one)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    import onnx

    scratch = Path(args.dir or tempfile.mkdtemp(prefix="moeify-bench-onnx-export-"))
    scratch.mkdir(parents=True, exist_ok=True)
    ckpt, graph = scratch / "converted", scratch / "onnx" / "model.onnx"
    moeify = [sys.executable, "-m", "moeify"]
    inspect = subprocess.run(moeify + ["inspect", args.model, "--experts", str(args.experts),
                                       "--seq-len", str(args.seq_len), "--json"],
                             capture_output=True, text=True, check=True)
    report = json.loads(inspect.stdout)
    convert = moeify + ["convert", args.model, "--random-init", "--experts", str(args.experts),
                        "--capacity", str(args.capacity), "--seq-len", str(args.seq_len),
                        "--out", str(ckpt), "--force", "--json"]
    convert_s, convert_rss, result = run_child(convert)
    if result.returncode:
        print(result.stderr, file=sys.stderr)
        return result.returncode
    export = moeify + ["export", str(ckpt), "--onnx", str(graph), "--seq-len", str(args.seq_len),
                       "--force", "--json"]
    export_s, export_rss, result = run_child(export)
    if result.returncode:
        print(result.stderr, file=sys.stderr)
        return result.returncode
    metadata = json.loads(result.stdout)["metadata"]
    data = graph.with_name(graph.name + ".data")
    graph_bytes = graph.stat().st_size
    data_bytes = data.stat().st_size if data.exists() else 0
    check_s = timed(lambda: onnx.checker.check_model(str(graph), full_check=True))
    E, C = int(metadata["num_experts"]), int(metadata["expert_capacity"])
    shapes = expert_shapes(graph, E)
    static = (E, "batch", C) in shapes
    if not args.dir:
        shutil.rmtree(scratch, ignore_errors=True)

    gib = 2**30
    dense, moe = report["bytes"]["dense"], report["bytes"]["moe"]
    rows = {
        "convert_command": " ".join(["moeify"] + convert[3:]),
        "export_command": " ".join(["moeify"] + export[3:]),
        "dense_bytes": dense, "moe_bytes": moe, "convert_s": convert_s,
        "convert_peak_rss_bytes": convert_rss, "export_s": export_s,
        "export_peak_rss_bytes": export_rss, "onnx_bytes": graph_bytes,
        "external_data_bytes": data_bytes, "check_model_s": check_s,
        "static_expert_shape": static, "metadata": metadata,
    }
    print(f"commands: {rows['convert_command']}\n          {rows['export_command']}")
    print_table(["MoE GiB", "convert s", "export s", "export peak RSS GiB", "dense GiB",
                 ".onnx MB", ".onnx.data GiB", "check_model(full) s", "[E, batch, C] inferred"],
                [[f"{moe / gib:.2f}", f"{convert_s:.1f}", f"{export_s:.1f}",
                  f"{export_rss / gib:.2f}", f"{dense / gib:.2f}", f"{graph_bytes / 1e6:.1f}",
                  f"{data_bytes / gib:.2f}", f"{check_s:.1f}",
                  [E, "batch", C] if static else "no"]], "rrrrrrrrl")
    limit = dense + 2 * gib
    print_targets([
        Target.check(export_rss <= limit, f"export peak RSS {export_rss / gib:.2f} GiB <= dense "
                     f"+ 2 GiB = {limit / gib:.2f} GiB (the MoE weights are {moe / gib:.2f} GiB)"),
        Target.check(static, f"strict shape inference gives the static expert shape [E={E}, "
                     f"batch, C={C}]; check_model(full_check=True) passed"),
    ])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if static else 1


if __name__ == "__main__":
    sys.exit(main())
