"""Examples are runnable scripts: CI runs each one and checks what it claims."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_upcycle_minilm_layer_reproduces_the_dense_ffn_on_real_weights():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "upcycle_minilm_layer.py"), "--experts", "4"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "d_model=384, d_ff=1536" in out  # the real all-MiniLM-L6-v2 weights
    errors = [float(v) for v in re.findall(r"max \|switch - expected\| = (\S+)", out)]
    assert len(errors) == 2 and max(errors) < 1e-4
    dropped = [float(v) for v in re.findall(r"dropped (\S+)%", out)]
    assert dropped and dropped[0] > 0  # training capacity drops tokens on real data
    balance = [float(v) for v in re.findall(r"load-balancing (\S+),", out)]
    assert balance[-1] < balance[0]  # the auxiliary loss balances the router
