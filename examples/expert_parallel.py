"""Train a converted model with its experts spread over processes (expert parallelism).

    torchrun --nproc-per-node 2 examples/expert_parallel.py            # CPU, gloo
    torchrun --nproc-per-node 2 examples/expert_parallel.py --steps 20 --experts 8
    torchrun --nproc-per-node 2 examples/expert_parallel.py --checkpoint DIR  # a moeify checkpoint

A small GPT-2 (built from a config: no download) is upcycled to a Switch model, every
rank keeps ``E / world`` experts of every Switch layer, routes its own batch, and
exchanges tokens with all-to-all. Every rank trains on its own slice of the text (the
source of Python's ``json`` package, byte-level), adds the auxiliary losses (computed
from the routing of the whole group), and averages gradients with
`moeify.distributed.average_gradients` before the optimizer step.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import moeify
from moeify.distributed import average_gradients, expert_parallel, load_expert_parallel

SEQ = 64


def corpus() -> torch.Tensor:
    source = Path(json.__file__).parent
    text = b"".join(p.read_bytes() for p in sorted(source.glob("*.py")))
    return torch.tensor(list(text), dtype=torch.long)


def build(experts: int):
    import transformers

    torch.manual_seed(0)  # the same dense weights on every rank
    config = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=4, n_head=4,
                                     n_positions=SEQ, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    moeify.convert(model, moeify.MoEConfig(num_experts=experts, every=2, noise=0.01),
                   seq_len=SEQ)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--checkpoint", help="load this moeify checkpoint, sharded")
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if args.checkpoint:
        model = load_expert_parallel(args.checkpoint)  # only this rank's experts are read
    else:
        model = expert_parallel(build(args.experts))
    model.train()
    layers = moeify.switch_layers(model)
    if rank == 0:
        first = layers[0][1]
        print(f"{world} ranks ({backend}); {len(layers)} Switch layers; rank 0 holds experts "
              f"{first.local_experts.start}..{first.local_experts.stop - 1} of "
              f"{first.config.num_experts}", flush=True)
    data = corpus()
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(args.steps):
        starts = torch.randint(0, data.numel() - SEQ - 1, (args.batch,), generator=generator)
        ids = torch.stack([data[s:s + SEQ] for s in starts.tolist()])
        out = model(input_ids=ids, labels=ids)
        aux = moeify.aux_loss(model)
        (out.loss + aux).backward()
        average_gradients(model)
        optimizer.step()
        optimizer.zero_grad()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        if rank == 0:
            stats = moeify.routing_stats(model)[0]
            sent = layers[0][1].last_exchange.remote_bytes_sent
            print(f"step {step:3d}  loss {loss.item() / world:.3f}  aux {aux.item():.4f}  "
                  f"tokens/expert {list(stats.tokens_per_expert)}  dropped "
                  f"{stats.dropped_fraction:.2f}  sent {sent / 1024:.0f} KiB", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
