"""Benchmark moeify's Switch layer against the dense FFN and HF's SparseMLP, in the
layouts people run.

Two sections (``--section batched|one-group|all``, default ``batched``).

batched (the default): batched sequences, one group per sequence
-----------------------------------------------------------------

The layout users get from ``moeify.convert`` with the default ``MoEConfig.group_size=None``:
input ``x: [batch, seq, d]``, every sequence routed as its own group, the layer built with
``seq_len=seq``, so the expert capacity is per sequence:
``C = max(min_capacity=4, ceil(1.25 * seq / E))``. Capacity factor 1.25 in training and in
evaluation, no expert dropout, no router jitter, ReLU experts, top-1, softmax gate.

Grid: (batch x seq) in {8x512, 32x128, 4x2048} x E in {8, 64} x (d, f) in {(512, 2048),
(768, 3072)} x precision in

* ``fp32``           float32 weights and input;
* ``bf16-autocast``  float32 weights and input, the forward under
                     ``torch.autocast(device, dtype=torch.bfloat16)``, the backward outside
                     the autocast block (as users write a mixed-precision step);
* ``bf16-weights``   every module ``.to(torch.bfloat16)``, bfloat16 input. moeify's Router
                     keeps its weight in float32 by design (selective precision); HF's
                     router classifier is reset to moeify's float32 weight after the cast
                     (HF's router computes in float32 too, but ``.to(bfloat16)`` would
                     have rounded its weight, giving it a different router).

Weights: the experts and the router drawn at random, N(0, 1/fan_in), so that experts
differ and the routing is realistic (an upcycled layer has identical experts and a tiny
new router). What is timed is the residual block users run, ``x + FFN(x)``, the same
residual add for every implementation:

* ``dense``    ``Linear -> ReLU -> Linear`` with random weights of the same d and f, on the
               same tokens (the cost every MoE is compared against);
* ``moeify``   `moeify.SwitchFFN` as users get it (``DispatchPath.AUTO``: the layer
               chooses its dispatch path by the cost of the expert buffers);
* one entry per forced dispatch path, named by its value (``padded``, ``sorted``, ...):
               the same layer and parameters with ``dispatch_path`` forced; the list is
               read from ``moeify.switch.DispatchPath`` (every member but AUTO), so a new
               path is benchmarked without editing this file;
* ``hf``       ``transformers``' ``SwitchTransformersSparseMLP`` with moeify's router and
               expert weights copied in; HF routes per sequence with an absolute
               ``expert_capacity``, set to moeify's per-sequence C.

Before timing, every point checks that every MoE implementation's eval output (the FFN
output, under the point's precision) equals moeify's, and raises `EquivalenceError` when
one does not: fp32 atol 1e-4; bf16 compared in float32 with atol = rtol = 2e-2 (bf16 has
8 significant bits). HF computes its router in bfloat16 under autocast and takes the
argmax of bfloat16-rounded probabilities with bfloat16 weights, so in the bf16 precisions a
few near-tie tokens go to a different expert (or lose or win a slot because of one that
did) than under moeify's float32 router. The check computes the reference float32 Switch
routing, excludes the tokens HF routed differently from the comparison, reports their
number, and raises if they exceed 5% of the tokens (fp32: none allowed).

Modes: ``fwd`` is the eval-mode forward under ``torch.inference_mode()``; ``fwd+bwd`` is
the train-mode ``y = block(x); y.backward(grad)`` with a fixed random ``grad`` and
``x.requires_grad`` (input and weight gradients), gradients reset to None between runs as
``zero_grad()`` does.

Timing: one warm-up of every (implementation, mode) first; then interleaved repeats, each
running every implementation once per mode with the starting implementation rotating,
every timed call right after an untimed call of the same implementation (step after
step, as in a training loop: the memory state a call finds is its own previous step's);
at least 3 repeats per point, more while ``--budget`` seconds of timed repeats last (at
most ``--max-repeats``). ``--runs N`` (default 3) runs the whole grid N times, one after
another; the report gives per point the median over runs of the per-run medians and the
spread (min-max of the per-run medians). A ratio (moeify/dense, moeify/hf) is computed in
each run from that run's medians; its median and spread are over runs. Targets are
evaluated on those medians. The 1-minute load average is read first: above
``--max-load`` the script polls every 10 s for up to ``--wait`` seconds, then runs anyway
and says so in the header.

one-group: every token in one group (the earlier layout)
--------------------------------------------------------

Input ``[1, T, d]``, T in {512, 2048, 8192}, one group holding every token (like Mesh-TF's
``group_size``), fp32, capacity factor 1.25 and 1.0, no residual add. Implementations:
moeify, the forced paths, dense, hf and ``einsum``, a GShard / Mesh-TF style one-hot
``[G, T, E, C]`` dispatch and combine. It also reports this machine's roofline floor and
the peak memory of one fwd+bwd:

Roofline floor (N = tokens, fp32 = 4 bytes; matmul_rate and copy_rate are measured in the
same run: a 4096^3 fp32 matmul and a 512 MiB ``dst.copy_(src)`` counted as 2x its size):

    fwd FLOPs      = 2*2*N*d*f + 2*N*d*E          (top-1: each token through one expert,
                                                   plus the router)
    fwd bytes      = 4*N*(2d + 2f)                (x read, y written, hidden [N, f]
                                                   written and read)
                   + 4*E*2*d*f + 4*E*d            (every expert's weights + router weight)
    fwd+bwd FLOPs  = 3 * fwd FLOPs
    fwd+bwd bytes  = 2 * fwd bytes + 4*E*2*d*f    (+ the expert weight gradients written)
    floor          = max(FLOPs / matmul_rate, bytes / copy_rate)
    "x floor"      = measured median time / floor (>= 1 unless the ceilings are noisy)

Peak memory: one extra fwd+bwd per implementation and configuration (not timed) under
``torch.profiler.profile(profile_memory=True)``; the profiler records every allocation
and free of the CPU tensor allocator, and the peak is the maximum of their running sum
from the start of the forward to the end of the backward.

Device: ``--device cpu`` (default; 2 threads, ``THP_MEM_ALLOC_ENABLE=1`` unless
``--no-thp``) or ``--device cuda`` (synchronized timings, autocast on "cuda", default
precisions ``bf16-autocast bf16-weights``; the one-group section is CPU only).

Usage::

    python benchmarks/bench_layer.py                     # batched grid, 3 runs (~35 min, 2 cores)
    python benchmarks/bench_layer.py --device cuda       # the same on a GPU, bf16
    python benchmarks/bench_layer.py --quick             # tiny smoke grid, 1 run
    python benchmarks/bench_layer.py --dims 768x3072 --experts 64 --batch-seq 8x512 \\
        --precisions fp32 --runs 1                       # one point
    python benchmarks/bench_layer.py --section one-group --out table.md --json raw.json
"""

