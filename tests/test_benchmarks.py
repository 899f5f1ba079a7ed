"""The benchmarks: their shared harness gives the right verdicts on known cases, and a quick
run of each benchmark reports verdicts that agree with its own measurements, PASS where
moeify guarantees the target (bytes, memory, static shapes, equivalence)."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moeify.switch import DispatchPath

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
VERDICT = re.compile(r"^- \[(PASS|FAIL|n/a)\] (.+)$", flags=re.M)
BOUND = re.compile(r"^(.+) (\S+) \((<=|>=) (\S+)\)$")  # what `harness.bound` prints


def load(name: str):
    """Import ``benchmarks/NAME.py``. The scripts import each other by name, as their
    directory is first on ``sys.path`` when they run; the environment is left as it was
    (bench_layer sets THP_MEM_ALLOC_ENABLE on import)."""
    before = os.environ.get("THP_MEM_ALLOC_ENABLE")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))
        if before is None:
            os.environ.pop("THP_MEM_ALLOC_ENABLE", None)
        else:
            os.environ["THP_MEM_ALLOC_ENABLE"] = before


def run_benchmark(script: str, *args, timeout: float = 600) -> str:
    """``python benchmarks/SCRIPT ARGS``: its stdout, after asserting it succeeded."""
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *map(str, args)],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def verdicts(out: str) -> dict[str, str]:
    """The report's targets: verdict per target text."""
    return {text: verdict for verdict, text in VERDICT.findall(out)}


def assert_bounds_agree(found: dict[str, str]) -> dict[str, float]:
    """Every ``NAME VALUE (<= LIMIT)`` target's verdict agrees with its printed value (the
    verdict compares the unrounded value: a printed tie may go either way); the values by
    name."""
    values = {}
    for text, verdict in found.items():
        name, value, sign, limit = BOUND.fullmatch(text).groups()
        value, limit = float(value), float(limit)
        within = value <= limit if sign == "<=" else value >= limit
        assert value == limit or within == (verdict == "PASS"), text
        values[name] = value
    return values


