"""The benchmark script stays runnable: a one-repeat pass over its smoke grid."""

import functools
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeify.switch import DispatchPath

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_layer.py"


@functools.cache
def load_bench_layer():
    """Import benchmarks/bench_layer.py as a module (it is a script, not a package member),
    leaving the environment as it was (the script sets THP_MEM_ALLOC_ENABLE on import)."""
    before = os.environ.get("THP_MEM_ALLOC_ENABLE")
    spec = importlib.util.spec_from_file_location("bench_layer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    try:
        spec.loader.exec_module(module)
    finally:
        if before is None:
            os.environ.pop("THP_MEM_ALLOC_ENABLE", None)
        else:
            os.environ["THP_MEM_ALLOC_ENABLE"] = before
    return module


def expected_layer_impls():
    forced = {p.value for p in DispatchPath if p is not DispatchPath.AUTO}
    return {"dense", "moeify", "hf"} | forced


def test_bench_layer_quick_runs_every_impl_and_reports_targets_and_spread(tmp_path):
    out, raw = tmp_path / "table.md", tmp_path / "raw.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--runs", "2", "--max-load", "-1",
         "--wait", "0", "--out", str(out), "--json", str(raw)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report, data = out.read_text(), json.loads(raw.read_text())
    assert report.strip() in result.stdout
    assert data["meta"]["command"].startswith("python benchmarks/bench_layer.py --quick --runs 2")
    assert "THP_MEM_ALLOC_ENABLE=1" in report and data["meta"]["thp"] == "1"
    assert "STILL ABOVE --max-load -1" in report  # the load is always above -1
    assert "at the end:" in report and len(data["meta"]["load_end"]) == 3

    batched = data["batched"]
    impls = expected_layer_impls()
    assert set(batched["impls"]) == impls
    points = {p["key"]: p for p in batched["points"]}
    assert {p["precision"] for p in points.values()} == {"fp32", "bf16-autocast", "bf16-weights"}
    assert len(batched["runs"]) == 2
    for records in batched["runs"]:
        assert {r["point"]["key"] for r in records} == set(points)
        for rec in records:
            assert rec["repeats"] == 2  # --quick: 2 interleaved repeats
            assert set(rec["equivalence"]) == impls - {"dense", "moeify"}
            for mode in ("fwd", "fwd+bwd"):
                times = rec["times_s"][mode]
                assert set(times) == impls, (rec["point"]["key"], mode)
                assert all(len(s) == rec["repeats"] and min(s) > 0 for s in times.values())

    # spread: per point, mode and impl, the median and min-max over the per-run medians
    for key in points:
        for mode in ("fwd", "fwd+bwd"):
            stats = batched["summary"][key][mode]
            assert set(stats["ms"]) == impls
            assert set(stats["ratio"]) == {"moeify/dense", "moeify/hf"}
            for impl, s in stats["ms"].items():
                per_run = [1e3 * statistics.median(next(
                    r for r in records if r["point"]["key"] == key)["times_s"][mode][impl])
                    for records in batched["runs"]]
                assert s["per_run"] == pytest.approx(per_run)
            for s in [*stats["ms"].values(), *stats["ratio"].values()]:
                assert len(s["per_run"]) == 2
                assert s["lo"] <= s["median"] <= s["hi"]
                assert s["lo"] == min(s["per_run"]) and s["hi"] == max(s["per_run"])
    assert "moeify/hf spread" in report and "spread (min-max of the per-run medians" in report

    # one PASS/FAIL/n/a line per target; the quick grid has no Switch-Base-64 point
    targets = batched["targets"]
    assert len(targets) == 8
    target_lines = re.findall(r"^- \[(PASS|FAIL|n/a)\] (.+?):", report, flags=re.M)
    assert [(t["verdict"], t["name"]) for t in targets] == target_lines
    for t in targets:
        expect_na = "Switch-Base-64" in t["name"]
        assert (t["verdict"] == "n/a") == expect_na, t


def test_bench_layer_equivalence_check_raises_when_an_impl_differs():
    bl = load_bench_layer()
    for precision in ("fp32", "bf16-autocast", "bf16-weights"):
        case = bl.build_case(bl.Point(2, 32, 32, 64, 8, precision), bl.BATCHED_IMPLS, seed=0,
                             device=torch.device("cpu"))
        agreements = bl.verify_case(case)
        assert set(agreements) == expected_layer_impls() - {"dense", "moeify"}
    with torch.no_grad():  # HF now computes a different function: every expert changed
        for p in case.ffns["hf"].experts.parameters():
            p.mul_(1.1)
    with pytest.raises(bl.EquivalenceError, match="hf differs from moeify"):
        bl.verify_case(case)

    # a token HF routed differently is left out and counted; too many of them raise
    ref = torch.randn(100, 8)
    out = ref.clone()
    out[0] += 1.0
    rerouted = torch.zeros(100, dtype=torch.bool)
    rerouted[0] = True
    tol = bl.TOLERANCES["bf16"]
    agree = bl.check_equivalence({"moeify": ref, "hf": out}, tol, rerouted={"hf": rerouted})
    assert agree["hf"].rerouted == 1 and agree["hf"].max_abs_diff == 0.0
    with pytest.raises(bl.EquivalenceError, match="differs"):
        bl.check_equivalence({"moeify": ref, "hf": out}, tol)
    with pytest.raises(bl.EquivalenceError, match="routes 1/100 tokens differently"):
        bl.check_equivalence({"moeify": ref, "hf": out}, bl.TOLERANCES["fp32"],
                             rerouted={"hf": rerouted})


def test_bench_layer_targets_and_filters_on_known_numbers():
    bl = load_bench_layer()
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


def printed(value: float, low: float, high: float, decimals: int) -> bool:
    """Whether ``value``, printed with ``decimals`` decimals, can be a number in [low, high]."""
    half = 0.5 * 10.0**-decimals
    return low - half <= value <= high + half


def ratio_printed(ratio: float, num: float, den: float, *, inputs: int, decimals: int = 2) -> bool:
    """Whether a printed ``ratio`` can be num / den, each of the two printed with ``inputs``
    decimals (so each off by up to half a unit of its last place)."""
    half = 0.5 * 10.0**-inputs
    return printed(ratio, (num - half) / (den + half), (num + half) / (den - half), decimals)


def table_rows(out: str, first_cell: str) -> list[list[str]]:
    """The cells of the Markdown table rows whose first cell matches ``first_cell``."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("|")]
    return [r for r in rows if re.fullmatch(first_cell, r[0])]


def test_bench_weight_streaming_reports_rates_per_row_count():
    script = SCRIPT.parent / "bench_weight_streaming.py"
    result = subprocess.run(
        [sys.executable, str(script), "--repeats", "1", "--experts", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    copy = float(re.search(r"copy ceiling (\S+) GB/s", out).group(1))
    assert copy > 0
    rows = [[float(c) for c in r] for r in table_rows(out, r"512|768")]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        (d, 4 * d, m, 2) for d in (512, 768) for m in (8, 10, 32, 40, 128, 160)]
    for d, f, m, experts, ms, rate, fraction, gflops in rows:
        assert ms >= 0.01, (d, m, ms)  # a measured time, not a rounded-away zero
        # weight GB/s = E * d * f * 4 bytes / the bmm time (printed: ms .2f, GB/s .1f)
        gb = experts * d * f * 4 / 1e9
        assert printed(rate, gb / ((ms + 0.005) / 1e3), gb / ((ms - 0.005) / 1e3), 1), (d, m)
        # GFLOP/s over weight GB/s: 2 * M * E * d * f flops per 4 * E * d * f bytes = M / 2
        assert printed(gflops, (rate - 0.05) * m / 2, (rate + 0.05) * m / 2, 1), (d, m)
        # the fraction column is the rate over the copy ceiling printed above the table
        assert ratio_printed(fraction, rate, copy, inputs=1), (d, m, rate, copy, fraction)


def test_bench_onnx_runs_and_reports_both_targets():
    script = SCRIPT.parent / "bench_onnx.py"
    result = subprocess.run([sys.executable, str(script), "--repeats", "1", "--batches", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "seq 128, 8 experts, eval capacity factor 2.0; medians of 1 interleaved" in out
    (row,) = table_rows(out, r"\d+")  # one row per --batches value
    batch, eager, ort_moe, ort_dense, r_eager, r_dense = (float(c) for c in row)
    assert batch == 1 and min(eager, ort_moe, ort_dense) > 0
    # the ratio columns are the ratios of the printed times (ms .1f, ratio .2f)
    assert ratio_printed(r_eager, ort_moe, eager, inputs=1), row
    assert ratio_printed(r_dense, ort_moe, ort_dense, inputs=1), row
    # one verdict per target, quoting the table's ratio, PASS exactly when within its limit
    verdicts = re.findall(
        r"^- \[(PASS|FAIL)\] batch 1: ORT MoE / (eager MoE|ORT dense) (\S+) \(<= (\S+)\)$",
        out, flags=re.M)
    assert [(v[1], float(v[3])) for v in verdicts] == [("eager MoE", 1.0), ("ORT dense", 1.5)]
    for (verdict, _, ratio, limit), table_ratio in zip(verdicts, (r_eager, r_dense)):
        assert float(ratio) == table_ratio
        # the verdict compares the unrounded ratio: a printed tie may go either way
        assert float(ratio) <= float(limit) if verdict == "PASS" else float(ratio) >= float(limit)


def test_bench_expert_parallel_reports_bytes_and_step_times():
    script = SCRIPT.parent / "bench_expert_parallel.py"
    result = subprocess.run([sys.executable, str(script), "--steps", "1"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r[0]: r[1:] for r in table_rows(result.stdout, r"\d process.*")}
    single, world1, two = ("1 process, no expert parallelism",
                           "1 process, expert_parallel (world 1)", "2 processes, expert_parallel")
    assert list(rows) == [single, world1, two]
    base = float(rows[single][0])
    for name, (ms, versus, *_) in rows.items():  # "vs 1 process": step time / the first row's
        assert versus.endswith("x") and ratio_printed(float(versus[:-1]), float(ms), base,
                                                      inputs=1), (name, ms, versus, base)
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
    assert ratio_printed(float(rows[two][4]), measured, predicted, inputs=0), rows[two]


def test_bench_onnx_export_reports_memory_and_static_shapes(tmp_path):
    script = SCRIPT.parent / "bench_onnx_export.py"
    result = subprocess.run(
        [sys.executable, str(script), "--model", "t5-small", "--experts", "2", "--seq-len", "16",
         "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "r.json").read_text())
    out = result.stdout
    # eval capacity at seq 16: min(16, max(4, ceil(2.0 * 16 / 2))) = 16; strict shape
    # inference must find the static [E, batch, C] = [2, batch, 16]
    assert data["metadata"]["num_experts"] == "2" and data["metadata"]["expert_capacity"] == "16"
    assert data["static_expert_shape"] is True
    (row,) = table_rows(out, r"[\d.]+")
    assert row[-1] == "[2, 'batch', 16]"
    assert "- [PASS] strict shape inference gives the static expert shape [E=2, batch, C=16]" in out
    # t5-small has 60,506,624 parameters (tied embeddings); 6 of its 12 FFNs (every other
    # one) gain one more 512 x 2048 x 2 expert and a 2 x 512 router: fp32 bytes
    ffn, router = 2 * 512 * 2048, 2 * 512
    assert data["dense_bytes"] == 4 * 60_506_624
    assert data["moe_bytes"] == 4 * (60_506_624 + 6 * (ffn + router))
    # Graph + external data hold every MoE weight exactly once: no fewer bytes, and not a
    # second copy of the tied 32128 x 512 embedding (+22%); the graph itself adds ~1%.
    stored = data["onnx_bytes"] + data["external_data_bytes"]
    assert data["moe_bytes"] <= stored <= 1.05 * data["moe_bytes"], stored
    gib = 2**30
    assert float(row[0]) == round(data["moe_bytes"] / gib, 2)
    # the peak memory target the script states, and its verdict line agrees with the numbers
    rss, limit = data["export_peak_rss_bytes"], data["dense_bytes"] + 2 * gib
    verdict = re.search(r"^- \[(PASS|FAIL)\] export peak RSS (\S+) GiB <= dense \+ 2 GiB = "
                        r"(\S+) GiB", out, flags=re.M)
    assert verdict.group(1) == ("PASS" if rss <= limit else "FAIL")
    assert float(verdict.group(2)) == round(rss / gib, 2)
    assert float(verdict.group(3)) == round(limit / gib, 2)
    assert 0 < rss <= limit  # streamed from the checkpoint: near the dense model, not above


def test_bench_dispatch_quick_reports_each_kernel_and_its_ratio():
    script = SCRIPT.parent / "bench_dispatch.py"
    result = subprocess.run([sys.executable, str(script), "--quick"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.strip("|").split("|") for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| precision")]
    cells = [[c.strip() for c in row] for row in rows]
    # every precision x mode x rows-per-expert of the quick grid (E=4, 64x256, rows 8/64)
    assert sorted((c[0], c[1], c[4]) for c in cells) == sorted(
        (p, m, r) for p in ("fp32", "bf16-autocast", "bf16-weights")
        for m in ("fwd", "fwd+bwd") for r in ("8", "64"))
    for c in cells:
        bmm, loop, grouped, bmm_ratio, grouped_ratio = (float(v) for v in c[5:])
        assert min(bmm, loop, grouped) > 0, c
        assert ratio_printed(bmm_ratio, bmm, loop, inputs=2), c
        assert ratio_printed(grouped_ratio, grouped, loop, inputs=2), c


def test_bench_layer_refuses_an_hf_that_applies_the_capacity_to_the_whole_batch(monkeypatch):
    """Before transformers 5.18 HF's SparseMLP routed the flattened batch: a different
    layer, so the hf column is refused by version instead of failing the equivalence."""
    from moeify import MoEConfig, SwitchFFN

    bl = load_bench_layer()
    layer = SwitchFFN(8, 16, MoEConfig(num_experts=4), seq_len=8)
    assert isinstance(bl.build_hf(layer), torch.nn.Module)
    # the module object build_hf imports: sys.modules can hold a different one than a name
    # bound by an earlier "import transformers" in this process
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.17.0")
    with pytest.raises(SystemExit, match=r"transformers 5\.17\.0 .*needs transformers >= 5\.18"):
        bl.build_hf(layer)


def test_bench_onnx_variants_report_latency_bytes_and_similarity():
    script = SCRIPT.parent / "bench_onnx.py"
    result = subprocess.run(
        [sys.executable, str(script), "--repeats", "1", "--batches", "1", "--seq-len", "32",
         "--optimize", "--quantize", "int4", "int8"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "seq 32, 8 experts, eval capacity factor 2.0; medians of 1 interleaved" in out
    main, bound = table_rows(out, r"\d+")  # the main table's row, the dense bound's row
    base_ms = float(main[2])  # ORT MoE ms: the float32 MoE graph every variant is timed against
    # the optimized dense graph, timed in the same loop: its ratios as printed
    eager, dense, optimized = float(bound[1]), float(bound[2]), float(bound[3])
    assert eager == float(main[1]) and dense == float(main[3]) and optimized > 0
    assert ratio_printed(float(bound[4]), optimized, dense, inputs=1)
    assert ratio_printed(float(bound[5]), optimized, eager, inputs=1)
    labels = {"optimized", "int4 experts", "int8 experts", "optimized + int4 experts",
              "optimized + int8 experts"}
    rows = table_rows(out, r"ORT MoE|optimized|(optimized \+ )?int[48] experts")
    latency = {r[0]: r[1:] for r in rows if len(r) == 4}
    sizes = {r[0]: r[1:] for r in rows if len(r) == 6}
    assert set(latency) == labels and set(sizes) == labels | {"ORT MoE"}
    for label, (batch, ms, ratio) in latency.items():
        assert batch == "1" and float(ms) > 0
        assert ratio_printed(float(ratio), float(ms), base_ms, inputs=1), (label, ms, ratio)
    # 3 Switch layers x 2 expert MatMuls x 8 experts of 384 x 1536 float32 weights
    number = lambda cell: int(cell.replace(",", ""))  # noqa: E731
    base_experts, base_all = number(sizes["ORT MoE"][0]), number(sizes["ORT MoE"][2])
    assert base_experts == 3 * 2 * 8 * 384 * 1536 * 4
    for label, (experts, expert_ratio, weights, weight_ratio, cosine) in sizes.items():
        assert printed(float(expert_ratio), number(experts) / base_experts,
                       number(experts) / base_experts, 3), label
        assert printed(float(weight_ratio), number(weights) / base_all,
                       number(weights) / base_all, 3), label
        width = re.search(r"int[48]", label)
        limit, floor = {"int4": (0.2, 0.99), "int8": (0.3, 0.999)}.get(
            width and width.group(), (1.0, 0.9999))  # float32 graphs: all bytes, same output
        assert number(experts) <= limit * base_experts, label
        assert float(cosine) >= floor, label
    assert float(sizes["ORT MoE"][4]) == 1.0
    # verdicts: latency of the optimized graph (every batch) and of int4 experts (batch 1),
    # then bytes and similarity; PASS exactly when within the limit
    verdicts = re.findall(r"^- \[(PASS|FAIL)\] (?:batch 1: )?(.+?) (\S+) \((<=|>=) (\S+)\)$",
                          out, flags=re.M)
    found = {name: (verdict, float(value), sign, float(limit))
             for verdict, name, value, sign, limit in verdicts}
    assert set(found) == {"ORT MoE / eager MoE", "ORT MoE / ORT dense", "optimized / ORT MoE",
                          "int4 experts / ORT MoE", "int4 experts: expert weight bytes / float32",
                          "int8 experts: expert weight bytes / float32",
                          "int4 experts: min sentence cosine", "int8 experts: min sentence cosine"}
    assert found["optimized / ORT MoE"][3] == 0.8 and found["int4 experts / ORT MoE"][3] == 1.0
    assert found["optimized / ORT MoE"][1] == float(latency["optimized"][2])
    for name, (verdict, value, sign, limit) in found.items():
        within = value <= limit if sign == "<=" else value >= limit
        # the verdict compares the unrounded value: a printed tie may go either way
        if verdict == "PASS":
            assert within or value == limit, name
        else:
            assert not within or value == limit, name