from __future__ import annotations

import os
import sys

# PyTorch's CPU allocator backs large tensors with transparent huge pages when this is set
# before torch allocates anything. Fresh gradient buffers then cost a few hundred page
# faults instead of tens of thousands per step (see BENCHMARKS.md); --no-thp measures
# without it. Every implementation runs under the same setting. (CPU only.)
if "--no-thp" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import platform
import shlex
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from harness import (
    RepeatPolicy,
    Stat,
    Target,
    fmt_load,
    interleave,
    log,
    markdown_table,
    timed,
    verdict,
    wait_for_quiet,
)
from layer_impls import (
    TOLERANCES,
    Agreement,
    Forced,
    OneHotEinsum,
    Residual,
    build_dense,
    build_hf,
    build_moeify,
    check_equivalence,
    hf_routing,
    keep_hf_router_float32,
    switch_routing,
)
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from moeify import SwitchFFN
from moeify.switch import DispatchPath

CPU_THREADS = 2
MODES = ("fwd", "fwd+bwd")
PRECISIONS = ("fp32", "bf16-autocast", "bf16-weights")
CUDA_PRECISIONS = ("bf16-autocast", "bf16-weights")
FORCED_PATHS = [p for p in DispatchPath if p is not DispatchPath.AUTO]
FORCED = tuple(p.value for p in FORCED_PATHS)
BATCHED_IMPLS = ("dense", "moeify", *FORCED, "hf")
ONE_GROUP_IMPLS = ("moeify", *FORCED, "dense", "hf", "einsum")
MiB = 2**20
EINSUM_LIMIT_BYTES = 6 * 2**30  # skip the one-hot einsum above this estimated footprint
SWITCH_BASE_64 = dict(batch=8, seq=512, d=768, f=3072, experts=64)


# ------------------------------------------------------------------------ timing


def time_steps(
    steps: dict[str, dict[str, Callable[[], None]]],
    reset: Callable[[str], None],
    policy: RepeatPolicy,
    device: torch.device,
) -> tuple[int, dict[str, dict[str, list[float]]]]:
    """Time ``steps[mode][impl]()`` with `harness.interleave`: every implementation once
    per mode and repeat, the starting implementation rotating within each mode, each timed
    call right after an untimed call of the same implementation and mode; ``reset(impl)``
    before and after every call. Returns (repeats, seconds per mode and implementation)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    times = interleave({(mode, name): step for mode, by_impl in steps.items()
                        for name, step in by_impl.items()},
                       policy, group=lambda key: key[0], reset=lambda key: reset(key[1]),
                       lead_in=True, sync=sync)
    out: dict[str, dict[str, list[float]]] = {}
    for (mode, name), seconds in times.items():
        out.setdefault(mode, {})[name] = seconds
    return len(next(iter(times.values()))), out


def reset_module(module: nn.Module, x: Tensor) -> None:
    """What ``zero_grad()`` does (grads to None), plus the layer's routing record."""
    for p in module.parameters():
        p.grad = None
    x.grad = None
    for m in module.modules():
        if isinstance(m, SwitchFFN):
            m.last_routing = None


# ------------------------------------------------------------------ batched grid


@dataclasses.dataclass(frozen=True)
class Point:
    """One configuration of the batched grid."""

    batch: int
    seq: int
    d: int
    f: int
    experts: int
    precision: str

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def key(self) -> str:
        return f"{self.batch}x{self.seq}_d{self.d}_f{self.f}_E{self.experts}_{self.precision}"

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.seq} d={self.d} f={self.f} E={self.experts} {self.precision}"


def parse_pair(text: str) -> tuple[int, int]:
    """'8x512' -> (8, 512)."""
    try:
        a, b = text.lower().split("x")
        return int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected AxB (e.g. 8x512), got {text!r}") from None


def batched_grid(quick: bool, precisions: Sequence[str]) -> list[Point]:
    if quick:
        batch_seqs, experts, dims = [(4, 64), (2, 128)], [8], [(64, 256)]
    else:
        batch_seqs, experts = [(8, 512), (32, 128), (4, 2048)], [8, 64]
        dims = [(512, 2048), (768, 3072)]
    return [
        Point(b, s, d, f, e, p)
        for (d, f), e, (b, s), p in itertools.product(dims, experts, batch_seqs, precisions)
    ]


def filter_grid(grid: list[Point], args: argparse.Namespace) -> list[Point]:
    def keep(p: Point) -> bool:
        return ((not args.experts or p.experts in args.experts)
                and (not args.batch_seq or (p.batch, p.seq) in args.batch_seq)
                and (not args.dims or (p.d, p.f) in args.dims))
    return [p for p in grid if keep(p)]


def precision_family(precision: str) -> str:
    return "fp32" if precision == "fp32" else "bf16"


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16-autocast":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclasses.dataclass
class Case:
    """Everything one grid point runs: modules on the device in the point's precision."""

    point: Point
    device: torch.device
    capacity: int
    ffns: dict[str, nn.Module]  # impl -> FFN (compared for equivalence)
    blocks: dict[str, nn.Module]  # impl -> Residual(FFN) (timed)
    router_weight: Tensor  # moeify's float32 router weight (reference routing)
    x: Tensor  # [batch, seq, d]
    x_grad: Tensor  # the same values, requires_grad (fwd+bwd)
    grad: Tensor  # fixed output gradient


def build_case(point: Point, impls: Sequence[str], *, seed: int, device: torch.device) -> Case:
    generator = torch.Generator().manual_seed(seed)
    layer, dense = build_moeify(point.d, point.f, point.experts, seq_len=point.seq,
                                generator=generator)
    makers: dict[str, Callable[[], nn.Module]] = {
        "dense": lambda: build_dense(dense),
        "moeify": lambda: layer,
        "hf": lambda: build_hf(layer),
        **{p.value: (lambda p=p: Forced(layer, p)) for p in FORCED_PATHS},
    }
    ffns = {name: makers[name]() for name in BATCHED_IMPLS if name in impls}
    dtype = torch.bfloat16 if point.precision == "bf16-weights" else torch.float32
    for module in ffns.values():
        module.to(device=device, dtype=dtype)
    if "hf" in ffns:
        keep_hf_router_float32(ffns["hf"], layer)
    x = torch.randn(point.batch, point.seq, point.d, generator=generator).to(device, dtype)
    grad = torch.randn(point.batch, point.seq, point.d, generator=generator).to(device, dtype)
    layer.eval()
    return Case(
        point=point, device=device, capacity=layer.expert_capacity, ffns=ffns,
        blocks={name: Residual(m) for name, m in ffns.items()},
        router_weight=layer.router.weight.detach(), x=x,
        x_grad=x.clone().requires_grad_(), grad=grad,
    )


