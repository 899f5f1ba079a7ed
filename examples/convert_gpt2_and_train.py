"""Convert a GPT-2-style model to a Switch Transformer and train it a few steps.

Builds a small GPT-2 from a config (offline: no weights to download), converts every
other MLP into an 8-expert Switch layer with moeify, and trains it on a toy task (a
hidden next-token rule) with the auxiliary losses added to the task loss.

    python examples/convert_gpt2_and_train.py [--steps 40] [--experts 8]
"""

from __future__ import annotations

import argparse

import torch
import transformers

import moeify


def batch(generator: torch.Generator, size: int, seq_len: int, vocab: int) -> torch.Tensor:
    """Sequences of a fixed hidden rule, next = (5 * token + 3) mod vocab, from random
    starts: a task a small model learns within a few dozen steps."""
    tokens = [torch.randint(0, vocab, (size,), generator=generator)]
    for _ in range(seq_len - 1):
        tokens.append((5 * tokens[-1] + 3) % vocab)
    return torch.stack(tokens, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=4, n_head=4,
                                     n_positions=args.seq_len)
    model = transformers.GPT2LMHeadModel(config)
    result = moeify.convert(
        model, moeify.MoEConfig(num_experts=args.experts, capacity_factor=1.25),
        seq_len=args.seq_len,
    )
    print(result.report)

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(args.steps):
        input_ids = batch(generator, 16, args.seq_len, config.vocab_size)
        out = model(input_ids=input_ids, labels=input_ids)
        aux = moeify.aux_loss(model)
        (out.loss + aux).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            stats = moeify.routing_stats(model)
            dropped = sum(s.dropped_fraction for s in stats) / len(stats)
            print(f"step {step:3d}  task loss {out.loss.item():.3f}  aux loss {aux.item():.5f}  "
                  f"dropped {100 * dropped:.1f}%")
    for s in moeify.routing_stats(model):
        print(f"{s.name}: tokens per expert {list(s.tokens_per_expert)}, "
              f"capacity {s.expert_capacity}")


if __name__ == "__main__":
    main()
