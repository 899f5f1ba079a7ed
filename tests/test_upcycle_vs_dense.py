"""examples/upcycle_vs_dense.py --quick: both arms train, the plot is written, the printed
numbers are sane and the verdict agrees with them."""

import math
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "upcycle_vs_dense.py"
NUMBER = r"([-+]?(?:[0-9][0-9,]*\.?[0-9]*(?:e[-+]?[0-9]+)?|nan|inf))"


def numbers(pattern: str, out: str) -> list[float]:
    match = re.search(pattern.replace("{n}", NUMBER), out)
    assert match, f"no line matching {pattern!r} in:\n{out}"
    return [float(v.replace(",", "")) for v in match.groups()]


def test_quick_run_compares_dense_and_upcycled_arms(tmp_path):
    png = tmp_path / "x.png"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--png", str(png)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout

    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000  # a rendered figure, not an empty canvas

    dense, upcycled, diff = numbers(
        r"final val loss\s+dense {n}\s+upcycled {n}\s+difference \(dense - upcycled\) {n}", out)
    for loss in (dense, upcycled):
        assert math.isfinite(loss) and 0 < loss < math.log(256)  # better than uniform bytes
    assert abs(diff - (dense - upcycled)) < 2e-4

    tps_dense, tps_moe, _ = numbers(r"train tokens/s\s+dense {n}\s+upcycled {n}\s+ratio {n}", out)
    assert all(math.isfinite(v) and v > 0 for v in (tps_dense, tps_moe))

    p_dense, p_moe, p_active = numbers(
        r"parameters\s+dense {n}\s+upcycled {n} total / {n} active per token", out)
    assert p_moe > p_dense  # the experts add parameters ...
    assert p_dense <= p_active < 1.1 * p_dense  # ... but a token still touches about as many

    # both arms start from the same checkpoint: same step, nearly the same loss
    first_dense = numbers(r"dense    step\s+30  val loss {n}", out.split("arms:")[1])[0]
    first_moe = numbers(r"upcycled step\s+30  val loss {n}", out)[0]
    assert abs(first_dense - first_moe) < 0.5

    verdict = re.search(r"^verdict: (.*)$", out, re.MULTILINE)
    assert verdict, out
    if diff > 0.006:
        assert verdict.group(1).startswith("upcycled beats dense")
    elif diff < -0.006:
        assert verdict.group(1).startswith("dense is ahead")