def verify_case(case: Case) -> dict[str, Agreement]:
    """Eval outputs of every MoE implementation against moeify's (raises on mismatch)."""
    ctx = lambda: precision_context(case.point.precision, case.device)  # noqa: E731
    outputs, rerouted = {}, {}
    with torch.inference_mode():
        reference = switch_routing(case.x, case.router_weight, case.capacity)
        for name, ffn in case.ffns.items():
            if name == "dense":
                continue
            ffn.eval()
            with ctx():
                outputs[name] = ffn(case.x)
                if name == "hf":
                    rerouted[name] = hf_routing(ffn, case.x) != reference
    return check_equivalence(
        outputs, TOLERANCES[precision_family(case.point.precision)], rerouted=rerouted,
        where=f"at {case.point.label}",
    )


def case_steps(case: Case) -> dict[str, dict[str, Callable[[], None]]]:
    """The callables timed per mode and implementation: fwd in eval mode under
    inference_mode, fwd+bwd in train mode with the backward outside autocast."""
    ctx = lambda: precision_context(case.point.precision, case.device)  # noqa: E731

    def fwd(block: nn.Module) -> Callable[[], None]:
        def step() -> None:
            block.eval()
            with torch.inference_mode(), ctx():
                block(case.x)
        return step

    def fwd_bwd(block: nn.Module) -> Callable[[], None]:
        def step() -> None:
            block.train()
            with ctx():
                y = block(case.x_grad)
            y.backward(case.grad)  # outside autocast, as users write it
        return step

    return {"fwd": {name: fwd(b) for name, b in case.blocks.items()},
            "fwd+bwd": {name: fwd_bwd(b) for name, b in case.blocks.items()}}


def bench_case(case: Case, policy: RepeatPolicy) -> dict[str, Any]:
    """Time one point; returns {"repeats": n, "times_s": {mode: {impl: [seconds]}}}."""
    repeats, times = time_steps(
        case_steps(case), lambda name: reset_module(case.blocks[name], case.x_grad), policy,
        case.device,
    )
    return {"repeats": repeats, "times_s": times}


# --------------------------------------------------------------- runs and spread


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


RATIOS = {"moeify/dense": ("moeify", "dense"), "moeify/hf": ("moeify", "hf")}


def run_medians(record: dict, mode: str) -> dict[str, float]:
    """ms per implementation: the median of one run's repeats."""
    return {impl: 1e3 * Stat.of(samples).median
            for impl, samples in record["times_s"][mode].items() if samples}


def summarize(runs: list[list[dict]]) -> dict[str, dict[str, dict[str, dict[str, Stat]]]]:
    """summary[point key][mode] = {"ms": {impl: Stat}, "ratio": {name: Stat}}."""
    per_point: dict[str, list[dict]] = {}
    for records in runs:
        for rec in records:
            per_point.setdefault(rec["point"]["key"], []).append(rec)
    summary = {}
    for key, recs in per_point.items():
        summary[key] = {}
        for mode in MODES:
            medians = [run_medians(r, mode) for r in recs]
            impls = [i for i in medians[0] if all(i in m for m in medians)]
            ms = {i: Stat.of([m[i] for m in medians]) for i in impls}
            ratio = {name: Stat.of([m[a] / m[b] for m in medians])
                     for name, (a, b) in RATIOS.items() if a in impls and b in impls}
            summary[key][mode] = {"ms": ms, "ratio": ratio}
    return summary


# ---------------------------------------------------------------------- targets


def all_points_target(name: str, ratios: dict[Point, Stat], limit: float) -> Target:
    """Every point's median ratio <= limit; the count passing and the worst point."""
    if not ratios:
        return Target(name, "n/a", "no measured point")
    worst = max(ratios, key=lambda p: ratios[p].median)
    n_ok = sum(s.median <= limit for s in ratios.values())
    w = ratios[worst]
    return Target(name, verdict(n_ok == len(ratios)),
                  f"{n_ok}/{len(ratios)} points <= {limit:.2f}x; worst {w.fmt(3)}x "
                  f"(spread {w.fmt_spread(3)}) at {worst.label}")


def one_point_target(name: str, stat: Stat | None, limit: float, what: str) -> Target:
    if stat is None:
        return Target(name, "n/a", f"{what} not measured")
    return Target(name, verdict(stat.median <= limit),
                  f"{stat.fmt(3)}x (spread {stat.fmt_spread(3)}, <= {limit:.2f}x)")


def evaluate_targets(points: list[Point], summary: dict, runs: list[list[dict]]) -> list[Target]:
    def ratio(p: Point, mode: str, name: str) -> Stat | None:
        return summary.get(p.key, {}).get(mode, {}).get("ratio", {}).get(name)

    def ratios(mode: str, name: str, select: Callable[[Point], bool]) -> dict[Point, Stat]:
        out = {p: ratio(p, mode, name) for p in points if select(p)}
        return {p: s for p, s in out.items() if s is not None}

    def sb64(precision: str) -> Point:
        return Point(**SWITCH_BASE_64, precision=precision)

    targets = [
        all_points_target(f"moeify <= 1.0x HF, {mode}, every configuration and precision",
                          ratios(mode, "moeify/hf", lambda p: True), 1.0)
        for mode in MODES
    ]
    sb = "Switch-Base-64 shape (d=768 f=3072 E=64 8x512)"
    for precision in ("fp32", "bf16-autocast"):
        targets.append(one_point_target(
            f"{sb} fwd+bwd <= 0.8x HF, {precision}",
            ratio(sb64(precision), "fwd+bwd", "moeify/hf"), 0.8, "that point"))
    targets.append(one_point_target(
        f"{sb} fwd+bwd <= 1.3x dense, fp32",
        ratio(sb64("fp32"), "fwd+bwd", "moeify/dense"), 1.3, "that point"))
    for mode in MODES:
        target = all_points_target(
            f"8 experts, {mode} <= 1.10x dense at every (batch x seq) point, fp32",
            ratios(mode, "moeify/dense", lambda p: p.experts == 8 and p.precision == "fp32"),
            1.10)
        info = []
        for precision in PRECISIONS[1:]:
            other = all_points_target(
                "", ratios(mode, "moeify/dense",
                           lambda p, q=precision: p.experts == 8 and p.precision == q), 1.10)
            if other.verdict != "n/a":
                info.append(f"[info] {precision}: {other.detail}")
        targets.append(dataclasses.replace(target, info=tuple(info)))
    targets.append(one_point_target(
        f"bf16 weights, moeify fwd at the {sb} <= 0.5x moeify's fp32 fwd there",
        cross_point_ratio(runs, sb64("bf16-weights"), sb64("fp32"), "fwd", "moeify"), 0.5,
        "bf16-weights and fp32 at that shape"))
    return targets


