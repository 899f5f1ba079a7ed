"""Auxiliary losses of a Switch layer, as free functions over one forward's routing.

The balance losses take scores normalized per token: softmax probabilities as they are,
sigmoid scores divided by their sum per token (`moeify.switch.routing.normalized_scores`,
DeepSeek-V3's ``s'``), so both equal 1 under perfectly uniform routing whatever the
scoring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def load_balancing_loss(router_probs: Tensor, expert_index: Tensor, *, num_experts: int,
                        valid: Tensor | None = None) -> Tensor:
    """Switch Transformer eq. (4)-(6): ``E * sum_i f_i * P_i``, averaged over groups.

    router_probs: [G, T, E] float, normalized per token (the module docs); expert_index:
    [G, T] int64, each token's *top* choice (counted before capacity drops, as in the
    paper and Mesh-TF). ``f_i`` is the fraction
    of a group's tokens whose top choice is expert i, ``P_i`` the group's mean router
    probability for i. Equals 1 under perfectly uniform routing. Unweighted: the layer's
    ``aux_loss_coef`` (alpha) is applied by `moeify.aux_loss`.
    valid: [G, T] bool, the real tokens: padding counts in neither ``f_i`` nor ``P_i``,
    and a group without real tokens is left out of the average.
    """
    probs = router_probs.float()
    one_hot = F.one_hot(expert_index, num_experts).to(probs.dtype)  # [G, T, E]
    if valid is None:
        return (one_hot.mean(dim=1) * probs.mean(dim=1)).sum(-1).mean() * num_experts
    weight = valid.to(probs.dtype).unsqueeze(-1)  # [G, T, 1]
    tokens = weight.sum(dim=1)  # [G, 1]
    per_token = tokens.clamp(min=1)
    fraction = (one_hot * weight).sum(dim=1) / per_token  # [G, E]
    mean_prob = (probs * weight).sum(dim=1) / per_token  # [G, E]
    per_group = (fraction * mean_prob).sum(-1)  # [G]
    groups = (tokens.squeeze(-1) > 0).to(probs.dtype)
    return (per_group * groups).sum() / groups.sum().clamp(min=1) * num_experts


def sequence_balance_loss(scores: Tensor, expert_index: Tensor, *, num_experts: int,
                          seq_len: int, valid: Tensor | None = None) -> Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (eq. 17-20), unweighted:
    ``sum_i f_i * P_i`` per sequence, averaged over the sequences.

    scores: [G, T, E] float, normalized per token (each token's scores sum to 1: the
    softmax, or the sigmoid scores over their sum, DeepSeek-V3's ``s'``); expert_index:
    [G, T, k] int64, every token's k choices as routed (with the selection bias, if
    any). The G*T tokens are read as sequences of ``seq_len`` consecutive tokens (the
    layer input's sequences, whatever the routing groups are). Per sequence of T' real
    tokens, ``f_i = E / (k T') * (tokens having i among their k choices)`` and ``P_i`` the
    mean of expert i's normalized score; equals 1 under perfectly uniform routing.
    valid: [G, T] bool, the real tokens: padding counts in neither ``f_i`` nor ``P_i``,
    and a sequence without real tokens is left out of the average.
    """
    top_k = expert_index.shape[-1]
    probs = scores.float().reshape(-1, seq_len, num_experts)  # [B, S, E]
    chosen = F.one_hot(expert_index, num_experts).sum(dim=-2)  # [G, T, E]: 0 or 1
    chosen = chosen.reshape(probs.shape).to(probs.dtype)
    if valid is None:
        weight = torch.ones_like(probs[..., :1])
    else:
        weight = valid.reshape(-1, seq_len, 1).to(probs.dtype)  # [B, S, 1]
    tokens = weight.sum(dim=1)  # [B, 1]
    per_token = tokens.clamp(min=1)
    fraction = (chosen * weight).sum(dim=1) * (num_experts / top_k) / per_token  # [B, E]
    mean_score = (probs * weight).sum(dim=1) / per_token  # [B, E]
    per_sequence = (fraction * mean_score).sum(-1)  # [B]
    sequences = (tokens.squeeze(-1) > 0).to(probs.dtype)
    return (per_sequence * sequences).sum() / sequences.sum().clamp(min=1)


def router_z_loss(router_logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """ST-MoE eq. (5): ``mean over tokens of logsumexp(logits)^2``; unweighted (beta later).

    router_logits: [G, T, E]; valid: [G, T] bool, the real tokens (the mean is over them).
    Penalizes large logits, which keeps the float32 softmax of the router in a
    well-conditioned range.
    """
    squared = torch.logsumexp(router_logits.float(), dim=-1).square()  # [G, T]
    if valid is None:
        return squared.mean()
    weight = valid.to(squared.dtype)
    return (squared * weight).sum() / weight.sum().clamp(min=1)
