"""examples/upcycle_vs_dense.py --quick: every arm trains, the plot is written, the table's
numbers are sane and each verdict agrees with them."""

import math
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "upcycle_vs_dense.py"
ARMS = ("dense", "copy", "drop", "granular", "fine")


def table(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ARMS:
            rows[cells[0]] = cells
    return rows


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def test_quick_run_compares_every_recipe_with_the_dense_arm(tmp_path):
    png = tmp_path / "x.png"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--png", str(png)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout

    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000  # a rendered figure, not an empty canvas

    rows = table(out)
    assert sorted(rows) == sorted(ARMS), out
    dense_final, dense_at_time = number(rows["dense"][2]), number(rows["dense"][4])
    dense_params = [number(p) for p in rows["dense"][8].split("/")]
    for name, cells in rows.items():
        final, diff, at_time, diff_time = (number(cells[i]) for i in (2, 3, 4, 5))
        assert math.isfinite(final) and 0 < final < math.log(256)  # better than uniform
        assert abs(diff - (dense_final - final)) < 2e-4
        assert abs(diff_time - (dense_at_time - at_time)) < 2e-4
        assert number(cells[6]) > 0 and math.isfinite(number(cells[7]))
        total, active = (number(p) for p in cells[8].split("/"))
        if name == "dense":
            continue
        assert total > dense_params[0]  # the experts add parameters ...
        assert dense_params[0] <= active < 1.1 * dense_params[0]  # ... not per token
        assert 0 <= number(cells[9]) <= 100
        assert 1 <= number(cells[10]) <= 32  # max / mean load; 32 experts at most
        verdict = re.search(rf"^verdict {name}: (.*?) at equal steps", out, re.MULTILINE)
        assert verdict, out
        if diff > 0.006:
            assert verdict.group(1).startswith("beats dense")
        elif diff < -0.006:
            assert verdict.group(1).startswith("loses to dense")
    # every arm starts from the same checkpoint: same step, nearly the same loss
    starts = re.findall(r"^\s+(\w+)\s+step\s+30  val loss ([0-9.]+)", out.split("arms:")[1],
                        re.MULTILINE)
    assert sorted(name for name, _ in starts) == sorted(ARMS)
    losses = [float(loss) for _, loss in starts]
    assert max(losses) - min(losses) < 0.5
    # granular upcycling starts as the dense function (top-2 over tied halves)
    assert "granular: 8 copies x 2 slices of d_ff/2" in out
    assert "granular: 8 copies x 4 slices of d_ff/4" in out  # the fine-grained arm
    assert rows["dense"][10] == "-"