def cross_point_ratio(runs: list[list[dict]], a: Point, b: Point, mode: str,
                      impl: str) -> Stat | None:
    """impl's ms at point a / at point b, per run (both measured in that run)."""
    values = []
    for records in runs:
        by_key = {r["point"]["key"]: r for r in records}
        if a.key in by_key and b.key in by_key:
            ma, mb = run_medians(by_key[a.key], mode), run_medians(by_key[b.key], mode)
            if impl in ma and impl in mb:
                values.append(ma[impl] / mb[impl])
    return Stat.of(values) if values else None


# ----------------------------------------------------------------------- report


def batched_tables(points: list[Point], capacities: dict[str, int], summary: dict,
                   runs: list[list[dict]], impls: Sequence[str]) -> list[str]:
    key_cols = ["batch x seq", "d", "f", "E", "precision", "C", "n"]
    repeats: dict[str, list[int]] = {}
    for records in runs:
        for r in records:
            repeats.setdefault(r["point"]["key"], []).append(r["repeats"])

    def keys(p: Point) -> list[Any]:
        n = repeats[p.key]
        n_cell = str(n[0]) if min(n) == max(n) else f"{min(n)}-{max(n)}"
        return [f"{p.batch}x{p.seq}", p.d, p.f, p.experts, p.precision, capacities[p.key], n_cell]

    lines = []
    for mode in MODES:
        ratio_names = [r for r in RATIOS if all(r in summary[p.key][mode]["ratio"] for p in points)]
        columns = key_cols + [f"{i} ms" for i in impls]
        for r in ratio_names:
            columns += [r, f"{r} spread"]
        rows = []
        for p in points:
            s = summary[p.key][mode]
            row = keys(p) + [fmt_ms(s["ms"][i].median) if i in s["ms"] else "n/a" for i in impls]
            for r in ratio_names:
                row += [s["ratio"][r].fmt(), s["ratio"][r].fmt_spread()]
            rows.append(row)
        lines += [f"### {mode}: ms (median over runs of the per-run medians) and ratios", ""]
        lines += markdown_table(columns, rows) + [""]
        columns = key_cols[:-1] + [f"{i} spread ms" for i in impls]
        rows = [keys(p)[:-1] + [
            f"{fmt_ms(summary[p.key][mode]['ms'][i].lo)}-{fmt_ms(summary[p.key][mode]['ms'][i].hi)}"
            if i in summary[p.key][mode]["ms"] else "n/a" for i in impls] for p in points]
        lines += [f"### {mode}: spread (min-max of the per-run medians, ms)", ""]
        lines += markdown_table(columns, rows) + [""]
    return lines


def equivalence_table(points: list[Point], agreements: dict[str, dict[str, dict]],
                      impls: Sequence[str]) -> list[str]:
    compared = [i for i in impls if i not in ("dense", "moeify")]
    if not compared:
        return []
    columns = ["point"] + [f"{i} max abs diff" for i in compared] + (
        ["hf rerouted tokens"] if "hf" in compared else [])
    rows = []
    for p in points:
        agree = agreements[p.key]
        row = [p.label] + [f"{agree[i]['max_abs_diff']:.2g}" for i in compared]
        if "hf" in compared:
            row.append(f"{agree['hf']['rerouted']}/{agree['hf']['tokens']}")
        rows.append(row)
    return ["### equivalence with moeify (eval outputs, float32 comparison; max over runs)", "",
            *markdown_table(columns, rows), ""]


def environment_lines(
    args: argparse.Namespace, device: torch.device, load_info: dict
) -> list[str]:
    lines = [
        f"- command: `{command_line(args.argv)}` (run from the repository root)",
        f"- torch {torch.__version__}, python {platform.python_version()}, device "
        f"{device_name(device)}, {torch.get_num_threads()} CPU threads",
    ]
    if device.type == "cpu":
        lines.append(
            f"- THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '(unset)')} "
            "(PyTorch CPU allocator: transparent huge pages for large tensors)")
    waited = load_info["waited_s"]
    note = (f"waited {waited:.0f} s" if waited else "no wait") + (
        f"; STILL ABOVE --max-load {args.max_load} when the run started: timings may be "
        "disturbed" if load_info["above"] else f"; below --max-load {args.max_load}")
    lines.append(f"- load average (1 / 5 / 15 min) at start: {fmt_load(load_info['start'])}; "
                 f"when timing began: {fmt_load(load_info['begin'])} ({note})")
    return lines


def batched_header(args: argparse.Namespace, device: torch.device, load_info: dict,
                   impls: Sequence[str]) -> list[str]:
    forced = ", ".join(FORCED)
    return [
        "# moeify Switch layer benchmark: batched sequences, one group per sequence",
        "",
        *environment_lines(args, device, load_info),
        f"- runs: {args.runs}; each timed call follows an untimed call of the same "
        f"implementation; per point >= {args.policy.min_repeats} interleaved repeats, "
        f"more while {args.policy.budget_s:g} s last (max {args.policy.max_repeats}); "
        f"n = repeats per run",
        "- layout: x [batch, seq, d], one group per sequence (MoEConfig.group_size=None, layer "
        "built with seq_len=seq); C = max(4, ceil(1.25 * seq / E)) per expert and sequence; "
        "capacity factor 1.25 train and eval, no expert dropout, no jitter, ReLU experts",
        "- timed: the residual block x + FFN(x); fwd = eval under torch.inference_mode(); "
        "fwd+bwd = train, x.requires_grad, y.backward(fixed grad), grads reset to None",
        "- precisions: fp32; bf16-autocast = fp32 weights, forward under torch.autocast("
        f"'{device.type}', bfloat16), backward outside; bf16-weights = modules "
        ".to(bfloat16), bf16 input (routers stay float32)",
        f"- impls: {', '.join(impls)}. moeify = SwitchFFN as users get it (DispatchPath.AUTO); "
        f"{forced} = the same layer forced onto that path; dense = Linear-ReLU-Linear; "
        "hf = transformers SwitchTransformersSparseMLP with moeify's weights",
        "- ms: median over runs of the per-run medians; spread = min-max of the per-run "
        "medians; ratios computed per run from that run's medians, then median / spread",
        "",
    ]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()})"


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["python", "benchmarks/bench_layer.py", *argv])


