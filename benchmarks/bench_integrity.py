"""What integrity costs: the source fingerprint at conversion, digests while writing, and
`moeify.load` with and without digest checks.

    python benchmarks/bench_integrity.py --model t5-small --experts 8 [--json out.json]

Builds the preset with fresh weights, times `weights_fingerprint` (what ``moeify
convert`` adds per source) and `check_finite`, streams the conversion to a checkpoint
(digests computed as the bytes are written), then times ``moeify.load(path)`` against
``moeify.load(path, check_digests=False)`` alternately (``--runs`` each, after one
untimed load that warms the page cache) and the raw sha256 throughput of this machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from harness import RepeatPolicy, Stat, interleave, timed, timed_value

import moeify
from moeify.io.sources import check_finite, load_source, weights_fingerprint


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="t5-small")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dense, _ = load_source(args.model, random_init=True, device="meta")
    built, (dense, source) = timed_value(lambda: load_source(args.model, random_init=True))
    nbytes = sum(t.numel() * t.element_size() for t in dense.state_dict().values())
    fingerprint_s = timed(lambda: weights_fingerprint(dense))
    finite_s = timed(lambda: check_finite(dense))
    buffer = torch.empty(256 * 2**20, dtype=torch.uint8).numpy()
    sha_s = timed(lambda: hashlib.sha256(buffer).hexdigest())
    results = {
        "model": args.model, "experts": args.experts,
        "dense_bytes": nbytes, "load_source_s (incl. fingerprint)": built,
        "fingerprint_s": fingerprint_s, "check_finite_s": finite_s,
        "sha256_GBps": buffer.nbytes / sha_s / 1e9,
    }
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        out = Path(tmp) / "ck"
        plan = moeify.plan(dense, moeify.MoEConfig(num_experts=args.experts))
        convert_s = timed(lambda: moeify.write(dense, out, plan=plan, source=source))
        del dense
        stored = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        moeify.load(out)  # page cache warm for both variants
        runs = interleave({"checked": lambda: moeify.load(out),
                           "unchecked": lambda: moeify.load(out, check_digests=False)},
                          RepeatPolicy.fixed(args.runs, warmups=0))
        results.update({
            "checkpoint_bytes": stored, "convert_and_write_s": convert_s,
            "load_checked_s": Stat.of(runs["checked"]).median,
            "load_unchecked_s": Stat.of(runs["unchecked"]).median,
            "load_runs": runs,
        })
        results["load_ratio"] = results["load_checked_s"] / results["load_unchecked_s"]
    for key, value in results.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
