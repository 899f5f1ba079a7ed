"""Benchmark moeify's Switch layer on CPU against the dense FFN, HF's SparseMLP and a
one-hot einsum dispatch, and compare it with this machine's roofline floor.

Implementations (all fp32, the same weights, the same routing and expert capacity C):

* ``moeify``  `moeify.SwitchFFN`, default eager dispatch (``DispatchPath.SORTED``)
* ``padded``  the same layer with ``DispatchPath.PADDED`` (static ``[E, G*C, d]`` buffers)
* ``dense``   the dense FFN with the same d, f and tokens (``Linear -> ReLU -> Linear``)
* ``hf``      ``transformers``' ``SwitchTransformersSparseMLP`` with copied weights
* ``einsum``  GShard / Mesh-TF style one-hot ``[G, T, E, C]`` dispatch and combine tensors

Tokens are laid out as ONE group: input ``[G=1, T=tokens, d]`` (a group is the whole
batch of tokens, like Mesh-TF's ``group_size``); the capacity is per group, so HF, which
routes per sequence with an absolute capacity, computes the same function (checked per
configuration with ``torch.allclose`` on eval outputs, atol 1e-4).

Modes: "fwd" is the eval-mode forward under ``torch.inference_mode()``; "fwd+bwd" is the
train-mode ``y = impl(x); y.backward(grad)`` with a fixed random ``grad`` and
``x.requires_grad=True`` (input and weight gradients), gradients reset to None between
runs. Expert dropout and router jitter are 0 and ``eval_capacity_factor ==
capacity_factor``, so both modes compute the same routing with the same C. Each repeat
runs every implementation once in turn (the starting implementation rotates); the table
reports medians.

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
from the start of the forward to the end of the backward: every byte allocated during
the step (activations, saved tensors, temporaries, gradients of x and of the weights),
excluding the weights, x and grad that exist before it.

Usage::

    python benchmarks/bench_layer.py                  # full grid (~20-25 min on 2 cores)
    python benchmarks/bench_layer.py --quick          # tiny smoke grid
    python benchmarks/bench_layer.py --out table.md --json raw.json
"""

from __future__ import annotations

import os
import sys

# PyTorch's CPU allocator backs large tensors with transparent huge pages when this is set
# before torch allocates anything. Fresh gradient buffers then cost a few hundred page
# faults instead of tens of thousands per step (see BENCHMARKS.md); --no-thp measures
# without it. Every implementation runs under the same setting.
if "--no-thp" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import dataclasses
import gc
import itertools
import json
import math
import platform
import shlex
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from moeify import DenseFFNWeights, MoEConfig, SwitchFFN
from moeify.switch import DispatchPath

THREADS = 2
IMPLS = ("moeify", "sorted", "padded", "dense", "hf", "einsum")
MODES = ("fwd", "fwd+bwd")
MiB = 2**20
EINSUM_LIMIT_BYTES = 6 * 2**30  # skip the one-hot einsum above this estimated footprint


# --------------------------------------------------------------------------- grid


@dataclasses.dataclass(frozen=True)
class Config:
    d: int
    f: int
    tokens: int
    experts: int
    cf: float

    @property
    def key(self) -> str:
        return f"d{self.d}_f{self.f}_T{self.tokens}_E{self.experts}_cf{self.cf}"


def full_grid() -> list[Config]:
    return [
        Config(d, f, tokens, experts, cf)
        for (d, f), tokens, experts, cf in itertools.product(
            [(512, 2048), (768, 3072)], [512, 2048, 8192], [8, 64], [1.25, 1.0]
        )
    ]


def quick_grid() -> list[Config]:
    return [Config(128, 512, tokens, 8, 1.25) for tokens in (256, 1024)]


# ------------------------------------------------------------------ implementations


def build_moeify(cfg: Config, generator: torch.Generator) -> tuple[SwitchFFN, DenseFFNWeights]:
    """The Switch layer upcycled from a random dense FFN, then given distinct experts and
    a router at realistic scale (upcycled experts are identical and the new router is
    tiny, which would make the routing uniform-random)."""
    d, f = cfg.d, cfg.f
    dense = DenseFFNWeights(
        w_in=torch.randn(d, f, generator=generator) / math.sqrt(d),
        w_out=torch.randn(f, d, generator=generator) / math.sqrt(f),
    )
    moe_cfg = MoEConfig(
        num_experts=cfg.experts, capacity_factor=cfg.cf, eval_capacity_factor=cfg.cf,
        expert_dropout=0.0, jitter_eps=0.0, min_capacity=1,
    )
    layer = SwitchFFN.from_dense(dense, moe_cfg, seq_len=cfg.tokens)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1 / math.sqrt(d), generator=generator)
        layer.experts.w_in.normal_(0.0, 1 / math.sqrt(d), generator=generator)
        layer.experts.w_out.normal_(0.0, 1 / math.sqrt(f), generator=generator)
    return layer, dense