# ---------------------------------------------------------------- batched section


def run_batched(args: argparse.Namespace, device: torch.device, load_info: dict) -> dict:
    impls = [i for i in BATCHED_IMPLS if i in args.impls_batched]
    points = filter_grid(batched_grid(args.quick, args.precisions), args)
    if not points:
        raise SystemExit("the filters leave no grid point")
    runs: list[list[dict]] = []
    capacities: dict[str, int] = {}
    agreements: dict[str, dict[str, dict]] = {}
    start = time.perf_counter()
    for run in range(args.runs):
        records = []
        for i, point in enumerate(points, 1):
            gc.collect()
            case = build_case(point, impls, seed=args.seed, device=device)
            capacities[point.key] = case.capacity
            agree = {k: dataclasses.asdict(v) for k, v in verify_case(case).items()}
            for name, a in agree.items():  # keep the worst over runs
                prev = agreements.setdefault(point.key, {}).get(name)
                if prev is None or a["max_abs_diff"] > prev["max_abs_diff"]:
                    agreements[point.key][name] = a
            result = bench_case(case, args.policy)
            records.append({"point": {**dataclasses.asdict(point), "key": point.key},
                            "capacity": case.capacity, "run": run, **result,
                            "equivalence": agree})
            med = {m: run_medians(result, m).get("moeify") for m in MODES}
            log(f"[run {run + 1}/{args.runs}, {i}/{len(points)}] {point.label} "
                f"C={case.capacity} n={result['repeats']} moeify fwd {fmt_ms(med['fwd'])} ms, "
                f"fwd+bwd {fmt_ms(med['fwd+bwd'])} ms ({time.perf_counter() - start:.0f} s)")
            del case
        runs.append(records)
    gc.collect()
    summary = summarize(runs)
    targets = evaluate_targets(points, summary, runs)
    lines = (batched_header(args, device, load_info, impls)
             + batched_tables(points, capacities, summary, runs, impls)
             + equivalence_table(points, agreements, impls)
             + ["## Targets (batched)", ""] + [l for t in targets for l in t.lines()])
    return {
        "lines": lines,
        "seconds": time.perf_counter() - start,
        "json": {
            "impls": impls,
            "points": [{**dataclasses.asdict(p), "key": p.key, "capacity": capacities[p.key]}
                       for p in points],
            "runs": runs,
            "summary": {k: {m: {kind: {n: dataclasses.asdict(s) for n, s in stats.items()}
                                for kind, stats in modes.items()}
                            for m, modes in v.items()} for k, v in summary.items()},
            "equivalence": agreements,
            "targets": [dataclasses.asdict(t) for t in targets],
        },
    }


# -------------------------------------------------------------- one-group section


@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration of the one-group grid: input [1, tokens, d]."""

    d: int
    f: int
    tokens: int
    experts: int
    cf: float

    @property
    def key(self) -> str:
        return f"d{self.d}_f{self.f}_T{self.tokens}_E{self.experts}_cf{self.cf}"


def one_group_grid(quick: bool) -> list[Config]:
    if quick:
        return [Config(128, 512, tokens, 8, 1.25) for tokens in (256, 1024)]
    return [
        Config(d, f, tokens, experts, cf)
        for (d, f), tokens, experts, cf in itertools.product(
            [(512, 2048), (768, 3072)], [512, 2048, 8192], [8, 64], [1.25, 1.0]
        )
    ]


def einsum_footprint(cfg: Config, capacity: int) -> int:
    """Rough bytes the one-hot path needs: dispatch, combine, their gradient and the
    einsum operands' contiguous copies, about six [G, T, E, C] fp32 tensors."""
    return 6 * 4 * cfg.tokens * cfg.experts * capacity


@dataclasses.dataclass
class Setup:
    cfg: Config
    capacity: int
    modules: dict[str, nn.Module]
    skipped: dict[str, str]  # impl -> why
    x: Tensor  # [1, T, d]
    x_grad: Tensor  # x with requires_grad, for fwd+bwd
    grad: Tensor  # fixed output gradient


def make_setup(cfg: Config, seed: int, impls: Sequence[str]) -> Setup:
    generator = torch.Generator().manual_seed(seed)
    layer, dense = build_moeify(cfg.d, cfg.f, cfg.experts, seq_len=cfg.tokens,
                                generator=generator, capacity_factor=cfg.cf, min_capacity=1)
    capacity = layer.expert_capacity
    makers: dict[str, Callable[[], nn.Module]] = {
        "moeify": lambda: layer,
        "dense": lambda: build_dense(dense),
        "hf": lambda: build_hf(layer),
        "einsum": lambda: OneHotEinsum(layer),
        **{p.value: (lambda p=p: Forced(layer, p)) for p in FORCED_PATHS},
    }
    skipped = {}
    need = einsum_footprint(cfg, capacity)
    if "einsum" in impls and need > EINSUM_LIMIT_BYTES:
        skipped["einsum"] = f"one-hot [G,T,E,C] tensors need ~{need / 2**30:.1f} GiB"
    modules = {n: makers[n]() for n in ONE_GROUP_IMPLS if n in impls and n not in skipped}
    x = torch.randn(1, cfg.tokens, cfg.d, generator=generator)
    grad = torch.randn(1, cfg.tokens, cfg.d, generator=generator)
    return Setup(cfg, capacity, modules, skipped, x, x.clone().requires_grad_(), grad)


def run_fwd(module: nn.Module, setup: Setup) -> None:
    module.eval()
    with torch.inference_mode():
        module(setup.x)


def run_fwd_bwd(module: nn.Module, setup: Setup) -> None:
    module.train()
    y = module(setup.x_grad)
    y.backward(setup.grad)


RUNNERS: dict[str, Callable[[nn.Module, Setup], None]] = {"fwd": run_fwd, "fwd+bwd": run_fwd_bwd}


