"""Train a converted model with data x expert parallelism on a (dp, ep) device mesh.

    torchrun --nproc-per-node 4 examples/expert_parallel.py --dp 2 --ep 2 --save ckpt-ep
    torchrun --nproc-per-node 4 examples/expert_parallel.py --dp 1 --ep 4 --resume ckpt-ep
    torchrun --nproc-per-node 2 examples/expert_parallel.py       # dp 1, ep = world size
    torchrun --nproc-per-node 2 examples/expert_parallel.py --steps 20 --experts 8

A small GPT-2 (built from a config: no download) is upcycled to a Switch model and laid
out by `moeify.distributed.parallelize` on ``init_device_mesh(..., (dp, ep))``: every
Switch layer's experts are split over the ``ep`` ranks of a group and replicated over
``dp``; tokens travel by all-to-all within the ep group only; every other parameter is
sharded over all ranks by FSDP2 (``--no-shard-dense``: replicated). Every rank trains on
its own slice of the text (the source of Python's ``json`` package, byte-level), adds the
auxiliary losses (computed from the routing of the whole job), and steps: the gradients
were averaged during ``backward()``. ``--save DIR`` writes a moeify checkpoint from all
ranks at once (each rank its own experts) with the optimizer state; ``--resume DIR``
loads one under this run's layout, whatever layout wrote it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import moeify
from moeify.distributed import load, load_optimizer, parallelize, save

SEQ = 64


def corpus() -> torch.Tensor:
    source = Path(json.__file__).parent
    text = b"".join(p.read_bytes() for p in sorted(source.glob("*.py")))
    return torch.tensor(list(text), dtype=torch.long)


def dense_gpt2():
    import transformers

    torch.manual_seed(0)  # the same dense weights on every rank
    config = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=4, n_head=4,
                                     n_positions=SEQ, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def build(experts: int):
    model = dense_gpt2()
    moeify.convert(model, moeify.MoEConfig(num_experts=experts, every=2, noise=0.01),
                   seq_len=SEQ)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    parser.add_argument("--ep", type=int, help="ranks that split the experts (default: "
                        "world size / dp)")
    parser.add_argument("--no-shard-dense", action="store_true",
                        help="replicate the dense parameters instead of FSDP2")
    parser.add_argument("--save", help="write a moeify checkpoint (and optimizer) here")
    parser.add_argument("--resume", "--checkpoint", dest="resume",
                        help="start from this moeify checkpoint (its optimizer state too, "
                        "when it has one)")
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    train(args, backend)
    # The model, its FSDP2 state and the work it holds are gone with train()'s frame (the
    # collection clears their reference cycles) before the groups go: torch 2.13's gloo
    # otherwise aborts the process at exit, after the work is done, in about one run in five.
    # The barrier keeps every rank's groups up until all ranks are done with them: a rank
    # that tears its connections down while a peer still reads them aborts that peer.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def train(args: argparse.Namespace, backend: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    ep = args.ep or world // args.dp
    if args.dp * ep != world:
        raise SystemExit(f"--dp {args.dp} x --ep {ep} must equal the world size {world}")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = "cuda" if backend == "nccl" else "cpu"
    mesh = init_device_mesh(device, (args.dp, ep), mesh_dim_names=("dp", "ep"))
    shard_dense = not args.no_shard_dense
    if args.resume:  # each rank reads only its own experts' rows
        model = load(args.resume, dense_gpt2, mesh, shard_dense=shard_dense)
    else:
        model = parallelize(build(args.experts), mesh, shard_dense=shard_dense)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if args.resume and (Path(args.resume) / "optimizer").exists():
        load_optimizer(args.resume, model, optimizer)
    layers = moeify.switch_layers(model)
    if rank == 0:
        first = layers[0][1]
        print(f"{world} ranks ({backend}); {len(layers)} Switch layers; rank 0 holds experts "
              f"{first.local_experts.start}..{first.local_experts.stop - 1} of "
              f"{first.config.num_experts}; mesh dp={args.dp} x ep={ep}, dense parameters "
              f"{'sharded by FSDP2' if shard_dense else 'replicated'}", flush=True)
    data = corpus()
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches
    for step in range(args.steps):
        starts = torch.randint(0, data.numel() - SEQ - 1, (args.batch,), generator=generator)
        ids = torch.stack([data[s:s + SEQ] for s in starts.tolist()])
        out = model(input_ids=ids, labels=ids)
        aux = moeify.aux_loss(model)
        (out.loss + aux).backward()  # gradients are averaged over the job here
        optimizer.step()
        optimizer.zero_grad()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        if rank == 0:
            stats = moeify.routing_stats(model)[0]
            sent = layers[0][1].dispatcher.last_exchange.remote_bytes_sent
            print(f"step {step:3d}  loss {loss.item() / world:.3f}  aux {aux.item():.4f}  "
                  f"tokens/expert {list(stats.tokens_per_expert)}  dropped "
                  f"{stats.dropped_fraction:.2f}  sent {sent / 1024:.0f} KiB", flush=True)
    if args.save:
        save(model, args.save, optimizer=optimizer, force=True)
        if rank == 0:
            print(f"saved {args.save}: a moeify checkpoint written by {ep} ranks "
                  f"(their experts) and rank 0 (the dense part), optimizer state in "
                  f"{args.save}/optimizer", flush=True)


if __name__ == "__main__":
    main()
