"""What every benchmark here shares: interleaved timing, medians and spread, targets with
their PASS / FAIL verdicts, Markdown tables, the machine's load, and child processes
measured alone.

Timing: `interleave` runs every candidate once per repeat, the starting candidate
rotating from one repeat to the next, so that drift in the machine's state (load,
frequency, caches) reaches every candidate alike; `RepeatPolicy` says how many repeats
(a fixed number, or more while a time budget lasts). A benchmark reports medians;
`Stat` holds the median and the spread (min-max) of repeated measurements, for instance
one median per run when a grid runs several times.

Targets: `Target` is one line of a benchmark's verdicts, ``- [PASS] text``; `bound`
builds the common one, a value against a limit. Verdicts compare the unrounded values.

The scripts import this module by name: ``python benchmarks/bench_x.py`` puts
``benchmarks/`` first on ``sys.path``.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

Key = TypeVar("Key", bound=Hashable)
Value = TypeVar("Value")

PASS, FAIL, NOT_MEASURED = "PASS", "FAIL", "n/a"


# ----------------------------------------------------------------------------- timing


def timed_value(fn: Callable[[], Value],
                sync: Callable[[], None] | None = None) -> tuple[float, Value]:
    """Seconds one call of ``fn`` takes, and what it returned; ``sync`` (a device
    synchronization) runs before the clock starts and before it stops, so queued device
    work is counted."""
    if sync:
        sync()
    start = time.perf_counter()
    value = fn()
    if sync:
        sync()
    return time.perf_counter() - start, value


def timed(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    """Seconds one call of ``fn`` takes (see `timed_value`)."""
    return timed_value(fn, sync)[0]


@dataclasses.dataclass(frozen=True)
class RepeatPolicy:
    """How many interleaved repeats: at least ``min_repeats``, more while the timed
    repeats have taken less than ``budget_s`` seconds, at most ``max_repeats``; after
    ``warmups`` untimed rounds of every candidate."""

    min_repeats: int
    max_repeats: int
    budget_s: float = 0.0
    warmups: int = 1

    @classmethod
    def fixed(cls, repeats: int, warmups: int = 1) -> RepeatPolicy:
        """Exactly ``repeats`` repeats."""
        return cls(repeats, repeats, 0.0, warmups)


def interleave(
    calls: Mapping[Key, Callable[[], object]],
    policy: RepeatPolicy,
    *,
    group: Callable[[Key], Hashable] = lambda key: None,
    reset: Callable[[Key], None] | None = None,
    lead_in: bool = False,
    sync: Callable[[], None] | None = None,
) -> dict[Key, list[float]]:
    """Time every call ``policy`` says how often, interleaved: seconds per key.

    Each repeat runs every call once. Keys are taken group by group (``group(key)``, in
    the order the groups first appear; one group by default), and within a group the
    first key rotates by one per repeat. ``reset(key)``, untimed, runs before and after
    every call. ``lead_in``: each timed call directly follows an untimed call of the same
    key, as step follows step in a training or serving loop (the memory a step finds is
    then its own loop's, not what another candidate left behind).
    """
    groups: dict[Hashable, list[Key]] = {}
    for key in calls:
        groups.setdefault(group(key), []).append(key)
    times: dict[Key, list[float]] = {key: [] for key in calls}

    def run(key: Key) -> float:
        if reset:
            reset(key)
        if lead_in:
            calls[key]()
            if reset:
                reset(key)
        seconds = timed(calls[key], sync)
        if reset:
            reset(key)
        return seconds

    for _ in range(policy.warmups):
        for key in calls:
            run(key)
    start = time.perf_counter()
    repeat = 0
    while repeat < policy.min_repeats or (
        repeat < policy.max_repeats and time.perf_counter() - start < policy.budget_s
    ):
        for keys in groups.values():
            shift = repeat % len(keys)
            for key in keys[shift:] + keys[:shift]:
                times[key].append(run(key))
        repeat += 1
    return times


def median_seconds(fn: Callable[[], object], repeats: int,
                   sync: Callable[[], None] | None = None) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after one warm-up call."""
    return statistics.median(interleave({0: fn}, RepeatPolicy.fixed(repeats), sync=sync)[0])


# ------------------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True)
class Stat:
    """A quantity measured several times (once per run, or per repeat): the median and
    the spread ``lo``-``hi`` (min-max) of ``values``."""

    median: float
    lo: float
    hi: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        return cls(statistics.median(values), min(values), max(values), tuple(values))

    def fmt(self, digits: int = 2) -> str:
        return f"{self.median:.{digits}f}"

    def fmt_spread(self, digits: int = 2) -> str:
        return f"{self.lo:.{digits}f}-{self.hi:.{digits}f}"


# ---------------------------------------------------------------------------- targets


def verdict(ok: bool) -> str:
    return PASS if ok else FAIL


@dataclasses.dataclass(frozen=True)
class Target:
    """One target of a benchmark and its verdict (`PASS`, `FAIL` or `NOT_MEASURED`);
    printed as ``- [PASS] name: detail`` (``- [PASS] name`` without a detail), then
    ``info`` lines indented under it."""

    name: str
    verdict: str
    detail: str = ""
    info: tuple[str, ...] = ()

    @classmethod
    def check(cls, ok: bool, name: str, detail: str = "") -> Target:
        return cls(name, verdict(ok), detail)

    def lines(self) -> list[str]:
        head = f"- [{self.verdict}] {self.name}" + (f": {self.detail}" if self.detail else "")
        return [head] + [f"  - {line}" for line in self.info]


def bound(name: str, value: float, limit: float, *, at_least: bool = False,
          digits: int = 2) -> Target:
    """``name VALUE (<= LIMIT)``: PASS when the unrounded value is within the limit
    (``at_least``: ``>=``)."""
    ok = value >= limit if at_least else value <= limit
    return Target.check(ok, f"{name} {value:.{digits}f} ({'>=' if at_least else '<='} {limit})")


def print_targets(targets: Sequence[Target]) -> None:
    for target in targets:
        print("\n".join(target.lines()))


# ----------------------------------------------------------------------------- tables


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]],
                   align: str | None = None) -> list[str]:
    """A Markdown table's lines; ``align`` one letter per column, ``l`` or ``r``
    (default: every column right-aligned)."""
    align = align or "r" * len(columns)
    if len(align) != len(columns):
        raise ValueError(f"{len(columns)} columns but alignment {align!r}")
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return [markdown_row(columns), rule] + [markdown_row(row) for row in rows]