def verify_setup(setup: Setup) -> None:
    """Eval outputs of every MoE implementation equal moeify's (raises otherwise)."""
    outputs = {}
    with torch.inference_mode():
        for name, module in setup.modules.items():
            if name != "dense":
                module.eval()
                outputs[name] = module(setup.x)
    check_equivalence(outputs, TOLERANCES["fp32"], where=f"on {setup.cfg.key}")


def peak_memory_fwd_bwd(module: nn.Module, setup: Setup) -> float:
    """Peak bytes allocated during one fwd+bwd (see the module docstring)."""
    reset_module(module, setup.x_grad)
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_fwd_bwd(module, setup)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    reset_module(module, setup.x_grad)
    return float(peak)


def bench_setup(setup: Setup, policy: RepeatPolicy) -> dict:
    steps = {mode: {name: (lambda m=module, r=runner: r(m, setup))
                    for name, module in setup.modules.items()}
             for mode, runner in RUNNERS.items()}
    repeats, times = time_steps(
        steps, lambda name: reset_module(setup.modules[name], setup.x_grad), policy,
        torch.device("cpu"))
    memory = {name: peak_memory_fwd_bwd(m, setup) for name, m in setup.modules.items()}
    return {"repeats": repeats, "times_s": times, "peak_bytes": memory}


def matmul_samples(n: int = 4096, runs: int = 5) -> list[float]:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warmup
    return [2 * n**3 / timed(lambda: a @ b) for _ in range(runs)]


def copy_samples(size_bytes: int = 512 * MiB, runs: int = 7) -> list[float]:
    src = torch.randn(size_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warmup, and touches every page of dst
    return [2 * size_bytes / timed(lambda: dst.copy_(src)) for _ in range(runs)]


def roofline(cfg: Config, matmul_rate: float, copy_rate: float) -> dict[str, dict[str, float]]:
    """FLOPs, bytes and floor seconds per mode (formulas in the module docstring)."""
    N, d, f, E = cfg.tokens, cfg.d, cfg.f, cfg.experts
    flops = 2 * 2 * N * d * f + 2 * N * d * E
    expert_weights = 4 * E * 2 * d * f
    nbytes = 4 * N * (2 * d + 2 * f) + expert_weights + 4 * E * d
    out = {}
    modes = (("fwd", flops, nbytes), ("fwd+bwd", 3 * flops, 2 * nbytes + expert_weights))
    for mode, fl, by in modes:
        out[mode] = {"flops": fl, "bytes": by, "floor_s": max(fl / matmul_rate, by / copy_rate)}
    return out


def median_ms(result: dict, mode: str, impl: str) -> float | None:
    samples = result["times_s"][mode].get(impl)
    return 1e3 * Stat.of(samples).median if samples else None


def fmt_ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.2f}"


def fmt_mb(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / MiB:.1f}" if value < 10 * MiB else f"{value / MiB:.0f}"


def one_group_header(ceilings: dict) -> list[str]:
    return [
        "# moeify Switch layer benchmark: one group holding every token (CPU, fp32)",
        "",
        f"- matmul ceiling: {ceilings['matmul_rate'] / 1e9:.1f} GFLOP/s (median, fp32 "
        f"4096x4096 @ 4096x4096; start/end medians {ceilings['matmul_start'] / 1e9:.1f} / "
        f"{ceilings['matmul_end'] / 1e9:.1f})",
        f"- copy ceiling: {ceilings['copy_rate'] / 1e9:.1f} GB/s (median, 512 MiB "
        f"`dst.copy_(src)` counted as 2x size; start/end medians "
        f"{ceilings['copy_start'] / 1e9:.1f} / {ceilings['copy_end'] / 1e9:.1f})",
        "- layout: ONE group per forward, input [G=1, T=tokens, d] (a group is the whole "
        "batch of tokens, like Mesh-TF group_size); C = ceil(cf * T / E) slots per expert; "
        "no residual add",
        "- fwd: eval mode under torch.inference_mode(); fwd+bwd: train mode, "
        "y.backward(fixed random grad), x.requires_grad; ms = median over the interleaved "
        "repeats (n), one run",
        f"- impls: moeify = SwitchFFN as users get it (DispatchPath.AUTO); {', '.join(FORCED)} "
        "= the same layer forced onto one path; dense = Linear-ReLU-Linear; hf = transformers "
        "SwitchTransformersSparseMLP; einsum = one-hot [G,T,E,C] dispatch/combine",
        "- floor = max(FLOPs / matmul ceiling, bytes / copy ceiling); fwd FLOPs = 4*N*d*f + "
        "2*N*d*E; fwd bytes = 4*N*(2d+2f) + 4*E*2*d*f + 4*E*d; fwd+bwd FLOPs = 3x fwd, "
        "bytes = 2x fwd + 4*E*2*d*f; 'x floor' = moeify time / floor",
        "- peak MB: bytes allocated during one fwd+bwd above what existed before (weights, x, "
        "grad), from torch.profiler(profile_memory=True) allocator events (running sum, max)",
        "",
    ]


def one_group_tables(records: list[dict], impls: Sequence[str]) -> list[str]:
    """One time table per mode, then one peak-memory table."""
    key_cols = ["d", "f", "tokens", "E", "cf", "C"]

    def key_cells(rec: dict) -> list:
        cfg = rec["config"]
        return [cfg["d"], cfg["f"], cfg["tokens"], cfg["experts"], cfg["cf"], rec["capacity"]]

    lines = []
    for mode in MODES:
        columns = key_cols + ["n"] + [f"{impl} ms" for impl in impls] + [
            "floor ms", "moeify/dense", "moeify/hf", "moeify x floor"]
        rows = []
        for rec in records:
            res = rec["result"]
            ms = {impl: median_ms(res, mode, impl) for impl in impls}
            floor_ms = 1e3 * rec["roofline"][mode]["floor_s"]
            rows.append(key_cells(rec) + [res["repeats"]] + [fmt_ms(ms[i]) for i in impls] + [
                fmt_ms(floor_ms), fmt_ratio(ms["moeify"], ms.get("dense")),
                fmt_ratio(ms["moeify"], ms.get("hf")), fmt_ratio(ms["moeify"], floor_ms)])
        lines += [f"### {mode} (median ms)", ""] + markdown_table(columns, rows) + [""]
    columns = key_cols + [f"{impl} MB" for impl in impls]
    rows = [key_cells(rec) + [fmt_mb(rec["result"]["peak_bytes"].get(i)) for i in impls]
            for rec in records]
    return lines + ["### peak memory of one fwd+bwd (MB)", ""] + markdown_table(columns, rows)


