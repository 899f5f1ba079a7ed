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