class Forced(nn.Module):
    """The moeify layer (same module, same parameters) run on one forced dispatch path."""

    def __init__(self, layer: SwitchFFN, path: DispatchPath) -> None:
        super().__init__()
        self.layer = layer
        self.path = path

    def forward(self, x: Tensor) -> Tensor:
        self.layer.dispatch_path = self.path
        try:
            return self.layer(x)
        finally:
            self.layer.dispatch_path = DispatchPath.AUTO


def build_dense(dense: DenseFFNWeights) -> nn.Module:
    d, f = dense.w_in.shape
    ffn = nn.Sequential(nn.Linear(d, f, bias=False), nn.ReLU(), nn.Linear(f, d, bias=False))
    with torch.no_grad():
        ffn[0].weight.copy_(dense.w_in.T)
        ffn[2].weight.copy_(dense.w_out.T)
    return ffn


def build_hf(layer: SwitchFFN) -> nn.Module:
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP,
    )

    E = layer.config.num_experts
    config = SwitchTransformersConfig(
        d_model=layer.d_model, d_ff=layer.d_ff, num_experts=E,
        expert_capacity=layer.expert_capacity, router_jitter_noise=0.0, dropout_rate=0.0,
        dense_act_fn="relu", router_bias=False,
    )
    mlp = SwitchTransformersSparseMLP(config)
    with torch.no_grad():
        mlp.router.classifier.weight.copy_(layer.router.weight)
        for e in range(E):
            expert = mlp.experts[f"expert_{e}"]
            expert.wi.weight.copy_(layer.experts.w_in[e].T)
            expert.wo.weight.copy_(layer.experts.w_out[e].T)
    return mlp


class OneHotEinsum(nn.Module):
    """GShard / Mesh-TF / DeepSpeed style top-1 layer: one-hot ``[G, T, E, C]`` dispatch and
    combine tensors contracted with einsum. Shares the moeify layer's Parameters.

    Same routing as moeify: argmax of ``softmax(x @ router.T)``, slots claimed in token
    order (cumsum priority over the group), tokens beyond capacity C dropped (output 0),
    combine weight = the chosen expert's probability.
    """

    def __init__(self, layer: SwitchFFN) -> None:
        super().__init__()
        self.router_weight = layer.router.weight  # [E, d]
        self.w_in = layer.experts.w_in  # [E, d, f]
        self.w_out = layer.experts.w_out  # [E, f, d]
        self.layer = layer  # for the capacity of the current mode

    def forward(self, x: Tensor) -> Tensor:  # [G, T, d]
        E, C = self.router_weight.shape[0], self.layer.expert_capacity
        G, T, d = x.shape
        probs = torch.softmax(F.linear(x, self.router_weight), dim=-1)  # [G, T, E]
        gate, index = probs.max(dim=-1)  # [G, T]
        expert_mask = F.one_hot(index, E)  # [G, T, E]
        position = (expert_mask.cumsum(dim=1) * expert_mask).sum(-1) - 1  # [G, T]
        kept = position < C
        expert_mask = (expert_mask * kept.unsqueeze(-1)).to(x.dtype)
        slot_mask = F.one_hot(torch.where(kept, position, 0), C).to(x.dtype)  # [G, T, C]
        dispatch = expert_mask.unsqueeze(-1) * slot_mask.unsqueeze(-2)  # [G, T, E, C]
        combine = dispatch * gate.unsqueeze(-1).unsqueeze(-1).to(x.dtype)
        dispatched = torch.einsum("gtec,gtd->egcd", dispatch, x).reshape(E, G * C, d)
        hidden = torch.relu(torch.bmm(dispatched, self.w_in))
        expert_out = torch.bmm(hidden, self.w_out).reshape(E, G, C, d)
        return torch.einsum("gtec,egcd->gtd", combine, expert_out)


def einsum_footprint(cfg: Config, capacity: int) -> int:
    """Rough bytes the one-hot path needs: dispatch, combine, their gradient and the
    einsum operands' contiguous copies, about six [G, T, E, C] fp32 tensors."""
    return 6 * 4 * cfg.tokens * cfg.experts * capacity


