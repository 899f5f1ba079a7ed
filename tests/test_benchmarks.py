"""The benchmark script stays runnable: a one-repeat pass over its smoke grid."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_layer.py"


def test_bench_layer_quick_runs_and_reports_every_implementation(tmp_path):
    out, raw = tmp_path / "table.md", tmp_path / "raw.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--repeats", "1", "--out", str(out),
         "--json", str(raw)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = out.read_text()
    assert "## Targets" in table and "matmul ceiling" in table and "THP_MEM_ALLOC_ENABLE=1" in table
    data = json.loads(raw.read_text())
    records = data["records"] if isinstance(data, dict) else data
    for rec in records:
        times = rec["result"]["times_s"]
        for mode in ("fwd", "fwd+bwd"):
            assert set(times[mode]) == {"moeify", "sorted", "padded", "dense", "hf", "einsum"}
            assert all(t > 0 for samples in times[mode].values() for t in samples)


def test_bench_weight_streaming_reports_rates_per_row_count():
    script = SCRIPT.parent / "bench_weight_streaming.py"
    result = subprocess.run(
        [sys.executable, str(script), "--repeats", "1", "--experts", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 512 ")]
    assert len(rows) == 6
    rates = [float(r.split("|")[6]) for r in rows]  # weight GB/s, measured, positive
    assert all(rate > 0 for rate in rates)


def test_bench_onnx_runs_and_reports_both_targets():
    script = SCRIPT.parent / "bench_onnx.py"
    result = subprocess.run([sys.executable, str(script), "--repeats", "1", "--batches", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 1 |"))
    assert all(float(v) > 0 for v in row.strip("| \n").split("|")[1:4])
    assert "ORT MoE / eager MoE" in result.stdout and "ORT MoE / ORT dense" in result.stdout


def test_bench_expert_parallel_reports_bytes_and_step_times():
    script = SCRIPT.parent / "bench_expert_parallel.py"
    result = subprocess.run([sys.executable, str(script), "--steps", "1"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 2 processes"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    step_ms, measured, predicted = float(cells[1]), float(cells[3].replace(",", "")), \
        float(cells[4].replace(",", ""))
    assert step_ms > 0 and measured > 0 and predicted > 0


def test_bench_onnx_export_reports_memory_and_static_shapes(tmp_path):
    script = SCRIPT.parent / "bench_onnx_export.py"
    result = subprocess.run(
        [sys.executable, str(script), "--model", "t5-small", "--experts", "2", "--seq-len", "16",
         "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["static_expert_shape"] and data["metadata"]["num_experts"] == "2"
    assert data["export_peak_rss_bytes"] > 0 and data["onnx_bytes"] > data["moe_bytes"] / 2
