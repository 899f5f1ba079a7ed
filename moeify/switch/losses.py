"""Auxiliary losses of a Switch layer, as free functions over one forward's routing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def load_balancing_loss(router_probs: Tensor, expert_index: Tensor, *, num_experts: int) -> Tensor:
    """Switch Transformer eq. (4)-(6): ``E * sum_i f_i * P_i``, averaged over groups.

    router_probs: [G, T, E] float; expert_index: [G, T] int64, each token's *top* choice
    (counted before capacity drops, as in the paper and Mesh-TF). ``f_i`` is the fraction
    of a group's tokens whose top choice is expert i, ``P_i`` the group's mean router
    probability for i. Equals 1 under perfectly uniform routing. Unweighted: the layer's
    ``aux_loss_coef`` (alpha) is applied by `moeify.aux_loss`.
    """
    probs = router_probs.float()
    fraction = F.one_hot(expert_index, num_experts).to(probs.dtype).mean(dim=1)  # [G, E]
    mean_prob = probs.mean(dim=1)  # [G, E]
    return (fraction * mean_prob).sum(-1).mean() * num_experts


def router_z_loss(router_logits: Tensor) -> Tensor:
    """ST-MoE eq. (5): ``mean over tokens of logsumexp(logits)^2``; unweighted (beta later).

    router_logits: [G, T, E]. Penalizes large logits, which keeps the float32 softmax of
    the router in a well-conditioned range.
    """
    return torch.logsumexp(router_logits.float(), dim=-1).square().mean()