# ------------------------------------------------------------------------- running


@dataclasses.dataclass
class Setup:
    cfg: Config
    capacity: int
    modules: dict[str, nn.Module]
    skipped: dict[str, str]  # impl -> why
    x: Tensor  # [1, T, d]
    x_grad: Tensor  # x with requires_grad, for fwd+bwd
    grad: Tensor  # fixed output gradient


def make_setup(cfg: Config, seed: int) -> Setup:
    generator = torch.Generator().manual_seed(seed)
    layer, dense = build_moeify(cfg, generator)
    capacity = layer.expert_capacity
    modules: dict[str, nn.Module] = {
        "moeify": layer,
        "dense": build_dense(dense),
        "hf": build_hf(layer),
        "einsum": OneHotEinsum(layer),
        "sorted": Forced(layer, DispatchPath.SORTED),
        "padded": Forced(layer, DispatchPath.PADDED),
    }
    skipped = {}
    need = einsum_footprint(cfg, capacity)
    if need > EINSUM_LIMIT_BYTES:
        skipped["einsum"] = f"one-hot [G,T,E,C] tensors need ~{need / 2**30:.1f} GiB"
        del modules["einsum"]
    x = torch.randn(1, cfg.tokens, cfg.d, generator=generator)
    grad = torch.randn(1, cfg.tokens, cfg.d, generator=generator)
    return Setup(cfg, capacity, modules, skipped, x, x.clone().requires_grad_(), grad)


def reset(module: nn.Module, x: Tensor) -> None:
    for p in module.parameters():
        p.grad = None
    x.grad = None
    for m in module.modules():
        if isinstance(m, SwitchFFN):
            m.last_routing = None


def run_fwd(module: nn.Module, setup: Setup) -> None:
    module.eval()
    with torch.inference_mode():
        module(setup.x)


def run_fwd_bwd(module: nn.Module, setup: Setup) -> None:
    module.train()
    y = module(setup.x_grad)
    y.backward(setup.grad)


RUNNERS: dict[str, Callable[[nn.Module, Setup], None]] = {"fwd": run_fwd, "fwd+bwd": run_fwd_bwd}


def timed(fn: Callable[[], None]) -> float:
    """Seconds one call takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def check_equivalence(setup: Setup) -> list[str]:
    """Eval outputs of every MoE implementation against moeify's; warnings for mismatches."""
    outputs = {}
    for name, module in setup.modules.items():
        if name == "dense":
            continue
        module.eval()
        with torch.inference_mode():
            outputs[name] = module(setup.x)
    warnings = []
    for name, out in outputs.items():
        if name != "moeify" and not torch.allclose(out, outputs["moeify"], atol=1e-4):
            diff = (out - outputs["moeify"]).abs().max().item()
            warnings.append(f"{name} differs from moeify on {setup.cfg.key}: max |diff| {diff:.3g}")
    return warnings


def peak_memory_fwd_bwd(module: nn.Module, setup: Setup) -> float:
    """Peak bytes allocated during one fwd+bwd (see the module docstring)."""
    reset(module, setup.x_grad)
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_fwd_bwd(module, setup)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    reset(module, setup.x_grad)
    return float(peak)


def bench_config(setup: Setup, *, min_repeats: int, max_repeats: int, budget_s: float) -> dict:
    names = list(setup.modules)
    times: dict[str, dict[str, list[float]]] = {m: {n: [] for n in names} for m in MODES}
    for mode, name in itertools.product(MODES, names):  # warmup
        reset(setup.modules[name], setup.x_grad)
        RUNNERS[mode](setup.modules[name], setup)
    start = time.perf_counter()
    repeat = 0
    while repeat < min_repeats or (
        repeat < max_repeats and time.perf_counter() - start < budget_s
    ):
        order = names[repeat % len(names):] + names[: repeat % len(names)]  # rotate
        for mode in MODES:
            for name in order:
                module = setup.modules[name]
                reset(module, setup.x_grad)
                times[mode][name].append(timed(lambda: RUNNERS[mode](module, setup)))
        repeat += 1
    memory = {name: peak_memory_fwd_bwd(setup.modules[name], setup) for name in names}
    return {"repeats": repeat, "times_s": times, "peak_bytes": memory}


# ---------------------------------------------------------------------- ceilings


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
    for mode, fl, by in (("fwd", flops, nbytes), ("fwd+bwd", 3 * flops, 2 * nbytes + expert_weights)):
        out[mode] = {"flops": fl, "bytes": by, "floor_s": max(fl / matmul_rate, by / copy_rate)}
    return out


