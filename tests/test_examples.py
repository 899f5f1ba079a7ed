"""Examples are runnable scripts: CI runs each one and checks what it claims."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert dropped[-1] < dropped[0]  # ... so fewer tokens overflow their expert


def failure(result: subprocess.CompletedProcess) -> str:
    """What a failed torchrun job said: each rank's own error lines (a C++ abort's message
    comes early, before torchrun's long summary), then the end of stderr."""
    lines = result.stderr.splitlines()
    causes = [line for line in lines if any(word in line for word in (
        "Error", "error:", "terminate called", "what():", "Traceback", "Exception"))]
    return "\n".join(causes[:40]) + "\n...\n" + result.stderr[-2000:]


def run_example(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_convert_gpt2_and_train_lowers_the_loss():
    out = run_example("convert_gpt2_and_train.py", "--steps", "30", "--experts", "4")
    assert "4 FFN sites, 2 converted to 4 experts" in out
    losses = [float(v) for v in re.findall(r"task loss (\S+)", out)]
    assert len(losses) >= 3 and losses[-1] < 0.7 * losses[0]
    assert len(re.findall(r"tokens per expert", out)) == 2


def test_custom_pass_runs_inside_the_pipeline():
    out = run_example("custom_pass.py")
    assert "ReplaceModules -> FreezeDenseWeights -> FixCapacity" in out
    trainable, total = (int(v.replace(",", "")) for v in
                        re.search(r"trainable parameters: (\S+) of (\S+)", out).groups())
    # 2 converted layers: 4 experts x (3 x 64 x 160) + router 4 x 64 each
    assert trainable == 2 * (4 * 3 * 64 * 160 + 4 * 64) and total > trainable


def test_expert_parallel_example_trains_under_torchrun():
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--standalone", str(EXAMPLES / "expert_parallel.py"), "--steps", "6"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, failure(result)
    out = result.stdout
    assert "2 ranks (gloo); 2 Switch layers; rank 0 holds experts 0..1 of 4" in out
    losses = [float(v) for v in re.findall(r"loss (\S+)  aux", out)]
    assert len(losses) == 6 and losses[-1] < losses[0], out
    # Per step, layer 0: the group-wide tokens per expert and the KiB rank 0 sent away.
    steps = re.findall(r"tokens/expert \[([\d, ]+)\].*  sent (\d+) KiB", out)
    assert len(steps) == 6, out
    for counts, sent in steps:
        per_expert = [int(c) for c in counts.split(",")]
        assert len(per_expert) == 4
        # Training capacity: ceil(1.25 * 64 / 4) = 20 slots per expert and sequence, so each
        # expert processes at most 20 x 4 sequences x 2 ranks tokens.
        assert all(0 <= n <= 160 for n in per_expert), per_expert
        # Rank 0's dispatch sends rows to experts 2 and 3 (rank 1's), 64 fp32 = 256 B
        # each: some, at most those experts' slots for its own 4 sequences (40 KiB), and
        # at most what experts 2 and 3 processed over both ranks.
        remote_kib = (per_expert[2] + per_expert[3]) * 256 / 1024
        assert 0 < int(sent) <= min(40, round(remote_kib)), (sent, per_expert)


def test_expert_parallel_example_on_a_2x2_mesh_saves_a_checkpoint_one_process_loads(tmp_path):
    """The README's command: 4 ranks as (dp=2, ep=2), FSDP2 on the dense part; the
    checkpoint they write together loads in one process."""
    import moeify

    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
         "--standalone", str(EXAMPLES / "expert_parallel.py"), "--dp", "2", "--ep", "2",
         "--steps", "3", "--save", str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, failure(result)
    out = result.stdout
    assert "4 ranks (gloo); 2 Switch layers; rank 0 holds experts 0..1 of 4; mesh dp=2 x " \
           "ep=2, dense parameters sharded by FSDP2" in out, out
    assert len(re.findall(r"loss (\S+)  aux", out)) == 3, out
    assert f"saved {tmp_path / 'ckpt'}" in out
    model = moeify.load(tmp_path / "ckpt")
    assert len(moeify.switch_layers(model)) == 2
    assert (tmp_path / "ckpt" / "optimizer").exists()
