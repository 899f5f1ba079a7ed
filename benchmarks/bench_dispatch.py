"""The measurement behind `SwitchFFN`'s AUTO dispatch: batched vs per-expert matmuls.

AUTO runs the experts one of two ways in eager mode (see `moeify.switch.dispatchers`):

* padded: every expert gets the same ``G*C`` rows, empty slots included, and one batched
  matmul (``bmm``) per weight matrix computes them all;
* sorted: only the occupied rows, sorted by expert, one matmul per expert that has rows
  (``segment_linear``).

Sorted never computes more rows, so padded only pays where one ``bmm`` over ``R`` rows per
expert runs faster than ``E`` separate matmuls over the same ``R`` rows. This script
measures that ratio, ``t(bmm) / t(per-expert)`` at equal rows, for each precision and
direction people run, over a range of rows per expert. AUTO picks padded when

    ratio(precision, mode) * padded_rows < occupied_rows

(``BATCHED_COST`` in ``moeify/switch/dispatchers.py`` holds one ratio per matmul dtype, read
off this table). Expert FFN: ReLU, ``w_in [E, d, f]``, ``w_out [E, f, d]``.

A third column times ``torch.nn.functional.grouped_mm`` over the same sorted rows (one
call per weight, offsets per expert; weights cast to the matmul dtype as a whole), the
other candidate for the sorted path.

    python benchmarks/bench_dispatch.py                    # E 8/64, d,f 768,3072
    python benchmarks/bench_dispatch.py --quick
    python benchmarks/bench_dispatch.py --device cuda      # the same ratios on a GPU
"""

from __future__ import annotations

import os
import sys

if "--no-thp" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import contextlib
import shlex

import torch
import torch.nn.functional as F

# benchmarks/ is on sys.path: the script's own directory
from harness import markdown_row, markdown_table, median_seconds  # noqa: E402
from moeify.switch import Experts

PRECISIONS = ("fp32", "bf16-autocast", "bf16-weights")
MODES = ("fwd", "fwd+bwd")


def build(E: int, d: int, f: int, precision: str, device: torch.device) -> Experts:
    experts = Experts(E, d, f, device=device)
    if precision == "bf16-weights":
        experts.to(torch.bfloat16)
    return experts


def runner(experts: Experts, x: torch.Tensor, rows: int, kernel: str, mode: str, precision: str):
    E = experts.num_experts
    autocast = (torch.autocast(x.device.type, dtype=torch.bfloat16)
                if precision == "bf16-autocast" else contextlib.nullcontext())
    grad = torch.randn(E * rows, experts.d_model, dtype=x.dtype, device=x.device)

    def compute(inputs: torch.Tensor) -> torch.Tensor:
        with autocast:
            if kernel == "bmm":
                return experts(inputs.view(E, rows, -1)).flatten(0, 1)
            if kernel == "grouped":
                return grouped_ffn(experts, inputs, rows)
            return experts.forward_sorted(inputs, [rows] * E)

    def fwd() -> None:
        with torch.inference_mode():
            compute(x)

    def fwd_bwd() -> None:
        for p in experts.parameters():
            p.grad = None
        x_grad = x.detach().requires_grad_()
        compute(x_grad).backward(grad.to(torch.float32 if precision == "bf16-autocast"
                                          else x.dtype))

    return fwd if mode == "fwd" else fwd_bwd


def grouped_ffn(experts: Experts, x: torch.Tensor, rows: int) -> torch.Tensor:
    """The expert FFN with one grouped matmul per weight (``F.grouped_mm``)."""
    device = x.device.type
    dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
             else experts.w_in.dtype)
    offsets = torch.arange(1, experts.num_experts + 1, dtype=torch.int32, device=x.device) * rows
    with torch.autocast(device, enabled=False):
        hidden = F.grouped_mm(x.to(dtype), experts.w_in.to(dtype), offs=offsets).relu()
        return F.grouped_mm(hidden, experts.w_out.to(dtype), offs=offsets)


def median_ms(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of ``fn``, device work included; NaN where the kernel is not
    available for this device and dtype (``grouped_mm`` on some GPUs and dtypes)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    try:
        return 1e3 * median_seconds(fn, repeats, sync)
    except RuntimeError as error:
        print(f"<!-- {device.type}: {str(error).splitlines()[0]} -->", flush=True)
        return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--dims", nargs="+", default=["768x3072"])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32, 64, 128, 256, 512])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="E=4, 64x256, rows 8/64, 2 repeats")
    parser.add_argument("--no-thp", action="store_true")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.experts, args.dims, args.rows, args.repeats = [4], ["64x256"], [8, 64], 2
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"command: `{shlex.join(['python', 'benchmarks/bench_dispatch.py', *sys.argv[1:]])}`")
    if device.type == "cuda":
        print(f"device {torch.cuda.get_device_name(device)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}, THP_MEM_ALLOC_ENABLE="
          f"{os.environ.get('THP_MEM_ALLOC_ENABLE', '(unset)')}")
    print()
    print("\n".join(markdown_table(
        ["precision", "mode", "d x f", "E", "rows/expert", "bmm ms", "per-expert ms",
         "grouped_mm ms", "bmm / per-expert", "grouped_mm / per-expert"], [], "lllrrrrrrr")))
    for precision in args.precisions:
        for dims in args.dims:
            d, f = (int(v) for v in dims.split("x"))
            for E in args.experts:
                experts = build(E, d, f, precision, device)
                for rows in args.rows:
                    dtype = torch.bfloat16 if precision == "bf16-weights" else torch.float32
                    x = torch.randn(E * rows, d, dtype=dtype, device=device)
                    for mode in MODES:
                        bmm, loop, grouped = (
                            median_ms(runner(experts, x, rows, kernel, mode, precision),
                                      args.repeats, device)
                            for kernel in ("bmm", "loop", "grouped"))
                        print(markdown_row([
                            precision, mode, f"{d}x{f}", E, rows, f"{bmm:.2f}", f"{loop:.2f}",
                            f"{grouped:.2f}", f"{bmm / loop:.2f}", f"{grouped / loop:.2f}"]),
                            flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