def one_group_summary(records: list[dict]) -> list[str]:
    """Evaluate the one-group targets; PASS/FAIL lines with the measured numbers."""
    by_cfg = {Config(**r["config"]): r for r in records}
    token_counts = sorted({c.tokens for c in by_cfg})
    largest = token_counts[-1]
    previous = token_counts[-2] if len(token_counts) > 1 else None
    lines = ["## Targets (one group)", ""]

    def ms(rec: dict, mode: str, impl: str) -> float | None:
        return median_ms(rec["result"], mode, impl)

    def label(c: Config) -> str:
        return f"d={c.d} f={c.f} T={c.tokens} E={c.experts} cf={c.cf}"

    def have(*impls: str) -> bool:
        return all(ms(r, "fwd", i) is not None for r in by_cfg.values() for i in impls)

    # 1. close to dense at 8 experts, the largest token count, factor 1.25
    limits = {"fwd": 1.15, "fwd+bwd": 1.20}
    chosen = [c for c in by_cfg if c.experts == 8 and c.tokens == largest and c.cf == 1.25]
    if not chosen or not have("dense"):
        lines.append("- [n/a] moeify vs dense at E=8, cf=1.25: not measured")
    for c in chosen if have("dense") else []:
        rec = by_cfg[c]
        parts, ok = [], True
        for mode, limit in limits.items():
            ratio = ms(rec, mode, "moeify") / ms(rec, mode, "dense")
            ok &= ratio <= limit
            parts.append(f"{mode} {ratio:.3f}x (<= {limit:.2f}x)")
        lines.append(f"- [{verdict(ok)}] moeify / dense at {label(c)}: " + ", ".join(parts))

    # 2. faster than HF's SparseMLP in fwd+bwd everywhere; fwd never > 5% slower
    if have("hf"):
        fb = {c: ms(r, "fwd+bwd", "moeify") / ms(r, "fwd+bwd", "hf") for c, r in by_cfg.items()}
        fw = {c: ms(r, "fwd", "moeify") / ms(r, "fwd", "hf") for c, r in by_cfg.items()}
        worst_fb, worst_fw = max(fb, key=fb.get), max(fw, key=fw.get)
        lines.append(
            f"- [{verdict(fb[worst_fb] < 1.0)}] fwd+bwd faster than HF in every configuration: "
            f"{sum(v < 1.0 for v in fb.values())}/{len(fb)} faster; worst moeify/hf "
            f"{fb[worst_fb]:.3f}x at {label(worst_fb)}; best {min(fb.values()):.3f}x")
        lines.append(
            f"- [{verdict(fw[worst_fw] <= 1.05)}] fwd never more than 5% slower than HF: worst "
            f"moeify/hf {fw[worst_fw]:.3f}x at {label(worst_fw)}; best {min(fw.values()):.3f}x")
    else:
        lines.append("- [n/a] moeify vs HF: hf not measured")

    # 3. roofline
    frac = {(c, m): ms(r, m, "moeify") / (1e3 * r["roofline"][m]["floor_s"])
            for c, r in by_cfg.items() for m in MODES}
    for scope, limit, keys in (
        (f"at {largest} tokens", 1.6, [k for k in frac if k[0].tokens == largest]),
        ("everywhere", 2.5, list(frac)),
    ):
        worst = max(keys, key=frac.get)
        n_ok = sum(frac[k] <= limit for k in keys)
        lines.append(
            f"- [{verdict(n_ok == len(keys))}] moeify within {limit}x of the floor {scope}: "
            f"{n_ok}/{len(keys)} (config, mode) pairs; worst {frac[worst]:.2f}x "
            f"({worst[1]}, {label(worst[0])})")

    # 4. linear growth from the second-largest to the largest token count
    if previous is None:
        lines.append("- [n/a] linear growth: the grid has one token count")
        return lines
    limit = 1.1 * largest / previous
    growth_rows, ok_all = [], True
    for c in sorted(by_cfg, key=lambda c: (c.d, c.experts, -c.cf)):
        small = by_cfg.get(dataclasses.replace(c, tokens=previous))
        if c.tokens != largest or small is None:
            continue
        big = by_cfg[c]
        cells = []
        for mode in MODES:
            r_moe = ms(big, mode, "moeify") / ms(small, mode, "moeify")
            ok_all &= r_moe <= limit
            growth = {i: fmt_ratio(ms(big, mode, i), ms(small, mode, i))
                      for i in ("dense", "einsum")}
            cells.append(f"{mode} {r_moe:.2f}x (dense {growth['dense']}x, "
                         f"einsum {growth['einsum']}x)")
        m_big, m_small = big["result"]["peak_bytes"], small["result"]["peak_bytes"]
        r_mem = m_big["moeify"] / m_small["moeify"]
        ok_all &= r_mem <= limit
        cells.append(f"memory {r_mem:.2f}x (einsum "
                     f"{fmt_ratio(m_big.get('einsum'), m_small.get('einsum'))}x)")
        growth_rows.append(f"  - d={c.d} E={c.experts} cf={c.cf}: " + ", ".join(cells))
    lines.append(
        f"- [{verdict(ok_all)}] linear growth, moeify time and peak memory at {largest} vs "
        f"{previous} tokens <= {limit:.2f}x in every configuration:")
    return lines + growth_rows


