"""Streaming conversion at the paper's scale: wall time, peak memory, bytes written.

Runs ``moeify convert MODEL --random-init --experts E --capacity CF`` in a child
process (so its peak RSS is its own), then, in the same run, writes the same number
of bytes sequentially to the same file system as the baseline. Targets (issue: the CLI):

- peak RSS <= dense model bytes + 2 GB (the MoE model is never built in memory);
- wall time <= 2x the sequential write of the same bytes.

    python benchmarks/bench_convert.py                      # t5-base, 64 experts, ~15 GB
    python benchmarks/bench_convert.py --model t5-small --experts 8   # quick
    python benchmarks/bench_convert.py --model meta-llama/Llama-3.2-1B --experts 8 \
        --dtype bfloat16 --format hf --hf-arch mixtral --check-load   # HF Mixtral, ~14 GB

``--check-load`` then loads the output with transformers' ``from_pretrained`` in another
child process and runs one forward (HF outputs only), reporting its time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import Target, print_table, print_targets, run_child, timed

CHUNK = 64 * 2**20


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def sequential_write(path: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` to ``path`` in 64 MiB chunks (the file is removed)."""
    buffer = os.urandom(CHUNK)

    def write() -> None:
        with open(path, "wb") as handle:
            written = 0
            while written < nbytes:
                n = min(CHUNK, nbytes - written)
                handle.write(buffer[:n] if n < CHUNK else buffer)
                written += n

    os.sync()  # start from the same clean page cache as the conversion
    elapsed = timed(write)
    path.unlink()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="t5-base")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--capacity", type=float, default=None,
                        help="capacity factor (default 1.25; not passed to the dropless "
                        "--format hf targets mixtral and qwen2_moe)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--format", default="torch", choices=("torch", "hf"))
    parser.add_argument("--hf-arch", help="with --format hf: mixtral, qwen2_moe, ...")
    parser.add_argument("--check-load", action="store_true",
                        help="load the HF output with from_pretrained and run a forward")
    parser.add_argument("--dir", help="scratch directory (default: a temporary one)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    scratch = Path(args.dir or tempfile.mkdtemp(prefix="moeify-bench-convert-"))
    scratch.mkdir(parents=True, exist_ok=True)
    out = scratch / "converted"
    dropless = args.format == "hf" and args.hf_arch in ("mixtral", "qwen2_moe")
    capacity = args.capacity if args.capacity is not None or dropless else 1.25
    config = ["--experts", str(args.experts)]
    if capacity is not None:
        config += ["--capacity", str(capacity)]
    # inspect plans what the target converts (mixtral: every layer, top-2)
    planned = ["--every", "1", "--top-k", "2"] if args.hf_arch == "mixtral" else []
    inspect = subprocess.run(
        [sys.executable, "-m", "moeify", "inspect", args.model, *config, *planned,
         "--dtype", args.dtype, "--json"], capture_output=True, text=True, check=True)
    dense_bytes = json.loads(inspect.stdout)["bytes"]["dense"]
    target = ["--format", args.format] if args.format != "torch" else []
    target += ["--hf-arch", args.hf_arch] if args.hf_arch else []
    target += ["--dtype", args.dtype] if args.dtype != "float32" else []
    command = [sys.executable, "-m", "moeify", "convert", args.model, "--random-init",
               *config, *target, "--out", str(out), "--force", "--json"]
    expected = json.loads(inspect.stdout)["bytes"]["moe"]
    before = sequential_write(scratch / "sequential.bin", expected)  # the disk, warmed alike
    os.sync()
    wall, peak_rss, result = run_child(command)
    if result.returncode:
        print(result.stderr, file=sys.stderr)
        return result.returncode
    written = directory_bytes(out)
    loaded = check_load(out) if args.check_load else None
    shutil.rmtree(out)
    after = sequential_write(scratch / "sequential.bin", written)
    baseline = (before + after) / 2  # written before and after the conversion: disk drift
    if not args.dir:
        shutil.rmtree(scratch, ignore_errors=True)

    rss_limit = dense_bytes + 2 * 2**30
    rows = {
        "command": " ".join(["moeify"] + command[3:]),
        "dense_bytes": dense_bytes, "bytes_written": written, "wall_s": wall,
        "peak_rss_bytes": peak_rss, "sequential_write_s": baseline,
        "sequential_write_before_s": before, "sequential_write_after_s": after,
        "rss_limit_bytes": rss_limit, "wall_limit_s": 2 * baseline,
    }
    if loaded is not None:
        rows["load_check"] = loaded
    gib = 2**30
    print(f"command: {rows['command']}")
    print_table(["bytes written", "wall s", "peak RSS GiB", "dense GiB",
                 "sequential write s (before / after / mean)", "wall / sequential"],
                [[f"{written:,}", f"{wall:.1f}", f"{peak_rss / gib:.2f}",
                  f"{dense_bytes / gib:.2f}", f"{before:.1f} / {after:.1f} / {baseline:.1f}",
                  f"{wall / baseline:.2f}"]])
    targets = [
        Target.check(peak_rss <= rss_limit, f"peak RSS {peak_rss / gib:.2f} GiB <= dense + 2 "
                     f"GiB = {rss_limit / gib:.2f} GiB"),
        Target.check(wall <= 2 * baseline, f"wall {wall:.1f} s <= 2 x sequential write "
                     f"{baseline:.1f} s = {2 * baseline:.1f} s"),
    ]
    if loaded is not None:
        targets.append(Target.check(
            loaded["finite"], f"from_pretrained loads it as {loaded['class']} "
            f"({loaded['parameters']:,} parameters, {loaded['dtype']}, {loaded['load_s']:.1f} s, "
            f"peak RSS {loaded['peak_rss_bytes'] / gib:.2f} GiB); a forward of "
            f"{loaded['tokens']} tokens took {loaded['forward_s']:.1f} s, logits finite: "
            f"{loaded['finite']}"))
    print_targets(targets)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if loaded is None or loaded["finite"] else 1


LOAD_CHECK = """
import json, resource, sys, time
import torch, transformers
start = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
load_s = time.perf_counter() - start
ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
with torch.no_grad():
    logits = model(input_ids=ids).logits
forward_s = time.perf_counter() - start
print(json.dumps({"class": type(model).__name__, "dtype": str(model.dtype).removeprefix("torch."),
                  "parameters": sum(p.numel() for p in model.parameters()), "load_s": load_s,
                  "forward_s": forward_s, "tokens": ids.numel(),
                  "finite": bool(torch.isfinite(logits).all()),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def check_load(out: Path) -> dict:
    """Load an HF output with ``from_pretrained`` in a child process and run a forward."""
    result = subprocess.run([sys.executable, "-c", LOAD_CHECK, str(out)], capture_output=True,
                            text=True)
    if result.returncode:
        print(result.stderr, file=sys.stderr)
        raise SystemExit(result.returncode)
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
