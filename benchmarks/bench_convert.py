"""Streaming conversion at the paper's scale: wall time, peak memory, bytes written.

Runs ``moeify convert MODEL --random-init --experts E --capacity CF`` in a child
process (so its peak RSS is its own), then, in the same run, writes the same number
of bytes sequentially to the same file system as the baseline. Targets (issue: the CLI):

- peak RSS <= dense model bytes + 2 GB (the MoE model is never built in memory);
- wall time <= 2x the sequential write of the same bytes.

    python benchmarks/bench_convert.py                      # t5-base, 64 experts, ~15 GB
    python benchmarks/bench_convert.py --model t5-small --experts 8   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHUNK = 64 * 2**20


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def sequential_write(path: Path, nbytes: int) -> float:
    buffer = os.urandom(CHUNK)
    os.sync()  # start from the same clean page cache as the conversion
    start = time.perf_counter()
    with open(path, "wb") as handle:
        written = 0
        while written < nbytes:
            n = min(CHUNK, nbytes - written)
            handle.write(buffer[:n] if n < CHUNK else buffer)
            written += n
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="t5-base")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--capacity", type=float, default=1.25)
    parser.add_argument("--dir", help="scratch directory (default: a temporary one)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    scratch = Path(args.dir or tempfile.mkdtemp(prefix="moeify-bench-convert-"))
    scratch.mkdir(parents=True, exist_ok=True)
    out = scratch / "converted"
    inspect = subprocess.run(
        [sys.executable, "-m", "moeify", "inspect", args.model, "--experts", str(args.experts),
         "--json"], capture_output=True, text=True, check=True)
    dense_bytes = json.loads(inspect.stdout)["bytes"]["dense"]
    command = [sys.executable, "-m", "moeify", "convert", args.model, "--random-init",
               "--experts", str(args.experts), "--capacity", str(args.capacity),
               "--out", str(out), "--force", "--json"]
    expected = json.loads(inspect.stdout)["bytes"]["moe"]
    before = sequential_write(scratch / "sequential.bin", expected)  # the disk, warmed alike
    os.sync()
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        print(result.stderr, file=sys.stderr)
        return result.returncode
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child
    written = directory_bytes(out)
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
    gib = 2**30
    print(f"command: {rows['command']}")
    print("| bytes written | wall s | peak RSS GiB | dense GiB | sequential write s (before / "
          "after / mean) | wall / sequential |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {written:,} | {wall:.1f} | {peak_rss / gib:.2f} | {dense_bytes / gib:.2f} | "
          f"{before:.1f} / {after:.1f} / {baseline:.1f} | {wall / baseline:.2f} |")
    print(f"- [{'PASS' if peak_rss <= rss_limit else 'FAIL'}] peak RSS {peak_rss / gib:.2f} GiB "
          f"<= dense + 2 GiB = {rss_limit / gib:.2f} GiB")
    print(f"- [{'PASS' if wall <= 2 * baseline else 'FAIL'}] wall {wall:.1f} s <= 2 x sequential "
          f"write {baseline:.1f} s = {2 * baseline:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
