"""A naive per-token Switch layer: the routing rules written as plain loops.

Independent of moeify's vectorized code except for reading the layer's parameters, so
tests can compare outputs and gradients against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "relu": torch.relu,
    "gelu": lambda v: 0.5 * v * (1 + torch.erf(v / 2**0.5)),
    "gelu_tanh": lambda v: 0.5 * v * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (v + 0.044715 * v**3))),
    "silu": lambda v: v * torch.sigmoid(v),
}


def expert_ffn(experts, e: int, v: torch.Tensor) -> torch.Tensor:
    """Expert e of a moeify `Experts` module on one token v: [d] -> [d]."""
    act = ACTIVATIONS[experts.activation.value]
    h = v @ experts.w_in[e] + (0 if experts.b_in is None else experts.b_in[e])
    if experts.w_gate is not None:
        g = v @ experts.w_gate[e] + (0 if experts.b_gate is None else experts.b_gate[e])
        h = act(g) * h
    else:
        h = act(h)
    return h @ experts.w_out[e] + (0 if experts.b_out is None else experts.b_out[e])


def naive_routing(probs, *, top_k, capacity, uniform=None):
    """Routing of one group. probs: [T, E]. Returns per token a list of
    (expert, chosen, kept) triples, best choice first."""
    T, E = probs.shape
    ranked = [sorted(range(E), key=lambda e: (-probs[t, e].item(), e))[:top_k] for t in range(T)]
    counts = [0] * E
    result = [[None] * top_k for _ in range(T)]
    for rank in range(top_k):  # every first choice before any second choice
        for t in range(T):  # earlier tokens first
            e = ranked[t][rank]
            chosen = True
            if rank == 1 and uniform is not None:
                p1, p2 = probs[t, ranked[t][0]].item(), probs[t, e].item()
                chosen = uniform[t].item() < 2 * p2 / (p1 + p2)
            kept = chosen and counts[e] < capacity
            if chosen:
                counts[e] += 1
            result[t][rank] = (e, chosen, kept)
    return result


def naive_switch(layer, x: torch.Tensor, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's function computed token by token. x: [..., d]; uniform: [G, T] or None."""
    cfg = layer.config
    T, d = layer.tokens_per_group, layer.d_model
    groups = x.reshape(-1, T, d)
    outputs = []
    for g in range(groups.shape[0]):
        dtype = layer.router.router_dtype
        logits = groups[g].to(dtype) @ layer.router.weight.to(dtype).T
        probs = F.softmax(logits, dim=-1)
        routing = naive_routing(
            probs, top_k=cfg.top_k, capacity=layer.expert_capacity,
            uniform=None if uniform is None else uniform[g],
        )
        for t in range(T):
            choices = routing[t]
            p = [probs[t, e] for e, _, _ in choices]
            kept = [k for _, _, k in choices]
            if cfg.gate.value == "normalized":
                total = sum(pi for pi, k in zip(p, kept) if k)
                weights = [pi / total if k else 0.0 for pi, k in zip(p, kept)]
            elif cfg.top_k == 1:
                weights = [p[0] if kept[0] else 0.0]
            else:
                weights = [pi / (p[0] + p[1]) if k else 0.0 for pi, k in zip(p, kept)]
            y = torch.zeros(d, dtype=x.dtype)
            for (e, _, k), w in zip(choices, weights):
                if k:
                    y = y + (w * expert_ffn(layer.experts, e, groups[g, t])).to(x.dtype)
            outputs.append(y)
    return torch.stack(outputs).reshape(x.shape)