# ------------------------------------------------------------------------ report


def median_ms(result: dict, mode: str, impl: str) -> float | None:
    samples = result["times_s"][mode].get(impl)
    return 1e3 * statistics.median(samples) if samples else None


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def fmt_ratio(a: float | None, b: float | None, suffix: str = "") -> str:
    return "n/a" if a is None or b is None else f"{a / b:.2f}{suffix}"


def fmt_mb(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / MiB:.1f}" if value < 10 * MiB else f"{value / MiB:.0f}"


def header_lines(args: argparse.Namespace, ceilings: dict) -> list[str]:
    return [
        "# moeify Switch layer benchmark (CPU, fp32)",
        "",
        f"- command: `{shlex.join(['python', *sys.argv])}` (run from the repository root)",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"python {platform.python_version()}, {platform.processor() or platform.machine()}",
        f"- matmul ceiling: {ceilings['matmul_rate'] / 1e9:.1f} GFLOP/s (median, fp32 "
        f"4096x4096 @ 4096x4096; start/end medians {ceilings['matmul_start'] / 1e9:.1f} / "
        f"{ceilings['matmul_end'] / 1e9:.1f})",
        f"- copy ceiling: {ceilings['copy_rate'] / 1e9:.1f} GB/s (median, 512 MiB "
        f"`dst.copy_(src)` counted as 2x size; start/end medians "
        f"{ceilings['copy_start'] / 1e9:.1f} / {ceilings['copy_end'] / 1e9:.1f})",
        "- layout: ONE group per forward, input [G=1, T=tokens, d] (a group is the whole "
        "batch of tokens, like Mesh-TF group_size); C = ceil(cf * T / E) slots per expert",
        "- fwd: eval mode under torch.inference_mode(); fwd+bwd: train mode, "
        "y.backward(fixed random grad), x.requires_grad; ms = median over the interleaved "
        "repeats (n)",
        "- impls: moeify = SwitchFFN as users get it (DispatchPath.AUTO: padded when G*C <= "
        "128 rows per expert, else sorted); sorted / padded = the same layer forced onto one "
        "path; dense = Linear-ReLU-Linear; hf = transformers SwitchTransformersSparseMLP; "
        "einsum = one-hot [G,T,E,C] dispatch/combine",
        f"- THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '(unset)')} "
        "(PyTorch CPU allocator: transparent huge pages for large tensors)",
        "- floor = max(FLOPs / matmul ceiling, bytes / copy ceiling); fwd FLOPs = 4*N*d*f + "
        "2*N*d*E; fwd bytes = 4*N*(2d+2f) + 4*E*2*d*f + 4*E*d; fwd+bwd FLOPs = 3x fwd, "
        "bytes = 2x fwd + 4*E*2*d*f; 'x floor' = moeify time / floor",
        "- peak MB: bytes allocated during one fwd+bwd above what existed before (weights, x, "
        "grad), from torch.profiler(profile_memory=True) allocator events (running sum, max)",
        "",
    ]


def table_lines(records: list[dict]) -> list[str]:
    """One time table per mode, then one peak-memory table."""
    key_cols = ["d", "f", "tokens", "E", "cf", "C"]
    lines = []

    def key_cells(rec: dict) -> list:
        cfg = rec["config"]
        return [cfg["d"], cfg["f"], cfg["tokens"], cfg["experts"], cfg["cf"], rec["capacity"]]

    def table(columns: list[str], rows: list[list]) -> list[str]:
        out = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
        return out + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]

    for mode in MODES:
        columns = key_cols + ["n"] + [f"{impl} ms" for impl in IMPLS] + [
            "floor ms", "moeify/dense", "moeify/hf", "moeify x floor"]
        rows = []
        for rec in records:
            res = rec["result"]
            ms = {impl: median_ms(res, mode, impl) for impl in IMPLS}
            floor_ms = 1e3 * rec["roofline"][mode]["floor_s"]
            rows.append(key_cells(rec) + [res["repeats"]] + [fmt_ms(ms[i]) for i in IMPLS] + [
                fmt_ms(floor_ms), fmt_ratio(ms["moeify"], ms["dense"]),
                fmt_ratio(ms["moeify"], ms["hf"]), fmt_ratio(ms["moeify"], floor_ms)])
        lines += [f"### {mode} (median ms)", ""] + table(columns, rows) + [""]
    columns = key_cols + [f"{impl} MB" for impl in IMPLS]
    rows = [key_cells(rec) + [fmt_mb(rec["result"]["peak_bytes"].get(i)) for i in IMPLS]
            for rec in records]
    lines += ["### peak memory of one fwd+bwd (MB)", ""] + table(columns, rows)
    return lines


