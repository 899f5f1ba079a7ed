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

Then the same global batch on 4 processes laid out as the three (dp, ep) meshes of
`moeify.distributed.parallelize` (dense parameters sharded by FSDP2): (2, 2), (1, 4) and
(4, 1), each rank 2 sequences. Per layout: the median step time on rank 0 and the bytes
every ``all_to_all_single`` of a step sends to other processes (forward and backward,
counted by wrapping the call), for rank 0 and summed over the job, beside the model:

    per rank and step = layers x [4 x T x kept x (ep - 1) / ep x d x itemsize
                                  + (ep - 1) / ep x E x 8]

with T the rank's tokens: its kept rows go to the other ep - 1 experts' owners of its
group in proportion under uniform routing, and each row crosses four times (dispatch,
combine, and the backward of each); the second term is the exchange of per-expert
counts (int64). At a fixed global batch the job's bytes grow as (ep - 1) / ep: none at
ep = 1, half the kept activations at ep = 2, three quarters at ep = 4 (1.5x ep = 2). The
dense parameters' FSDP2 traffic (all-gathers and reduce-scatters over all 4 ranks) and
the experts' gradient all-reduce over dp are not counted: they do not depend on how
tokens are exchanged.

    python benchmarks/bench_expert_parallel.py [--steps 10] [--dtype bfloat16] [--no-mesh]
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import socket
import sys

import torch
from harness import Stat, print_table, timed

SEQ, D, LAYERS, EXPERTS, GLOBAL_BATCH = 128, 256, 4, 8, 8
MESHES = [(2, 2), (1, 4), (4, 1)]


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


def count_all_to_all(tally: list[int]):
    """Wrap ``all_to_all_single``: add the bytes each call sends to other processes to
    ``tally[0]``."""
    import torch.distributed as dist

    original = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                 async_op=False):
        ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        me = ranks.index(dist.get_rank())
        splits = input_split_sizes or [input.shape[0] // len(ranks)] * len(ranks)
        row = input[0].numel() * input.element_size() if input.numel() else 0
        tally[0] += sum(n for r, n in enumerate(splits) if r != me) * row
        return original(output, input, output_split_sizes, input_split_sizes, group=group,
                        async_op=async_op)

    dist.all_to_all_single = counting


def worker(rank: int, world: int, port: int, parallel: bool | tuple[int, int], steps: int,
           dtype_name: str, queue) -> None:
    """``parallel``: False (no expert parallelism), True (`expert_parallel` over the
    world) or a (dp, ep) mesh shape for `parallelize`."""
    import torch.distributed as dist

    import moeify
    from moeify.distributed import average_gradients, expert_parallel, predicted_dispatch_bytes

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dtype = getattr(torch, dtype_name)
    model = build(dtype)
    mesh = parallel if isinstance(parallel, tuple) else None
    tally = [0]
    if parallel:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=120))
        count_all_to_all(tally)
    if mesh:
        from torch.distributed.device_mesh import init_device_mesh

        from moeify.distributed import parallelize

        parallelize(model, init_device_mesh("cpu", mesh, mesh_dim_names=("dp", "ep")))
    elif parallel:
        expert_parallel(model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (GLOBAL_BATCH, SEQ), generator=generator)
    per_rank = GLOBAL_BATCH // world
    ids = ids[rank * per_rank:(rank + 1) * per_rank]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    times, measured, predicted = [], [], []
    step_bytes, step_predicted = [], []
    def train_step() -> None:
        out = model(input_ids=ids, labels=ids)
        (out.loss.float() + moeify.aux_loss(model)).backward()
        if parallel and not mesh:
            average_gradients(model)
        optimizer.step()
        optimizer.zero_grad()

    for step in range(steps + 1):
        tally[0] = 0
        elapsed = timed(train_step)
        if step == 0:
            continue  # warm-up
        times.append(elapsed)
        if mesh:
            ep = mesh[1]
            step_bytes.append(tally[0])
            total = 0.0
            for (_, layer), s in zip(moeify.switch_layers(model), moeify.routing_stats(model)):
                kept = 1 - s.dropped_fraction
                itemsize = layer.dispatcher.last_exchange.bytes_per_row // D
                total += (4 * ids.numel() * layer.config.top_k * kept * (ep - 1) / ep * D
                          * itemsize + (ep - 1) / ep * EXPERTS * 8)
            step_predicted.append(total)
        elif parallel:
            stats = moeify.routing_stats(model)
            for (_, layer), s in zip(moeify.switch_layers(model), stats):
                measured.append(layer.dispatcher.last_exchange.remote_bytes_sent)
                tokens = ids.numel()
                predicted.append(predicted_dispatch_bytes(
                    tokens, D, layer.dispatcher.last_exchange.dtype, world, 1 - s.dropped_fraction,
                    layer.config.top_k))
    queue.put({"rank": rank, "step_s": Stat.of(times).median, "measured": measured,
               "predicted": predicted, "step_bytes": step_bytes,
               "step_predicted": step_predicted})
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
    results = sorted((queue.get(timeout=1800) for _ in processes), key=lambda r: r["rank"])
    for p in processes:
        p.join(600)
        if p.exitcode != 0:
            raise SystemExit(f"a worker exited with {p.exitcode}")
    result = dict(results[0])
    result["job_bytes"] = [sum(step) for step in zip(*(r["step_bytes"] for r in results))]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-mesh", action="store_true",
                        help="skip the 4-process (dp, ep) layouts")
    args = parser.parse_args()
    rows = [("1 process, no expert parallelism", launch(1, False, args.steps, args.dtype)),
            ("1 process, expert_parallel (world 1)", launch(1, True, args.steps, args.dtype)),
            ("2 processes, expert_parallel", launch(2, True, args.steps, args.dtype))]
    base = rows[0][1]["step_s"]
    print(f"torch {torch.__version__}, gloo, {os.cpu_count()} cores, GPT-2 d={D}, {LAYERS} "
          f"layers ({LAYERS // 2} Switch layers x {EXPERTS} experts), seq {SEQ}, global batch "
          f"{GLOBAL_BATCH}, {args.dtype}; medians of {args.steps} steps after a warm-up\n")
    table = []
    for name, r in rows:
        m = Stat.of(r["measured"]).median if r["measured"] else 0
        p = Stat.of(r["predicted"]).median if r["predicted"] else 0
        table.append([name, f"{1e3 * r['step_s']:.1f}", f"{r['step_s'] / base:.2f}x", f"{m:,.0f}",
                      f"{p:,.0f}", f"{m / p:.2f}" if p else "-"])
    print_table(["configuration", "step ms (rank 0)", "vs 1 process", "dispatch bytes sent to "
                 "other ranks per layer-step, measured (median)", "predicted, uniform routing "
                 "(median)", "measured / predicted"], table, "lrrrrr")
    if not args.no_mesh:
        print_meshes({shape: launch(shape[0] * shape[1], shape, args.steps, args.dtype)
                      for shape in MESHES}, args.steps)
    return 0


