"""Expert choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice
Routing"): each expert takes the C tokens of a group it scores highest.

Token choice (`moeify.switch.routing`) lets every token pick its experts and drops what
overflows; here the experts pick. Per group of T tokens, in the router dtype (float32):

    scores   S = softmax over the E experts of the router logits       [G, T, E]
    choice   I = the top-C tokens of each expert's column of S          [G, E, C]
    weight   W[g, e, c] = S[g, I[g, e, c], e]                           [G, E, C]
    output   y_t = sum over the slots (e, c) holding token t of W * FFN_e(x_t)

``C = MoEConfig.capacity(T)``, the Switch capacity formula with the capacity factor in
top_k's place (the paper's ``C = T * c / E``): the experts together fill about
``capacity_factor * T`` slots and every expert exactly C, balanced by construction,
which is why an expert-choice layer needs no load-balancing loss (the paper has none).
A token may be chosen by several experts or by none; one chosen by none gets 0 from
the layer and the residual carries it, like a dropped token under token choice.

Padding: a padding token scores -inf, so an expert reaches it only after every real
token, and each group's capacity is the capacity of its number of real tokens
(`moeify.switch.routing.group_capacities`, never more than that number): the slots past
it stay empty and hold no padding token. A sequence thus routes the same whether or not
padding follows it in a batch. The buffers keep the static C of the declared length.

Shapes are static by construction: ``topk`` with a Python int C gives ``[G, E, C]``
indices, so fx, torch.compile and ONNX export see fixed expert buffers. The dispatch is
a gather into an ``[E, G*C, d]`` buffer that the experts compute in one batched matmul
per weight (every slot is occupied but for padding, so nothing is gained by computing
occupied slots only); the combine is a scatter-add of the weighted outputs, because
several experts may write the same token: ONNX defines such repeated indices for an
``add`` reduction (ScatterND). Both are written as indexing (``x[rows]`` and
``index_put(..., accumulate=True)``, each the other's backward): on CPU that
accumulation runs several times faster than ``index_add`` / ``index_select``'s
backward, which scatter one row at a time.

An expert ranks each token against every other token of its group, later ones
included, so a causal model cannot route this way: at decoding time the later tokens
do not exist yet. The conversion keeps token choice at causal sites.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from moeify.switch.dispatch import Sizes, _group_index

__all__ = [
    "ExpertChoiceRouting",
    "combine_expert_choice",
    "dispatch_expert_choice",
    "route_expert_choice",
    "times_chosen",
]


class ExpertChoiceRouting(NamedTuple):
    """Everything the dispatch, the combine and the statistics need from the router.

    router_logits:   [G, T, E] router dtype (float32), before softmax.
    router_probs:    [G, T, E] router dtype, softmax over the experts: the scores.
    token_index:     [G, E, C] int64, the token of its group in each expert slot, the
                     highest score first.
    kept:            [G, E, C] bool, the slot holds a chosen token; False past the
                     group's capacity of real tokens (its token is computed, weight 0).
    combine_weights: [G, E, C] router dtype, the expert's score for the slot's token;
                     0 where not kept.
    valid:           [G, T] bool, the real (not padding) tokens; None: every token is.
    """

    router_logits: Tensor
    router_probs: Tensor
    token_index: Tensor
    kept: Tensor
    combine_weights: Tensor
    valid: Tensor | None = None


def route_expert_choice(
    router_logits: Tensor,
    *,
    expert_capacity: int,
    group_capacity: Tensor | None = None,
    valid: Tensor | None = None,
) -> ExpertChoiceRouting:
    """Each expert takes the ``expert_capacity`` tokens of a group it scores highest.

    router_logits: [G, T, E]. expert_capacity: C, a Python int (the buffers' size).
    group_capacity: [G, 1, 1] int64, each group's capacity for its real tokens
        (`group_capacities`): slots at or past it are not kept. None: C for every group.
    valid: [G, T] bool, the real tokens (None: all); padding scores -inf, so it comes
        after every real token and, with ``group_capacity``, is never kept.
    """
    probs = torch.softmax(router_logits, dim=-1)  # [G, T, E]
    scores = probs.transpose(1, 2)  # [G, E, T]
    if valid is not None:
        scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
    top, token_index = scores.topk(expert_capacity, dim=-1)  # [G, E, C], best first
    if valid is None:
        kept = torch.ones_like(token_index, dtype=torch.bool)
    else:
        kept = valid.gather(1, token_index.flatten(1)).view_as(token_index)
    if group_capacity is not None:
        slot = torch.arange(expert_capacity, device=token_index.device)  # [C]
        kept = kept & (slot < group_capacity)
    combine_weights = torch.where(kept, top, torch.zeros_like(top))
    return ExpertChoiceRouting(router_logits, probs, token_index, kept, combine_weights, valid)


def _token_rows(routing: ExpertChoiceRouting, sizes: Sizes) -> Tensor:
    """The row of each slot's token in the flattened ``[G*T, d]`` input: [E, G, C]."""
    group = _group_index(routing.token_index.flatten(1)).unsqueeze(-1)  # [G, 1, 1]
    rows = routing.token_index + group * sizes.tokens_per_group  # [G, E, C]
    return rows.transpose(0, 1)


def dispatch_expert_choice(x: Tensor, routing: ExpertChoiceRouting, sizes: Sizes) -> Tensor:
    """Gather each expert's tokens. x: [G, T, d] -> [E, G*C, d], group-major per expert."""
    rows = _token_rows(routing, sizes).flatten()  # [E*G*C]
    gathered = x.flatten(0, 1)[rows]  # [E*G*C, d]; backward: index_put, see the module docs
    return gathered.unflatten(0, (sizes.num_experts, -1))


def combine_expert_choice(expert_out: Tensor, routing: ExpertChoiceRouting, sizes: Sizes,
                          x: Tensor) -> Tensor:
    """Sum each token's weighted expert outputs. expert_out: [E, G*C, d] -> like x,
    [G, T, d], in expert_out's dtype; a token no expert kept comes out as exactly 0."""
    rows = _token_rows(routing, sizes).flatten()  # [E*G*C]
    weights = routing.combine_weights.transpose(0, 1).flatten().unsqueeze(-1)  # [E*G*C, 1]
    weighted = expert_out.flatten(0, 1) * weights.to(expert_out.dtype)  # [E*G*C, d]
    out = torch.zeros_like(x, dtype=weighted.dtype).flatten(0, 1)  # [G*T, d]
    return out.index_put((rows,), weighted, accumulate=True).view_as(x)


def times_chosen(routing: ExpertChoiceRouting) -> Tensor:
    """How many experts kept each token: [G, T] int64 (0: the token gets no expert)."""
    kept = routing.kept.flatten(1).to(torch.int64)  # [G, E*C]
    counts = torch.zeros_like(routing.router_logits[..., 0], dtype=torch.int64)  # [G, T]
    return counts.scatter_add(1, routing.token_index.flatten(1), kept)