def summary_lines(records: list[dict]) -> list[str]:
    """Evaluate the targets; PASS/FAIL lines with the measured numbers."""
    by_cfg = {Config(**r["config"]): r for r in records}
    token_counts = sorted({c.tokens for c in by_cfg})
    largest = token_counts[-1]
    previous = token_counts[-2] if len(token_counts) > 1 else None
    lines = ["## Targets", ""]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    def ms(rec: dict, mode: str, impl: str) -> float | None:
        return median_ms(rec["result"], mode, impl)

    def label(c: Config) -> str:
        return f"d={c.d} f={c.f} T={c.tokens} E={c.experts} cf={c.cf}"

    # 1. close to dense at 8 experts, the largest token count, factor 1.25
    limits = {"fwd": 1.15, "fwd+bwd": 1.20}
    chosen = [c for c in by_cfg if c.experts == 8 and c.tokens == largest and c.cf == 1.25]
    if not chosen:
        lines.append("- [n/a] moeify vs dense at E=8, cf=1.25: no such configuration in the grid")
    for c in chosen:
        rec = by_cfg[c]
        parts, ok = [], True
        for mode, limit in limits.items():
            ratio = ms(rec, mode, "moeify") / ms(rec, mode, "dense")
            ok &= ratio <= limit
            parts.append(f"{mode} {ratio:.3f}x (<= {limit:.2f}x)")
        lines.append(f"- [{verdict(ok)}] moeify / dense at {label(c)}: " + ", ".join(parts))

    # 2. faster than HF's SparseMLP in fwd+bwd everywhere; fwd never > 5% slower
    fb = {c: ms(r, "fwd+bwd", "moeify") / ms(r, "fwd+bwd", "hf") for c, r in by_cfg.items()}
    fw = {c: ms(r, "fwd", "moeify") / ms(r, "fwd", "hf") for c, r in by_cfg.items()}
    worst_fb, worst_fw = max(fb, key=fb.get), max(fw, key=fw.get)
    lines.append(
        f"- [{verdict(fb[worst_fb] < 1.0)}] fwd+bwd faster than HF in every configuration: "
        f"{sum(v < 1.0 for v in fb.values())}/{len(fb)} faster; worst moeify/hf "
        f"{fb[worst_fb]:.3f}x at {label(worst_fb)}; best {min(fb.values()):.3f}x"
    )
    lines.append(
        f"- [{verdict(fw[worst_fw] <= 1.05)}] fwd never more than 5% slower than HF: worst "
        f"moeify/hf {fw[worst_fw]:.3f}x at {label(worst_fw)}; best {min(fw.values()):.3f}x"
    )

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
            f"({worst[1]}, {label(worst[0])})"
        )

    # 4. linear growth from the second-largest to the largest token count
    if previous is None:
        lines.append("- [n/a] linear growth: the grid has one token count")
        return lines
    limit = 1.1 * largest / previous
    growth_rows, ok_all = [], True
    for c in sorted(by_cfg, key=lambda c: (c.d, c.experts, -c.cf)):
        if c.tokens != largest:
            continue
        small = by_cfg.get(dataclasses.replace(c, tokens=previous))
        if small is None:
            continue
        big = by_cfg[c]
        cells = []
        for mode in MODES:
            r_moe = ms(big, mode, "moeify") / ms(small, mode, "moeify")
            ok_all &= r_moe <= limit
            e_big, e_small = ms(big, mode, "einsum"), ms(small, mode, "einsum")
            r_ein = f"{e_big / e_small:.2f}x" if e_big and e_small else "n/a"
            r_dense = ms(big, mode, "dense") / ms(small, mode, "dense")
            cells.append(f"{mode} {r_moe:.2f}x (dense {r_dense:.2f}x, einsum {r_ein})")
        m_big, m_small = big["result"]["peak_bytes"], small["result"]["peak_bytes"]
        r_mem = m_big["moeify"] / m_small["moeify"]
        ok_all &= r_mem <= limit
        e_mem = (f"{m_big['einsum'] / m_small['einsum']:.2f}x"
                 if "einsum" in m_big and "einsum" in m_small else "n/a")
        cells.append(f"memory {r_mem:.2f}x (einsum {e_mem})")
        growth_rows.append(f"  - d={c.d} E={c.experts} cf={c.cf}: " + ", ".join(cells))
    lines.append(
        f"- [{verdict(ok_all)}] linear growth, moeify time and peak memory at {largest} vs "
        f"{previous} tokens <= {limit:.2f}x in every configuration:"
    )
    lines += growth_rows
    return lines