def print_meshes(rows: dict, steps: int) -> None:
    print(f"\n4 processes, moeify.distributed.parallelize (FSDP2 dense), global batch "
          f"{GLOBAL_BATCH} ({GLOBAL_BATCH // 4} sequences per rank); medians of {steps} steps "
          "after a warm-up. All-to-all bytes per step sent to other processes (forward + "
          "backward, counts included); predicted: layers x [4 T kept (ep-1)/ep d itemsize + "
          "(ep-1)/ep E 8], T = the rank's tokens, kept measured\n")
    base = Stat.of(rows[(2, 2)]["job_bytes"]).median
    table = []
    for (dp, ep), r in rows.items():
        m = Stat.of(r["step_bytes"]).median
        p = Stat.of(r["step_predicted"]).median
        job = Stat.of(r["job_bytes"]).median
        table.append([f"dp={dp} x ep={ep}", f"{1e3 * r['step_s']:.1f}", f"{m:,.0f}", f"{p:,.0f}",
                      f"{m / p:.2f}" if p else "-", f"{job:,.0f}",
                      f"{job / base:.2f}" if base else "-"])
    print_table(["layout", "step ms (rank 0)", "all-to-all bytes per step, rank 0, measured",
                 "predicted", "measured / predicted", "job total per step, measured",
                 "job total / dp=2 x ep=2's"], table, "lrrrrrr")
    print("\nModel: at a fixed global batch the job's all-to-all bytes scale with (ep - 1) / "
          "ep: 0 at ep=1, and ep=4 / ep=2 = (3/4) / (1/2) = 1.50 (times the ratio of kept "
          "fractions).")


if __name__ == "__main__":
    sys.exit(main())
