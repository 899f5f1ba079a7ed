"""Faults while writing outputs: killed writers, concurrent writers, bad destinations,
full and read-only file systems, permissions, shard limits (issue 14, `moeify.io.files`).

Mounting a tmpfs needs root (or CAP_SYS_ADMIN); where it is not allowed, those tests
skip with the reason.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as tf

import moeify
from moeify import MoEConfig
from tests import models

ROOT = Path(__file__).resolve().parent.parent


# --- helpers -------------------------------------------------------------------------------


def leftovers(directory: Path, name: str) -> list[str]:
    """Temporaries, backups and lock files of output ``name`` in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f".{name}."))


def wait_for(predicate, proc=None, timeout=180.0, step=0.002):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(step)
    return False


def holder(lock: Path) -> str | None:
    try:
        return lock.read_text().strip()
    except FileNotFoundError:
        return None


def temporaries(directory: Path, name: str) -> list[Path]:
    return sorted(directory.glob(f".{name}.tmp-*"))


@pytest.fixture(scope="module")
def wide_gpt2_dir(tmp_path_factory):
    """One Switch layer of 256 experts of d=128, f=512: a 134 MB write, long enough to
    catch a writer in the middle of it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("src") / "wide-gpt2"
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=128, n_layer=2, n_head=2,
                                     n_positions=64)).save_pretrained(path)
    return path


WIDE = ("--experts", "256")


def stop_mid_write(proc, out: Path) -> Path:
    """Freeze ``proc`` once its temporary output exists; returns the temporary."""
    assert wait_for(lambda: temporaries(out.parent, out.name), proc), proc.communicate()
    os.kill(proc.pid, signal.SIGSTOP)
    found = temporaries(out.parent, out.name)
    assert found and not out.exists(), "the writer finished before it could be stopped"
    return found[0]


# --- killed writers ------------------------------------------------------------------------


def test_a_killed_conversion_leaves_a_temporary_the_next_one_removes(
        wide_gpt2_dir, tmp_path, moeify_cli):
    out = tmp_path / "moe"
    proc = moeify_cli.popen("convert", wide_gpt2_dir, *WIDE, "--out", out)
    tmp = stop_mid_write(proc, out)
    assert f".moe.tmp-{proc.pid}-" in tmp.name  # named with the writer's pid
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert tmp.exists() and not out.exists()  # what SIGKILL leaves behind

    again = moeify_cli.popen("convert", wide_gpt2_dir, *WIDE, "--out", out)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"removed {tmp}" in err and f"pid {proc.pid}" in err, err
    assert leftovers(tmp_path, "moe") == []  # no temporary, no lock file
    assert moeify.load(out).config.n_embd == 128


def test_sigterm_mid_write_removes_the_temporary_and_exits_non_zero(
        wide_gpt2_dir, tmp_path, moeify_cli):
    out = tmp_path / "moe"
    proc = moeify_cli.popen("convert", wide_gpt2_dir, *WIDE, "--out", out)
    stop_mid_write(proc, out)
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("error: terminated (SIGTERM)"), err
    assert not out.exists() and leftovers(tmp_path, "moe") == []


def test_two_writers_of_one_out_only_one_succeeds(gpt2_dir, tmp_path, moeify_cli):
    out = tmp_path / "moe"
    first = moeify_cli.popen("convert", gpt2_dir, "--experts", "4", "--out", out, "--force")
    lock = tmp_path / ".moe.lock"  # its pid is written once the lock is taken
    assert wait_for(lambda: holder(lock) == str(first.pid), first), first.communicate()
    os.kill(first.pid, signal.SIGSTOP)  # holding the lock, somewhere in its work
    try:
        second = moeify_cli.popen("convert", gpt2_dir, "--experts", "8", "--out", out, "--force")
        _, err = second.communicate(timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0] == (
        f"error: {out} is being written by moeify (pid {first.pid}); wait for it or choose "
        "another --out"), err
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert moeify.plan_of(moeify.load(out)).config.num_experts == 4  # the holder's
    assert leftovers(tmp_path, "moe") == []


def test_the_lock_is_reentrant_in_a_process_and_exclusive_across_processes(tmp_path):
    from moeify.io.files import output_lock

    out = tmp_path / "o"
    with output_lock(out), output_lock(out):
        holder = (tmp_path / ".o.lock").read_text().strip()
        assert holder == str(os.getpid())
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from moeify.io.files import output_lock\n"
             "try:\n with output_lock(sys.argv[1]): pass\n"
             "except Exception as e: print(e)", str(out)],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert f"being written by moeify (pid {os.getpid()})" in probe.stdout, probe
    assert not (tmp_path / ".o.lock").exists()


def test_a_lock_being_taken_is_reported_with_its_holders_pid(tmp_path):
    import fcntl
    import threading

    from moeify.io.files import output_lock

    fd = os.open(tmp_path / ".o.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # taken, its holder's pid not written yet
    threading.Timer(0.05, lambda: os.write(fd, b"4242\n")).start()
    try:
        with pytest.raises(moeify.MoEError, match=r"being written by moeify \(pid 4242\)"):
            with output_lock(tmp_path / "o"):
                pass  # pragma: no cover - refused
    finally:
        os.close(fd)


def test_temporaries_of_live_processes_are_left_alone(tmp_path, capsys):
    from moeify.io.files import remove_stale

    live = tmp_path / f".o.tmp-{os.getppid()}-abc"
    dead = tmp_path / f".o.tmp-{_dead_pid()}-xyz"
    live.mkdir()
    dead.mkdir()
    remove_stale(tmp_path / "o")
    assert live.exists() and not dead.exists()
    assert f"removed {dead}" in capsys.readouterr().err


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- destinations refused before any work --------------------------------------------------


@pytest.mark.parametrize("out, fragment", [
    (".", "names a directory by '.'"),
    ("", "--out is empty"),
    ("..", "names a directory by '.'"),
])
def test_out_that_names_no_new_output_is_refused(
        out, fragment, gpt2_dir, tmp_path, moeify_main, one_line_error, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    result = moeify_main("convert", gpt2_dir, "--experts", "4", "--out", out, "--force")
    one_line_error(result, fragment)
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_out_that_is_the_current_directory_by_another_name_is_refused(
        gpt2_dir, tmp_path, moeify_main, one_line_error, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = moeify_main("convert", gpt2_dir, "--out", f"../{tmp_path.name}", "--force")
    one_line_error(result, "is the current directory or contains it")


@pytest.fixture
def source_copy(gpt2_dir, tmp_path):
    import shutil

    source = tmp_path / "src" / "gpt2"
    shutil.copytree(gpt2_dir, source)
    return source


@pytest.mark.parametrize("where, fragment", [
    ("same", "is the input"),
    ("inside", "is inside the input"),
    ("containing", "contains the input"),
])
def test_out_overlapping_the_source_is_refused(
        where, fragment, source_copy, moeify_main, one_line_error):
    out = {"same": source_copy, "inside": source_copy / "moe",
           "containing": source_copy.parent}[where]
    before = sorted(p.name for p in source_copy.iterdir())
    result = moeify_main("convert", source_copy, "--experts", "4", "--out", out, "--force")
    one_line_error(result, fragment)
    assert sorted(p.name for p in source_copy.iterdir()) == before  # the source is untouched


@pytest.fixture
def checkpoint(tmp_path):
    model = models.gpt2()
    moeify.convert(model, MoEConfig(num_experts=4))
    return moeify.save(model, tmp_path / "ck")


@pytest.mark.parametrize("args, fragment", [
    (lambda ck: ["distill", ck, "--out", ck, "--force"], "is the input"),
    (lambda ck: ["distill", ck, "--out", ck / "student", "--force"], "is inside the input"),
    (lambda ck: ["export", ck, "--onnx", ck / "moeify.json", "--seq-len", "8", "--force"],
     "would replace moeify.json"),
    (lambda ck: ["export", ck, "--onnx", ck, "--seq-len", "8", "--force"], "is the input"),
])
def test_distill_and_export_never_write_over_the_checkpoint_they_read(args, fragment, checkpoint,
                                                                    moeify_main, one_line_error):
    before = {p.name: p.stat().st_size for p in checkpoint.iterdir()}
    result = moeify_main(*args(checkpoint))
    one_line_error(result, fragment)
    assert {p.name: p.stat().st_size for p in checkpoint.iterdir()} == before


# --- file-system faults: one line, previous output intact ----------------------------------


def test_out_whose_parent_is_a_file_is_one_line(gpt2_dir, tmp_path, moeify_main, one_line_error):
    (tmp_path / "file").write_text("not a directory")
    result = moeify_main("convert", gpt2_dir, "--out", tmp_path / "file" / "sub" / "moe")
    one_line_error(result, "is a file, not a directory")


def test_a_factory_that_raises_or_needs_arguments_is_one_line(
        tmp_path, moeify_main, one_line_error):
    result = moeify_main("convert", "tests.test_faults:raising_factory", "--out",
                         tmp_path / "o")
    one_line_error(result, "raised RuntimeError: no model today")
    result = moeify_main("convert", "tests.test_faults:factory_with_arguments", "--out",
                         tmp_path / "o")
    one_line_error(result, "factory_with_arguments() needs arguments (width)")
    assert not (tmp_path / "o").exists()


def raising_factory():
    raise RuntimeError("no model today")


def factory_with_arguments(width):
    return models.NanoGPT()  # pragma: no cover - never called


@pytest.fixture
def mount(tmp_path):
    """``mount(options)``: a fresh tmpfs with those options; unmounted afterwards."""
    mounted = []

    def make(options: str) -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'})")
        mounted.append(target)
        return target

    yield make
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def read_only_directory(tmp_path, mount) -> Path:
    target = tmp_path / "locked"
    target.mkdir()
    target.chmod(0o555)
    if not os.access(target, os.W_OK):
        return target
    target.chmod(0o755)  # root ignores the mode: use a read-only file system instead
    return mount("ro,size=1m")


def test_read_only_target_is_one_line_and_nothing_is_written(
        gpt2_dir, tmp_path, moeify_main, one_line_error, mount):
    target = read_only_directory(tmp_path, mount)
    result = moeify_main("convert", gpt2_dir, "--experts", "4", "--out", target / "moe")
    one_line_error(result, f"cannot write {target / 'moe'}", "choose another --out")
    model = models.gpt2()
    moeify.convert(model, MoEConfig(num_experts=4))
    with pytest.raises(moeify.MoEError, match="read-only|permission denied"):
        moeify.save(model, target / "moe")
    assert list(target.iterdir()) == []


def fill(directory: Path, leave: int) -> None:
    """Fill ``directory``'s file system but ``leave`` bytes."""
    import shutil

    free = shutil.disk_usage(directory).free
    with open(directory / "filler", "wb") as handle:
        handle.write(b"\0" * max(free - leave, 0))


