"""Routing: which expert each token goes to, in which slot, with what weight.

Pure functions over tensors. Shapes use the paper's names:

    G  groups            T  tokens_per_group     d  d_model
    E  num_experts       C  expert_capacity      k  top_k (1 <= k <= E)

Nothing here reads a tensor's shape to decide a size: the capacity and the group length
arrive as Python ints, so every function traces (fx, export, compile, ONNX) to a graph
whose expert buffers have static shapes. The capacity formula, `expert_capacity`, lives
beside `MoEConfig` (in `moeify.config`, torch-free) and is re-exported here.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from moeify.config import Gate, Scoring, expert_capacity

__all__ = [
    "Routing",
    "compute_router_logits",
    "expert_capacity",
    "gate_weights",
    "group_capacities",
    "normalized_scores",
    "route",
    "router_scores",
    "slot_positions",
]


class Routing(NamedTuple):
    """Everything the dispatch, the combine and the losses need from the router.

    router_logits:   [G, T, E] router dtype (float32), before the scoring.
    router_probs:    [G, T, E] router dtype, the scores (`router_scores`): the softmax of
                     the logits, or their sigmoid with ``scoring="sigmoid"`` (then they
                     do not sum to 1 over the experts; `normalized_scores` makes them).
                     Never includes a selection bias.
    expert_index:    [G, T, k] int64, the chosen experts, best first (by score plus the
                     selection bias, if any).
    position:        [G, T, k] int64, the slot each choice claims in its expert's buffer;
                     >= C for a choice that overflowed (meaningless where not chosen).
    kept:            [G, T, k] bool, the choice reaches its expert (chosen and in
                     capacity).
    combine_weights: [G, T, k] router dtype, the weight of each choice's expert output
                     (`gate_weights` of the unbiased scores, times ``routed_scaling``);
                     0 where not kept.
    valid:           [G, T] bool, the real (not padding) tokens; None: every token is.
                     A padding token chooses nothing, takes no slot and is left out of
                     the losses and statistics.
    """

    router_logits: Tensor
    router_probs: Tensor
    expert_index: Tensor
    position: Tensor
    kept: Tensor
    combine_weights: Tensor
    valid: Tensor | None = None


def group_capacities(real_tokens: Tensor, *, num_experts: int, capacity_factor: float,
                     top_k: int, min_capacity: int, dropless: bool = False) -> Tensor:
    """`expert_capacity` of each group from its number of real tokens: [G] int64 ->
    [G, 1, 1] int64 (broadcasts against ``[G, T, k]`` positions).

    The same formula as the Python one, in tensor ops so a traced graph computes it (its
    buffers keep the static capacity of the full length, which is never smaller).
    """
    tokens = real_tokens.to(torch.float64)
    if dropless:
        capacity = tokens
    else:
        share = torch.round(capacity_factor * top_k * tokens / num_experts * 1e9) / 1e9
        capacity = torch.minimum(tokens, torch.ceil(share).clamp(min=min_capacity))
    return capacity.to(torch.int64).view(-1, 1, 1)


def compute_router_logits(
    x: Tensor, weight: Tensor, *, dtype: torch.dtype, jitter: Tensor | None = None
) -> Tensor:
    """``x @ weight.T`` in ``dtype`` with autocast off (selective precision).

    x: [..., d] any float dtype; weight: [E, d]; jitter: None or a multiplier broadcastable
    to x (the Switch recipe's ``U(1-eps, 1+eps)``, applied to the router *input* in a new
    tensor, never in place). Returns [..., E] in ``dtype``.
    """
    with _autocast_disabled():
        inputs = x.to(dtype)
        if jitter is not None:
            inputs = inputs * jitter.to(dtype)
        return F.linear(inputs, weight.to(dtype))


def route(
    router_logits: Tensor,
    *,
    num_experts: int,
    top_k: int,
    expert_capacity: int,
    gate: Gate,
    scoring: Scoring = Scoring.SOFTMAX,
    selection_bias: Tensor | None = None,
    routed_scaling: float = 1.0,
    second_uniform: Tensor | None = None,
    valid: Tensor | None = None,
) -> Routing:
    """Tokens choose experts; earlier tokens claim slots first.

    router_logits: [G, T, E]. top_k: 1 (Switch), 2 (GShard), any k <= E.
    scoring: how the logits become scores (`router_scores`): softmax over the experts or
        a sigmoid per expert (DeepSeek-V3).
    selection_bias: [E] or None, added to the scores to *select* the experts only
        (auxiliary-loss-free balancing, Wang et al. 2024): the combine weights and the
        losses keep the unbiased scores.
    routed_scaling: multiplies every combine weight (DeepSeek-V3's
        ``routed_scaling_factor``), so each dispatcher and export applies it.
    second_uniform: [G, T] uniform samples for GShard random routing (training, top-2):
        the second expert is kept iff ``u < 2 * g2`` with ``g2 = s2 / (s1 + s2)``, i.e.
        with probability proportional to its weight. None keeps every choice.
    expert_capacity: an int, or [G, 1, 1] per group (`group_capacities`).
    valid: [G, T] bool, the real tokens (None: all); padding tokens choose nothing.
    The k choices are the k largest (biased) scores, best first (ties: the lower expert
    index). All first choices of a group fill capacity before any second choice, all
    second choices before any third, and so on. A choice whose slot would be >=
    ``expert_capacity`` is dropped; a token with no kept choice gets output 0 from the
    layer, so the residual carries it.
    """
    scores = router_scores(router_logits, scoring)  # [G, T, E]
    if selection_bias is None:
        expert_index = top_experts(scores, top_k)  # [G, T, k]
    else:  # biased scores may be negative: exclude taken experts with -inf
        biased = scores + selection_bias.to(scores.dtype)
        expert_index = top_experts(biased, top_k, excluded=float("-inf"))
    gate_scores = scores.gather(-1, expert_index)  # [G, T, k]
    chosen = torch.ones_like(expert_index, dtype=torch.bool)
    if second_uniform is not None:
        if top_k != 2:
            raise ValueError(f"random routing decides a second expert: top_k=2, not {top_k}")
        g2 = gate_scores[..., 1:] / gate_scores.sum(-1, keepdim=True)
        chosen_second = second_uniform.unsqueeze(-1).to(g2.dtype) < 2.0 * g2
        chosen = torch.cat([chosen[..., :1], chosen_second], dim=-1)

    if valid is not None:
        chosen = chosen & valid.unsqueeze(-1)
    position = slot_positions(expert_index, chosen, num_experts=num_experts, top_k=top_k)
    kept = chosen & (position < expert_capacity)
    combine_weights = gate_weights(gate_scores, kept, top_k=top_k, gate=gate)
    if routed_scaling != 1.0:
        combine_weights = combine_weights * routed_scaling
    return Routing(router_logits, scores, expert_index, position, kept, combine_weights, valid)


def router_scores(router_logits: Tensor, scoring: Scoring) -> Tensor:
    """The scores that select and weigh the experts: [..., E] -> [..., E], same dtype.

    softmax: probabilities over the E experts (Switch, GShard, Mixtral). sigmoid
    (DeepSeek-V3): ``sigmoid(logit)`` per expert, independent of the other experts.
    """
    if scoring == Scoring.SIGMOID:
        return torch.sigmoid(router_logits)
    return torch.softmax(router_logits, dim=-1)


def normalized_scores(scores: Tensor, scoring: Scoring) -> Tensor:
    """Scores that sum to 1 over the experts, for the balance losses: softmax scores as
    they are; sigmoid scores divided by their sum per token (DeepSeek-V3's ``s'``)."""
    if scoring == Scoring.SIGMOID:
        return scores / scores.sum(-1, keepdim=True)
    return scores


def top_experts(scores: Tensor, top_k: int, *, excluded: float = -1.0) -> Tensor:
    """The ``top_k`` experts of each token, best first: [..., E] -> [..., k] int64.

    One argmax per rank, each excluding the experts already taken by writing
    ``excluded``, a value below every score (-1 for probabilities and sigmoid scores;
    -inf for scores plus a selection bias, which can be negative): ties go to the lower
    index at every rank, the same on every backend and in every exported graph
    (ArgMax), where ``topk``'s tie order is unspecified.
    """
    choices = [scores.argmax(dim=-1, keepdim=True)]
    masked = scores
    for _ in range(top_k - 1):
        masked = masked.scatter(-1, choices[-1], excluded)
        choices.append(masked.argmax(dim=-1, keepdim=True))
    return choices[0] if top_k == 1 else torch.cat(choices, dim=-1)


def slot_positions(
    expert_index: Tensor, chosen: Tensor, *, num_experts: int, top_k: int
) -> Tensor:
    """Slot of each choice in its expert's buffer, in priority order.

    Priority runs over choice rank first (every first choice of the group before any
    second choice), then over token position. expert_index, chosen: [G, T, k].
    Returns [G, T, k] int64 (unchosen choices get the position they would have had;
    callers mask them with ``chosen``). Memory is O(G T k E), never O(T E C).
    """
    one_hot = F.one_hot(expert_index, num_experts) * chosen.unsqueeze(-1)  # [G, T, k, E]
    by_rank = one_hot.transpose(1, 2).flatten(1, 2)  # [G, k*T, E], rank-major
    position = (by_rank.cumsum(dim=1) - 1) * by_rank  # slot where chosen, else 0
    position = position.sum(-1).unflatten(1, (top_k, -1))  # [G, k, T]
    return position.transpose(1, 2)  # [G, T, k]


def gate_weights(gate_scores: Tensor, kept: Tensor, *, top_k: int, gate: Gate) -> Tensor:
    """Weights of each choice's expert output from the chosen experts' scores, [G, T, k];
    0 where not kept.

    softmax: top-1 keeps the raw score (Switch); top-k (k >= 2) renormalizes over the k
    chosen (GShard's pair, Mixtral, DeepSeek-V3), whether or not some were dropped
    afterwards. normalized: renormalized over the kept choices, so the kept weights sum
    to 1. raw: every choice its own score at any k, never renormalized (DeepSeek-V2,
    Qwen-MoE with ``norm_topk_prob=False``).
    """
    kept_f = kept.to(gate_scores.dtype)
    if gate == Gate.NORMALIZED:
        weights = gate_scores * kept_f
        total = weights.sum(-1, keepdim=True)
        return weights / torch.where(total > 0, total, torch.ones_like(total))
    if top_k == 1 or gate == Gate.RAW:
        return gate_scores * kept_f
    return gate_scores / gate_scores.sum(-1, keepdim=True) * kept_f


def _autocast_disabled() -> contextlib.ExitStack:
    """A context that turns off every active autocast region (reads no tensor, so fx,
    export and compile all trace through it)."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack
