"""Expert parallelism on this machine: bytes per all-to-all, predicted vs measured, and
step time with 1 vs 2 processes (gloo on 127.0.0.1).

A GPT-2-shaped model (d=256, 4 layers, every other FFN -> 8 experts, seq 128) trains on
one fixed global batch of 8 sequences: one process without expert parallelism, one
process with it (the exchange with itself), and 2 processes with 4 sequences and 4
experts each. Per configuration: the median step time (forward + backward + optimizer,
after a warm-up) on rank 0, and per Switch layer and step the bytes rank 0 sends to the
other rank in the dispatch all-to-all (the combine returns as many), measured from the
split sizes it passed to ``all_to_all_single``, beside the prediction for uniform
routing: ``tokens * k * kept * (W - 1) / W * d * itemsize`` with the measured kept
fraction. On 2 cores the step times are informational: two processes share the cores
that one process uses alone.

    python benchmarks/bench_expert_parallel.py [--steps 10] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

import torch

SEQ, D, LAYERS, EXPERTS, GLOBAL_BATCH = 128, 256, 4, 8, 8


def build(dtype: torch.dtype):
    import transformers

    import moeify

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=512, n_embd=D, n_layer=LAYERS, n_head=4,
                                     n_positions=SEQ, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    moeify.convert(model, moeify.MoEConfig(num_experts=EXPERTS, every=2, noise=0.01),
                   seq_len=SEQ)
    return model.to(dtype).train()


def worker(rank: int, world: int, port: int, parallel: bool, steps: int, dtype_name: str,
           queue) -> None:
    import torch.distributed as dist

    import moeify
    from moeify.distributed import average_gradients, expert_parallel, predicted_dispatch_bytes

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dtype = getattr(torch, dtype_name)
    model = build(dtype)
    if parallel:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=120))
        expert_parallel(model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (GLOBAL_BATCH, SEQ), generator=generator)
    per_rank = GLOBAL_BATCH // world
    ids = ids[rank * per_rank:(rank + 1) * per_rank]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    times, measured, predicted = [], [], []
    for step in range(steps + 1):
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        (out.loss.float() + moeify.aux_loss(model)).backward()
        if parallel:
            average_gradients(model)
        optimizer.step()
        optimizer.zero_grad()
        elapsed = time.perf_counter() - start
        if step == 0:
            continue  # warm-up
        times.append(elapsed)
        if parallel:
            stats = moeify.routing_stats(model)
            for (_, layer), s in zip(moeify.switch_layers(model), stats):
                measured.append(layer.last_exchange.remote_bytes_sent)
                tokens = ids.numel()
                predicted.append(predicted_dispatch_bytes(
                    tokens, D, layer.last_exchange.dtype, world, 1 - s.dropped_fraction,
                    layer.config.top_k))
    if rank == 0:
        queue.put({"step_s": statistics.median(times), "measured": measured,
                   "predicted": predicted})
    if parallel:
        dist.destroy_process_group()


def launch(world: int, parallel: bool, steps: int, dtype: str) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [context.Process(target=worker, args=(r, world, port, parallel, steps, dtype,
                                                      queue)) for r in range(world)]
    for p in processes:
        p.start()
    result = queue.get(timeout=1800)
    for p in processes:
        p.join(600)
        if p.exitcode != 0:
            raise SystemExit(f"a worker exited with {p.exitcode}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    rows = [("1 process, no expert parallelism", launch(1, False, args.steps, args.dtype)),
            ("1 process, expert_parallel (world 1)", launch(1, True, args.steps, args.dtype)),
            ("2 processes, expert_parallel", launch(2, True, args.steps, args.dtype))]
    base = rows[0][1]["step_s"]
    print(f"torch {torch.__version__}, gloo, {os.cpu_count()} cores, GPT-2 d={D}, {LAYERS} "
          f"layers ({LAYERS // 2} Switch layers x {EXPERTS} experts), seq {SEQ}, global batch "
          f"{GLOBAL_BATCH}, {args.dtype}; medians of {args.steps} steps after a warm-up\n")
    print("| configuration | step ms (rank 0) | vs 1 process | dispatch bytes sent to "
          "other ranks per layer-step, measured (median) | predicted, uniform routing "
          "(median) | measured / predicted |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        m = statistics.median(r["measured"]) if r["measured"] else 0
        p = statistics.median(r["predicted"]) if r["predicted"] else 0
        ratio = f"{m / p:.2f}" if p else "-"
        print(f"| {name} | {1e3 * r['step_s']:.1f} | {r['step_s'] / base:.2f}x | {m:,.0f} | "
              f"{p:,.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