def test_disk_full_while_converting_keeps_the_previous_output(
        gpt2_dir, moeify_main, one_line_error, mount, monkeypatch):
    disk = mount("size=2m")
    out = disk / "moe"
    result = moeify_main("convert", gpt2_dir, "--experts", "2", "--out", out)
    assert result.returncode == 0, result.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fill(disk, 64 * 1024)
    # the free-space guard would refuse first: turn it off to meet the full disk itself
    monkeypatch.setattr("moeify.io.files.check_free_space", lambda *a, **k: None)
    result = moeify_main("convert", gpt2_dir, "--experts", "16", "--out", out, "--force")
    line = one_line_error(result, f"no space left on {disk}", "choose another --out")
    assert "was not changed" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "moe"]


def test_disk_full_while_distilling_and_exporting_is_one_line(
        checkpoint, moeify_main, one_line_error, mount, monkeypatch):
    disk = mount("size=1m")
    fill(disk, 8 * 1024)
    monkeypatch.setattr("moeify.io.files.check_free_space", lambda *a, **k: None)
    result = moeify_main("distill", checkpoint, "--out", disk / "student")
    one_line_error(result, f"no space left on {disk}")
    with pytest.raises(moeify.MoEError, match=f"no space left on {disk}"):
        moeify.export_onnx(checkpoint, disk / "m.onnx", seq_len=8)
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