# -------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke grid: d,f=128,512; tokens 256/1024; E=8; cf 1.25; "
                             "3 repeats")
    parser.add_argument("--repeats", type=int, default=None,
                        help="exact number of interleaved repeats per configuration "
                             "(default: adaptive, at least 5, more while --budget lasts)")
    parser.add_argument("--budget", type=float, default=6.0,
                        help="seconds of timed repeats per configuration for the adaptive "
                             "mode (default 6)")
    parser.add_argument("--max-repeats", type=int, default=30,
                        help="cap on adaptive repeats (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the markdown report to this path")
    parser.add_argument("--json", help="dump raw results (every sample) to this path")
    parser.add_argument("--tokens", type=int, nargs="+", help="only these token counts")
    parser.add_argument("--experts", type=int, nargs="+", help="only these expert counts")
    parser.add_argument("--no-thp", action="store_true",
                        help="leave THP_MEM_ALLOC_ENABLE unset (read before torch loads)")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    grid = quick_grid() if args.quick else full_grid()
    grid = [c for c in grid if (not args.tokens or c.tokens in args.tokens)
            and (not args.experts or c.experts in args.experts)]
    if args.repeats is not None:
        min_repeats = max_repeats = args.repeats
    elif args.quick:
        min_repeats = max_repeats = 3
    else:
        min_repeats, max_repeats = 5, max(5, args.max_repeats)

    log("measuring ceilings ...")
    matmul_start, copy_start = matmul_samples(), copy_samples()

    records, warnings = [], []
    run_start = time.perf_counter()
    for i, cfg in enumerate(grid, 1):
        gc.collect()
        setup = make_setup(cfg, args.seed)
        warnings += check_equivalence(setup)
        result = bench_config(setup, min_repeats=min_repeats, max_repeats=max_repeats,
                              budget_s=args.budget)
        result["skipped"] = setup.skipped
        records.append({"config": dataclasses.asdict(cfg), "capacity": setup.capacity,
                        "result": result})
        log(f"[{i}/{len(grid)}] {cfg.key} C={setup.capacity} n={result['repeats']} "
            f"moeify fwd {median_ms(result, 'fwd', 'moeify'):.1f} ms, fwd+bwd "
            f"{median_ms(result, 'fwd+bwd', 'moeify'):.1f} ms "
            f"({time.perf_counter() - run_start:.0f} s elapsed)")
        del setup
    gc.collect()

    log("measuring ceilings again ...")
    matmul_end, copy_end = matmul_samples(), copy_samples()
    ceilings = {
        "matmul_rate": statistics.median(matmul_start + matmul_end),
        "copy_rate": statistics.median(copy_start + copy_end),
        "matmul_start": statistics.median(matmul_start),
        "matmul_end": statistics.median(matmul_end),
        "copy_start": statistics.median(copy_start),
        "copy_end": statistics.median(copy_end),
    }
    for rec in records:
        rec["roofline"] = roofline(Config(**rec["config"]), ceilings["matmul_rate"],
                                   ceilings["copy_rate"])

    lines = header_lines(args, ceilings) + table_lines(records) + [""] + summary_lines(records)
    skipped = {f"{r['config']} {impl}": why for r in records
               for impl, why in r["result"]["skipped"].items()}
    if skipped:
        lines += ["", "Skipped:"] + [f"- {k}: {v}" for k, v in skipped.items()]
    if warnings:
        lines += ["", "WARNINGS (outputs differ):"] + [f"- {w}" for w in warnings]
    lines.append(f"\nTotal benchmark time: {time.perf_counter() - run_start:.0f} s")
    report = "\n".join(lines) + "\n"
    for w in warnings:
        log(f"WARNING: {w}")
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report)
    if args.json:
        meta: dict[str, Any] = {
            "command": [sys.executable, *sys.argv], "torch": torch.__version__,
            "threads": torch.get_num_threads(), "layout": "G=1, T=tokens",
            "ceilings": ceilings,
            "ceiling_samples": {"matmul_flops_per_s": matmul_start + matmul_end,
                                "copy_bytes_per_s": copy_start + copy_end},
            "warnings": warnings,
        }
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "records": records}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