def markdown_row(cells: Sequence[Any]) -> str:
    """One row of a Markdown table (for tables printed a row at a time)."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]],
                align: str | None = None) -> None:
    print("\n".join(markdown_table(columns, rows, align)), flush=True)


# ---------------------------------------------------------------------- the machine


def log(message: str) -> None:
    """Progress on stderr (stdout holds the report)."""
    print(message, file=sys.stderr, flush=True)


def fmt_load(load: Sequence[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in load)


def wait_for_quiet(max_load: float, wait_s: float, poll_s: float = 10.0) -> dict[str, Any]:
    """Poll the 1-minute load average until it is <= ``max_load`` or ``wait_s`` seconds
    have passed: the load at the start and when timing may begin, the seconds waited, and
    whether the load is still above the limit."""
    start_load = os.getloadavg()
    load, start = start_load, time.monotonic()
    while load[0] > max_load and time.monotonic() - start < wait_s:
        remaining = wait_s - (time.monotonic() - start)
        log(f"load average {load[0]:.2f} > --max-load {max_load}: waiting "
            f"({remaining:.0f} s left)")
        time.sleep(max(0.0, min(poll_s, remaining)))
        load = os.getloadavg()
    return {"start": list(start_load), "begin": list(load),
            "waited_s": time.monotonic() - start, "above": load[0] > max_load}


def run_child(command: Sequence[str]) -> tuple[float, int, subprocess.CompletedProcess]:
    """Run ``command``; its wall time, its own peak RSS in bytes (`os.wait4`: that child
    alone) and its result (stdout and stderr as text)."""
    command = list(command)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        result = subprocess.CompletedProcess(command, os.waitstatus_to_exitcode(status),
                                             out.read().decode(), err.read().decode())
    process.returncode = result.returncode  # reaped by wait4 above
    return wall, usage.ru_maxrss * 1024, result
