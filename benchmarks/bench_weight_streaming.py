"""How fast can one fp32 matmul stream expert weights when each expert has few rows?

The layer benchmark's roofline floor charges weight bytes at the copy ceiling (a large
``dst.copy_(src)``). An expert matmul ``[M, d] @ [d, f]`` must read the whole ``d x f``
weight whatever M is; with few rows per expert (64 experts, few tokens) it is bound by
how fast the BLAS kernel streams that weight, not by FLOPs. This script measures that
rate for the layer benchmark's shapes, beside the copy and matmul ceilings, in one run:
the best achievable time of an expert stage at M rows is ``weight bytes / rate(M)``.

    python benchmarks/bench_weight_streaming.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
from harness import median_seconds, print_table  # noqa: E402 (benchmarks/ is on sys.path)

THREADS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--experts", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)

    src = torch.randn(128 * 2**20)  # 512 MiB
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / median_seconds(lambda: dst.copy_(src), args.repeats)
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    matmul = 2 * 4096**3 / median_seconds(lambda: a @ b, max(3, args.repeats // 3))
    del src, dst, a, b
    print(f"torch {torch.__version__}, {THREADS} threads, THP_MEM_ALLOC_ENABLE="
          f"{os.environ.get('THP_MEM_ALLOC_ENABLE')}")
    print(f"copy ceiling {copy / 1e9:.1f} GB/s, matmul ceiling {matmul / 1e9:.1f} GFLOP/s\n")
    E = args.experts
    table = []
    for d, f in ((512, 2048), (768, 3072)):
        w = torch.randn(E, d, f)
        for rows in (8, 10, 32, 40, 128, 160):
            x = torch.randn(E, rows, d)
            seconds = median_seconds(lambda: torch.bmm(x, w), args.repeats)
            rate = E * d * f * 4 / seconds
            flops = 2 * E * rows * d * f / seconds
            table.append([d, f, rows, E, f"{seconds * 1e3:.2f}", f"{rate / 1e9:.1f}",
                          f"{rate / copy:.2f}", f"{flops / 1e9:.1f}"])
    print_table(["d", "f", "rows per expert M", "E", "bmm ms", "weight GB/s",
                 "fraction of copy ceiling", "GFLOP/s"], table)


if __name__ == "__main__":
    main()