def run_one_group(args: argparse.Namespace) -> dict:
    impls = [i for i in ONE_GROUP_IMPLS if i in args.impls_one_group]
    grid = [c for c in one_group_grid(args.quick)
            if (not args.tokens or c.tokens in args.tokens)
            and (not args.experts or c.experts in args.experts)
            and (not args.dims or (c.d, c.f) in args.dims)]
    if not grid:
        raise SystemExit("the filters leave no one-group configuration")
    policy = args.one_group_policy
    log("measuring ceilings ...")
    matmul_start, copy_start = matmul_samples(), copy_samples()
    records = []
    start = time.perf_counter()
    for i, cfg in enumerate(grid, 1):
        gc.collect()
        setup = make_setup(cfg, args.seed, impls)
        verify_setup(setup)
        result = bench_setup(setup, policy)
        result["skipped"] = setup.skipped
        records.append({"config": dataclasses.asdict(cfg), "capacity": setup.capacity,
                        "result": result})
        log(f"[one-group {i}/{len(grid)}] {cfg.key} C={setup.capacity} n={result['repeats']} "
            f"moeify fwd {fmt_ms(median_ms(result, 'fwd', 'moeify'))} ms, fwd+bwd "
            f"{fmt_ms(median_ms(result, 'fwd+bwd', 'moeify'))} ms "
            f"({time.perf_counter() - start:.0f} s)")
        del setup
    gc.collect()
    log("measuring ceilings again ...")
    matmul_end, copy_end = matmul_samples(), copy_samples()
    ceilings = {
        "matmul_rate": Stat.of(matmul_start + matmul_end).median,
        "copy_rate": Stat.of(copy_start + copy_end).median,
        "matmul_start": Stat.of(matmul_start).median,
        "matmul_end": Stat.of(matmul_end).median,
        "copy_start": Stat.of(copy_start).median,
        "copy_end": Stat.of(copy_end).median,
    }
    for rec in records:
        rec["roofline"] = roofline(Config(**rec["config"]), ceilings["matmul_rate"],
                                   ceilings["copy_rate"])
    lines = (one_group_header(ceilings) + one_group_tables(records, impls) + [""]
             + one_group_summary(records))
    skipped = {f"{r['config']} {impl}": why for r in records
               for impl, why in r["result"]["skipped"].items()}
    if skipped:
        lines += ["", "Skipped:"] + [f"- {k}: {v}" for k, v in skipped.items()]
    return {
        "lines": lines,
        "seconds": time.perf_counter() - start,
        "json": {"impls": impls, "layout": "G=1, T=tokens", "ceilings": ceilings,
                 "ceiling_samples": {"matmul_flops_per_s": matmul_start + matmul_end,
                                     "copy_bytes_per_s": copy_start + copy_end},
                 "records": records},
    }


# -------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The method is described in this file's module docstring.")
    parser.add_argument("--section", choices=("batched", "one-group", "all"), default="batched",
                        help="batched sequences with one group per sequence (default), the "
                             "earlier one-group grid with roofline and memory, or both")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke grids, 1 run, 2 repeats (batched: d,f=64,256, E=8, "
                             "4x64 and 2x128; one-group: d,f=128,512, T 256/1024)")
    parser.add_argument("--runs", type=int, default=None,
                        help="times the whole batched grid is run (default 3; --quick: 1)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="exact number of interleaved repeats per point (default: "
                             "adaptive, see --budget)")
    parser.add_argument("--budget", type=float, default=None,
                        help="after the minimum repeats (3 batched, 5 one-group), repeat "
                             "while a point's timed repeats took less than this many seconds "
                             "(default 8 batched, 6 one-group)")
    parser.add_argument("--max-repeats", type=int, default=30,
                        help="cap on adaptive repeats (default 30)")
    parser.add_argument("--batch-seq", type=parse_pair, nargs="+", metavar="BxS",
                        help="only these (batch x seq) points, e.g. 8x512 32x128")
    parser.add_argument("--dims", type=parse_pair, nargs="+", metavar="DxF",
                        help="only these (d_model x d_ff), e.g. 768x3072")
    parser.add_argument("--experts", type=int, nargs="+", help="only these expert counts")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS,
                        help="default: all three on cpu; bf16-autocast bf16-weights on cuda")
    parser.add_argument("--impls", nargs="+", choices=sorted({*BATCHED_IMPLS, *ONE_GROUP_IMPLS}),
                        help="only these implementations (moeify, the reference, always runs)")
    parser.add_argument("--tokens", type=int, nargs="+",
                        help="one-group section: only these token counts")
    parser.add_argument("--max-load", type=float, default=0.5,
                        help="wait while the 1-minute load average is above this (default 0.5)")
    parser.add_argument("--wait", type=float, default=300,
                        help="seconds to wait at most for --max-load (default 300), then run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the markdown report to this path")
    parser.add_argument("--json", help="dump raw results (every sample) to this path")
    parser.add_argument("--no-thp", action="store_true",
                        help="CPU: leave THP_MEM_ALLOC_ENABLE unset (read before torch loads)")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.tokens and args.section == "batched":
        parser.error("--tokens filters the one-group section: add --section one-group")
    if args.device == "cuda" and args.section != "batched":
        parser.error("the one-group section measures CPU ceilings: use --section batched")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if args.precisions is None:
        args.precisions = list(CUDA_PRECISIONS if args.device == "cuda" else PRECISIONS)
    chosen = set(args.impls or ()) | {"moeify"}
    args.impls_batched = [i for i in BATCHED_IMPLS if not args.impls or i in chosen]
    args.impls_one_group = [i for i in ONE_GROUP_IMPLS if not args.impls or i in chosen]
    args.policy = repeat_policy(args, min_repeats=3, budget=8.0)
    args.one_group_policy = repeat_policy(args, min_repeats=5, budget=6.0)
    return args


def repeat_policy(args: argparse.Namespace, *, min_repeats: int, budget: float) -> RepeatPolicy:
    warmups = 3 if args.device == "cuda" else 1
    if args.repeats is not None:
        return RepeatPolicy(args.repeats, args.repeats, 0.0, warmups)
    if args.quick:
        return RepeatPolicy(2, 2, 0.0, warmups)
    return RepeatPolicy(min_repeats, max(min_repeats, args.max_repeats),
                        budget if args.budget is None else args.budget, warmups)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(CPU_THREADS)
    load_info = wait_for_quiet(args.max_load, args.wait)
    start = time.perf_counter()
    sections = {}
    if args.section in ("batched", "all"):
        sections["batched"] = run_batched(args, device, load_info)
    if args.section in ("one-group", "all"):
        sections["one_group"] = run_one_group(args)
    lines = []
    for name, section in sections.items():
        if name == "one_group" and "batched" not in sections:
            lines += environment_lines(args, device, load_info) + [""]
        lines += section["lines"] + ["", f"Section time: {section['seconds']:.0f} s", ""]
    end_load = os.getloadavg()
    total = time.perf_counter() - start
    lines += [f"Load average (1 / 5 / 15 min) at the end: {fmt_load(end_load)}",
              f"Total benchmark time: {total:.0f} s ({total / 60:.1f} min)"]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report)
    if args.json:
        meta: dict[str, Any] = {
            "command": command_line(args.argv), "argv": args.argv,
            "torch": torch.__version__, "python": platform.python_version(),
            "device": device_name(device), "threads": torch.get_num_threads(),
            "thp": os.environ.get("THP_MEM_ALLOC_ENABLE"), "runs": args.runs,
            "policy": dataclasses.asdict(args.policy), "load_start": load_info,
            "load_end": list(end_load), "total_s": total,
            "forced_paths": list(FORCED),
        }
        payload = {"meta": meta, **{name: s["json"] for name, s in sections.items()}}
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
