"""Auxiliary losses of a Switch layer, as free functions over one forward's routing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def load_balancing_loss(router_probs: Tensor, expert_index: Tensor, *, num_experts: int,
                        valid: Tensor | None = None) -> Tensor:
    """Switch Transformer eq. (4)-(6): ``E * sum_i f_i * P_i``, averaged over groups.

    router_probs: [G, T, E] float; expert_index: [G, T] int64, each token's *top* choice
    (counted before capacity drops, as in the paper and Mesh-TF). ``f_i`` is the fraction
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
