"""Run a worker function on W local processes (gloo on 127.0.0.1) with a hard deadline.

Each rank runs ``worker(rank, world, *args)`` after ``init_process_group``; what it
returns (or the traceback it raised) is written to a file and handed back per rank. A
rank that is still running at the deadline is killed, so no test can hang the suite.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import socket
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(worker, rank, world, port, out, timeout_s, args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    result: dict = {}
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        result = {"ok": True, "value": worker(rank, world, *args)}
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        result = {"ok": False, "type": type(error).__name__, "message": str(error),
                  "traceback": traceback.format_exc()}
    finally:
        Path(out).write_bytes(pickle.dumps(result))
        if result.get("ok") and dist.is_initialized():
            dist.destroy_process_group()
        os._exit(0)  # skip atexit handlers that could wait on dead peers


def run(worker, world: int, *args, deadline_s: float = 240, collective_timeout_s: float = 30,
        tmp: Path) -> list[dict]:
    """Per rank: {"ok": True, "value": ...} or {"ok": False, "type", "message", ...}."""
    context = mp.get_context("spawn")
    port = free_port()
    files = [tmp / f"rank{r}.pkl" for r in range(world)]
    processes = [context.Process(target=_entry, args=(worker, r, world, port, str(files[r]),
                                                       collective_timeout_s, args))
                 for r in range(world)]
    for p in processes:
        p.start()
    end = time.monotonic() + deadline_s
    for p in processes:
        p.join(max(0.0, end - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()
    results = []
    for r, f in enumerate(files):
        if f.exists():
            results.append(pickle.loads(f.read_bytes()))
        else:
            results.append({"ok": False, "type": "Killed", "message": f"rank {r} passed the "
                            f"{deadline_s:.0f} s deadline or died", "traceback": ""})
    return results


def all_ok(results: list[dict]) -> list:
    failed = [f"rank {r}: {res['traceback'] or res['message']}"
              for r, res in enumerate(results) if not res["ok"]]
    assert not failed, "\n".join(failed)
    return [res["value"] for res in results]