Usage = collections.namedtuple("Usage", "total used free")


def test_predicted_bytes_beyond_the_free_space_are_refused_before_any_work(
        gpt2_dir, tmp_path, moeify_main, one_line_error, monkeypatch):
    monkeypatch.setattr("shutil.disk_usage", lambda path: Usage(10**6, 10**6 - 5000, 5000))
    result = moeify_main("convert", gpt2_dir, "--experts", "64", "--out", tmp_path / "o")
    line = one_line_error(result, "needs about", "4.9 KiB (5,000 bytes) free",
                          "choose another --out")
    assert "MiB" in line.split("needs about")[1].split("but")[0]
    model = models.gpt2()
    moeify.convert(model, MoEConfig(num_experts=4))
    with pytest.raises(moeify.MoEError, match=r"needs about .*\(5,000 bytes\) free"):
        moeify.save(model, tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_python_and_cli_conversions_are_refused_for_memory_alike(gpt2_dir, tmp_path, moeify_main,
                                                                  one_line_error, monkeypatch):
    """The memory a conversion needs is planned by the library, so a Python caller of
    `moeify.write` is refused as the command line is: one error, spelled per caller."""
    monkeypatch.setattr("moeify.writer.available_memory", lambda: 2**29)  # 0.5 GiB
    result = moeify_main("convert", gpt2_dir, "--experts", "4", "--out", tmp_path / "cli")
    line = one_line_error(result, "converting GPT2LMHeadModel needs about 1.0 GiB of memory "
                          "(float32, --format torch), but 0.5 GiB are available; try --dtype "
                          "bfloat16")
    dense = tf.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    plan = moeify.plan(dense, MoEConfig(num_experts=4))
    with pytest.raises(moeify.MoEError) as refused:
        moeify.write(dense, tmp_path / "python", plan=plan)
    assert line == f"error: {refused.value.render(cli=True)}"
    assert "(float32, format='torch')" in str(refused.value)  # Python's spelling
    assert "dtype='bfloat16'" in str(refused.value) and "moeify.inspect" in str(refused.value)
    assert moeify.plan_of(dense) is None  # refused before any work
    assert sorted(tmp_path.iterdir()) == []


# --- permissions ---------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_get_the_users_umask(mask, tmp_path):
    model = models.gpt2()
    moeify.convert(model, MoEConfig(num_experts=4))
    previous = os.umask(mask)
    try:
        out = moeify.save(model, tmp_path / "nested" / "ck")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE(out.parent.stat().st_mode) == 0o777 & ~mask
    for file in out.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~mask, file


# --- shard size limit ----------------------------------------------------------------------


def test_no_shard_exceeds_the_limit_and_split_tensors_read_back(tmp_path):
    from moeify.io.checkpoint import load_skeleton

    torch.manual_seed(0)
    model = models.t5()
    moeify.convert(model, MoEConfig(num_experts=4, noise=0.01))
    limit = 4096  # one expert's w_in is 16 x 40 float32 = 2560 bytes; all four 10240
    out = moeify.save(model, tmp_path / "ck", max_shard_bytes=limit)
    shards = sorted(out.glob("model-*.safetensors"))
    assert shards and all(s.stat().st_size <= limit for s in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    name = "encoder.block.1.layer.1.DenseReluDense.experts.w_in"
    assert [rows for _, rows in index["metadata"]["parts"][name]] == [1, 1, 1, 1]

    expected = model.state_dict()
    loaded = moeify.load(out).state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    _, weights = load_skeleton(out)
    assert name in weights
    assert torch.equal(weights.get(name), expected[name])
    for start, stop in [(0, 4), (1, 3), (2, 3), (3, 4), (2, 2)]:
        assert torch.equal(weights.get_slice(name, start, stop), expected[name][start:stop])


def test_streamed_conversion_splits_repeated_expert_chunks_across_shards(tmp_path):
    import copy

    base = models.t5()
    in_memory, streamed = copy.deepcopy(base), copy.deepcopy(base)
    config = MoEConfig(num_experts=4)
    moeify.convert(in_memory, config)
    moeify.write(streamed, tmp_path / "ck", plan=moeify.plan(streamed, config),
                 max_shard_bytes=3000)  # w_in's 4 copies of 2560 bytes: 4 parts
    assert all(s.stat().st_size <= 3000 for s in (tmp_path / "ck").glob("*.safetensors"))
    loaded = moeify.load(tmp_path / "ck").state_dict()
    expected = in_memory.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_a_tensor_whose_single_row_exceeds_the_limit_is_refused_by_name(tmp_path):
    model = models.t5()
    moeify.convert(model, MoEConfig(num_experts=4))
    with pytest.raises(moeify.MoEError,
                       match=r"experts\.w_(in|out) .*shard size limit of 2,000 bytes"):
        moeify.save(model, tmp_path / "ck", max_shard_bytes=2000)
    assert list(tmp_path.iterdir()) == []