def table_rows(out: str, first_cell: str) -> list[list[str]]:
    """The cells of the Markdown table rows whose first cell matches ``first_cell``."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("|")]
    return [r for r in rows if re.fullmatch(first_cell, r[0])]


# ---------------------------------------------------------------------------- harness


def test_harness_passes_a_fast_function_and_fails_a_slow_one():
    h = load("harness")
    times = h.interleave({"fast": lambda: None, "slow": lambda: time.sleep(0.005)},
                         h.RepeatPolicy.fixed(3))
    assert {k: len(v) for k, v in times.items()} == {"fast": 3, "slow": 3}
    fast, slow = (h.Stat.of(times[k]) for k in ("fast", "slow"))
    assert fast.lo <= fast.median <= fast.hi < 0.005 <= slow.lo
    target = h.bound("fast / slow", fast.median / slow.median, 0.5)
    assert target.verdict == "PASS" and target.lines() == ["- [PASS] fast / slow 0.00 (<= 0.5)"]
    assert h.bound("slow / fast", slow.median / fast.median, 0.5).verdict == "FAIL"
    assert h.bound("slow / fast", slow.median / fast.median, 2, at_least=True).verdict == "PASS"
    assert h.Target.check(False, "peak RSS", "3 GiB").lines() == ["- [FAIL] peak RSS: 3 GiB"]


def test_harness_interleaves_rotating_within_groups_each_call_after_its_lead_in():
    h = load("harness")
    order = []
    keys = [("fwd", "a"), ("fwd", "b"), ("bwd", "a"), ("bwd", "b")]
    calls = {key: (lambda key=key: order.append(key)) for key in keys}
    times = h.interleave(calls, h.RepeatPolicy.fixed(2, warmups=1), group=lambda key: key[0],
                         lead_in=True, reset=lambda key: order.append("reset"))
    assert all(len(v) == 2 for v in times.values())
    calls_only = [key for key in order if key != "reset"]
    warmup, first, second = calls_only[:8], calls_only[8:16], calls_only[16:]
    twice = lambda seq: [k for key in seq for k in (key, key)]  # noqa: E731  (lead-in, timed)
    assert warmup == twice(keys)
    assert first == twice(keys)  # the first repeat starts each group at its first key
    assert second == twice([("fwd", "b"), ("fwd", "a"), ("bwd", "b"), ("bwd", "a")])
    assert order[:4] == ["reset", ("fwd", "a"), "reset", ("fwd", "a")]

    # a budget adds repeats while it lasts, never fewer than the minimum
    slow = h.interleave({"x": lambda: time.sleep(0.01)}, h.RepeatPolicy(2, 50, 0.05, 0))
    assert 2 <= len(slow["x"]) <= 6


# ------------------------------------------------------------------------- bench_layer


def expected_layer_impls():
    forced = {p.value for p in DispatchPath if p is not DispatchPath.AUTO}
    return {"dense", "moeify", "hf"} | forced


def test_bench_layer_quick_run_reports_the_verdicts_of_its_own_measurements(tmp_path):
    bl = load("bench_layer")
    out, raw = tmp_path / "table.md", tmp_path / "raw.json"
    stdout = run_benchmark("bench_layer.py", "--quick", "--max-load", "-1", "--wait", "0",
                           "--out", out, "--json", raw)
    report, data = out.read_text(), json.loads(raw.read_text())
    assert report.strip() in stdout
    batched = data["batched"]
    assert set(batched["impls"]) == expected_layer_impls()
    # every implementation computed moeify's function at every point (else it raised)
    compared = expected_layer_impls() - {"dense", "moeify"}
    assert {k: set(v) for k, v in batched["equivalence"].items()} == {
        p["key"]: compared for p in batched["points"]}
    # the verdicts are those of the run's own measurements
    points = [bl.Point(**{k: p[k] for k in ("batch", "seq", "d", "f", "experts", "precision")})
              for p in batched["points"]]
    runs = batched["runs"]
    expected = bl.evaluate_targets(points, bl.summarize(runs), runs)
    assert [(t["name"], t["verdict"]) for t in batched["targets"]] == [
        (t.name, t.verdict) for t in expected]
    assert [line for t in expected for line in t.lines()] == [
        line for line in report.splitlines() if re.match(r"^ *- \[(PASS|FAIL|n/a)\]", line)
        or line.startswith("  - [info]")]
    # the quick grid has no Switch-Base-64 point: exactly those targets are not measured
    for t in expected:
        assert (t.verdict == "n/a") == ("Switch-Base-64" in t.name), t


def test_bench_layer_equivalence_check_raises_when_an_impl_differs():
    bl, impls = load("bench_layer"), load("layer_impls")
    for precision in ("fp32", "bf16-autocast", "bf16-weights"):
        case = bl.build_case(bl.Point(2, 32, 32, 64, 8, precision), bl.BATCHED_IMPLS, seed=0,
                             device=torch.device("cpu"))
        agreements = bl.verify_case(case)
        assert set(agreements) == expected_layer_impls() - {"dense", "moeify"}
    with torch.no_grad():  # HF now computes a different function: every expert changed
        for p in case.ffns["hf"].experts.parameters():
            p.mul_(1.1)
    with pytest.raises(impls.EquivalenceError, match="hf differs from moeify"):
        bl.verify_case(case)

    # a token HF routed differently is left out and counted; too many of them raise
    ref = torch.randn(100, 8)
    out = ref.clone()
    out[0] += 1.0
    rerouted = torch.zeros(100, dtype=torch.bool)
    rerouted[0] = True
    tol = impls.TOLERANCES["bf16"]
    agree = impls.check_equivalence({"moeify": ref, "hf": out}, tol, rerouted={"hf": rerouted})
    assert agree["hf"].rerouted == 1 and agree["hf"].max_abs_diff == 0.0
    with pytest.raises(impls.EquivalenceError, match="differs"):
        impls.check_equivalence({"moeify": ref, "hf": out}, tol)
    with pytest.raises(impls.EquivalenceError, match="routes 1/100 tokens differently"):
        impls.check_equivalence({"moeify": ref, "hf": out}, impls.TOLERANCES["fp32"],
                                rerouted={"hf": rerouted})


def test_bench_layer_targets_and_filters_on_known_numbers():
    bl = load("bench_layer")
    args = bl.parse_args([])
    assert args.runs == 3 and args.precisions == ["fp32", "bf16-autocast", "bf16-weights"]
    assert len(bl.filter_grid(bl.batched_grid(False, args.precisions), args)) == 36
    args = bl.parse_args(["--dims", "768x3072", "--experts", "64", "--batch-seq", "8x512",
                          "--precisions", "fp32", "bf16-weights", "--impls", "hf"])
    grid = bl.filter_grid(bl.batched_grid(False, args.precisions), args)
    assert grid == [bl.Point(8, 512, 768, 3072, 64, p) for p in ("fp32", "bf16-weights")]
    assert args.impls_batched == ["moeify", "hf"]  # moeify, the reference, always runs

    # made-up per-run medians (ms) -> verdicts
    sb = dict(batch=8, seq=512, d=768, f=3072, experts=64)
    ms = {
        bl.Point(**sb, precision="fp32"): {"moeify": 100, "hf": 150, "dense": 90},
        bl.Point(**sb, precision="bf16-autocast"): {"moeify": 100, "hf": 110, "dense": 50},
        bl.Point(**sb, precision="bf16-weights"): {"moeify": 40, "hf": 30, "dense": 20},
        bl.Point(8, 512, 768, 3072, 8, "fp32"): {"moeify": 105, "hf": 120, "dense": 100},
    }

    def record(point, scale):
        times = {impl: [v * scale / 1e3] * 3 for impl, v in ms[point].items()}
        return {"point": {"key": point.key}, "repeats": 3,
                "times_s": {"fwd": times, "fwd+bwd": times}}

    runs = [[record(p, scale) for p in ms] for scale in (1.0, 1.02, 0.99)]
    summary = bl.summarize(runs)
    verdicts = {t.name: t for t in bl.evaluate_targets(list(ms), summary, runs)}
    names = list(verdicts)
    assert len(names) == 8
    assert verdicts[names[0]].verdict == "FAIL"  # bf16-weights: moeify 40 > hf 30
    assert "3/4 points" in verdicts[names[0]].detail
    assert [verdicts[n].verdict for n in names[2:5]] == ["PASS", "FAIL", "PASS"]
    assert verdicts[names[5]].verdict == "PASS" and "1/1 points" in verdicts[names[5]].detail
    assert verdicts[names[7]].verdict == "PASS" and "0.400x" in verdicts[names[7]].detail


def test_bench_layer_refuses_an_hf_that_applies_the_capacity_to_the_whole_batch(monkeypatch):
    """Before transformers 5.18 HF's SparseMLP routed the flattened batch: a different
    layer, so the hf column is refused by version instead of failing the equivalence."""
    from moeify import MoEConfig, SwitchFFN

    impls = load("layer_impls")
    layer = SwitchFFN(8, 16, MoEConfig(num_experts=4), seq_len=8)
    assert isinstance(impls.build_hf(layer), torch.nn.Module)
    # the module object build_hf imports: sys.modules can hold a different one than a name
    # bound by an earlier "import transformers" in this process
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.17.0")
    with pytest.raises(SystemExit, match=r"transformers 5\.17\.0 .*needs transformers >= 5\.18"):
        impls.build_hf(layer)


# ---------------------------------------------------------------------- other benchmarks


def test_bench_weight_streaming_reports_a_rate_per_row_count():
    out = run_benchmark("bench_weight_streaming.py", "--repeats", "1", "--experts", "2")
    rows = table_rows(out, r"512|768")
    assert [(int(r[0]), int(r[2])) for r in rows] == [
        (d, m) for d in (512, 768) for m in (8, 10, 32, 40, 128, 160)]
    assert all(float(r[5]) > 0 for r in rows)  # weight GB/s


def test_bench_dispatch_quick_times_every_kernel_at_every_point():
    out = run_benchmark("bench_dispatch.py", "--quick")
    rows = table_rows(out, r"fp32|bf16-autocast|bf16-weights")
    assert sorted((r[0], r[1], r[4]) for r in rows) == sorted(
        (p, m, n) for p in ("fp32", "bf16-autocast", "bf16-weights")
        for m in ("fwd", "fwd+bwd") for n in ("8", "64"))
    assert all(float(ms) > 0 for r in rows for ms in r[5:8]), rows


@pytest.mark.slow
def test_bench_onnx_verdicts_agree_with_its_numbers_and_quantized_experts_pass():
    out = run_benchmark("bench_onnx.py", "--repeats", "1", "--batches", "1", "--seq-len", "32",
                        "--optimize", "--quantize", "int4", "int8")
    values = assert_bounds_agree(found := verdicts(out))
    assert set(values) == {
        "batch 1: ORT MoE / eager MoE", "batch 1: ORT MoE / ORT dense",
        "batch 1: optimized / ORT MoE", "batch 1: int4 experts / ORT MoE",
        "int4 experts: expert weight bytes / float32",
        "int8 experts: expert weight bytes / float32",
        "int4 experts: min sentence cosine", "int8 experts: min sentence cosine"}
    # what the quantizer guarantees, whatever the machine's load: 4 / 8 bits per expert
    # weight (plus scales), and sentence embeddings close to float32's
    for text, verdict in found.items():
        if "bytes" in text or "cosine" in text:
            assert verdict == "PASS", text
    # the verdicts quote the table's ratios
    (row,) = table_rows(out, r"\d+")[:1]
    assert values["batch 1: ORT MoE / eager MoE"] == float(row[4])
    assert values["batch 1: ORT MoE / ORT dense"] == float(row[5])


@pytest.mark.slow
def test_bench_onnx_export_streams_and_keeps_static_shapes(tmp_path):
    out = run_benchmark("bench_onnx_export.py", "--model", "t5-small", "--experts", "2",
                        "--seq-len", "16", "--json", tmp_path / "r.json", timeout=900)
    data = json.loads((tmp_path / "r.json").read_text())
    # eval capacity at seq 16: min(16, max(4, ceil(2.0 * 16 / 2))) = 16; strict shape
    # inference finds the static [E, batch, C] = [2, batch, 16]
    assert data["metadata"]["num_experts"] == "2" and data["metadata"]["expert_capacity"] == "16"
    assert data["static_expert_shape"] is True
    # t5-small has 60,506,624 parameters (tied embeddings); 6 of its 12 FFNs (every other
    # one) gain one more 512 x 2048 x 2 expert and a 2 x 512 router: fp32 bytes. Graph +
    # external data hold every MoE weight once (not a second copy of the tied embedding)
    ffn, router = 2 * 512 * 2048, 2 * 512
    assert data["moe_bytes"] == 4 * (60_506_624 + 6 * (ffn + router))
    stored = data["onnx_bytes"] + data["external_data_bytes"]
    assert data["moe_bytes"] <= stored <= 1.05 * data["moe_bytes"], stored
    # both targets pass: streamed from the checkpoint, the export stays near the dense
    # model's memory, and the verdict is the one of the numbers it reports
    rss, limit = data["export_peak_rss_bytes"], data["dense_bytes"] + 2 * 2**30
    assert 0 < rss <= limit
    assert verdicts(out) == {
        f"export peak RSS {rss / 2**30:.2f} GiB <= dense + 2 GiB = {limit / 2**30:.2f} GiB "
        f"(the MoE weights are {data['moe_bytes'] / 2**30:.2f} GiB)": "PASS",
        "strict shape inference gives the static expert shape [E=2, batch, C=16]; "
        "check_model(full_check=True) passed": "PASS"}


@pytest.mark.slow
def test_bench_expert_parallel_exchanges_the_bytes_the_routing_predicts():
    out = run_benchmark("bench_expert_parallel.py", "--steps", "1", timeout=900)
    rows = {r[0]: r[1:] for r in table_rows(out, r"\d process.*")}
    single, world1, two = ("1 process, no expert parallelism",
                           "1 process, expert_parallel (world 1)", "2 processes, expert_parallel")
    assert list(rows) == [single, world1, two]
    # Without expert parallelism nothing is exchanged; with one process the exchange is with
    # itself: no byte leaves it, and the prediction's (W - 1) / W is 0 too.
    assert rows[single][2:] == ["0", "0", "-"] and rows[world1][2:] == ["0", "0", "-"]
    measured, predicted = (float(c.replace(",", "")) for c in rows[two][2:4])
    # Rank 0 has 4 sequences of 128 tokens; each row is d = 256 fp32 = 1 KiB. Measured: whole
    # rows (a median of the two layers may end in half a row), for rank 1's 4 experts, each at
    # most its training capacity ceil(1.25 * 128 / 8) = 20 slots per sequence.
    assert measured % 512 == 0 and 0 < measured <= 4 * 20 * 4 * 1024, measured
    # Predicted: 512 tokens * kept * (2 - 1) / 2 * 1 KiB, and 20/128 <= kept <= 1 (a
    # sequence keeps all its tokens unless some expert fills its 20 slots).
    assert 512 * 20 / 128 / 2 * 1024 <= predicted <= 512 / 2 * 1024, predicted
    # the (dp, ep) layouts: ep = 1 exchanges nothing; ep = 4 sends more than ep = 2
    meshes = {r[0]: r[1:] for r in table_rows(out, r"dp=\d x ep=\d")}
    assert list(meshes) == ["dp=2 x ep=2", "dp=1 x ep=4", "dp=4 x ep=1"]
    assert meshes["dp=4 x ep=1"][1:4] == ["0", "0", "-"]
    job = {k: float(v[4].replace(",", "")) for k, v in meshes.items()}
    assert job["dp=1 x ep=4"] > job["dp=2 x ep=2"] > 0
