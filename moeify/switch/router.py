"""The router part of a Switch layer: scores, selection, losses and the routing record.

`Router` holds the weight of ``Linear(d_model, E, bias=False)`` and computes the router
logits in float32 (selective precision); its two kinds select differently:

* `TokenChoiceRouter`: every token picks its top-k experts, earlier tokens claim the
  capacity first (`moeify.switch.routing.route`); GShard's random second choice in
  training. Selection: a `Routing`.
* `ExpertChoiceRouter`: every expert picks its top-C tokens of each group
  (`moeify.switch.expert_choice`). Selection: an `ExpertChoiceRouting`.

Both turn their selection into one `RoutingRecord` (losses and statistics of a forward)
with `Router.record`; the layer keeps the last one for `moeify.aux_loss` and
`moeify.routing_stats`.

Auxiliary-loss-free balancing (``MoEConfig.bias_balancing``; Wang et al. 2024, DeepSeek-V3)
lives in `TokenChoiceRouter`: its ``expert_bias`` buffer joins the scores for the
selection, and while `moeify.balance_experts` is attached its ``expert_load`` buffer
counts what the router asked of each expert; the update itself is
`moeify.switch.balance`'s.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeify.config import Gate, MoEConfig, Scoring
from moeify.switch.dispatch import Sizes
from moeify.switch.expert_choice import ExpertChoiceRouting, route_expert_choice, times_chosen
from moeify.switch.losses import load_balancing_loss, router_z_loss, sequence_balance_loss
from moeify.switch.routing import Routing, compute_router_logits, normalized_scores, route


class RoutingRecord(NamedTuple):
    """What one forward of a Switch layer leaves behind for losses and statistics.

    load_balancing_loss: scalar float32 with gradient, unweighted; a constant 0 for an
                         expert-choice layer (balanced by construction).
    z_loss:              scalar float32 with gradient, unweighted.
    seq_balance_loss:    scalar float32 with gradient, unweighted: DeepSeek-V3's
                         sequence-wise balance loss (`sequence_balance_loss`), computed
                         only where ``seq_aux_loss_coef > 0``; else, and for an
                         expert-choice layer, a constant 0.
    tokens_per_expert:   [E] int64, assignments each expert processed (all groups);
                         expert choice: C per group, fewer in groups with padding.
    dropped_fraction:    scalar float32, fraction of the real tokens no expert
                         processed (expert choice: that no expert chose).
    expert_capacity:     slots per expert and group in that forward.
    num_tokens:          real tokens in that forward.
    num_sequences:       sequences with a real token in that forward (what
                         ``seq_balance_loss`` averages over).
    """

    load_balancing_loss: Tensor
    z_loss: Tensor
    seq_balance_loss: Tensor
    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    expert_capacity: int
    num_tokens: int
    num_sequences: int


class Router(nn.Module):
    """``Linear(d_model, E, bias=False)`` computed in float32 whatever the model dtype.

    Training adds the Switch recipe's multiplicative jitter to the router *input*
    (a new tensor; the caller's activations are never touched). New weights: truncated
    normal, std ``sqrt(0.1 / d_model)``, cut at 2 std (the paper's reduced scale).

    ``forward`` gives the router logits; the two kinds add the selection (`route`) and
    the record of a forward (`record`).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        jitter_eps: float = 0.0,
        router_dtype: str = "float32",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.jitter_eps = jitter_eps
        self.router_dtype = getattr(torch, router_dtype)
        self.weight = nn.Parameter(
            torch.empty(num_experts, d_model, device=device, dtype=self.router_dtype)
        )
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        if self.weight.device.type == "meta":
            return
        std = math.sqrt(0.1 / self.weight.shape[1])
        nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std, generator=generator)

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply; dtype casts (``model.to(torch.bfloat16)``, ``.half()``)
        leave the router weight in the router dtype with its values (selective precision:
        never rounded through the cast dtype), and the buffers (the float32 selection
        bias and loads of bias balancing) in their dtype."""
        before = self.weight.data
        buffers = dict(self._buffers)
        super()._apply(fn, recurse)
        if self.weight.dtype != self.router_dtype:
            self.weight.data = before.to(device=self.weight.device, dtype=self.router_dtype)
        for name, old in buffers.items():
            new = self._buffers[name]
            if old is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def configure(self, config: MoEConfig) -> None:
        """Take the routing options of ``config``: what a layer's config holds for its
        router (see `SwitchFFN.config`)."""
        self.jitter_eps = config.jitter_eps

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., d] -> router_logits [..., E] in the router dtype."""
        dtype = self.router_dtype
        jitter = None
        if self.training and self.jitter_eps > 0:
            eps = self.jitter_eps
            jitter = torch.rand_like(x, dtype=dtype) * (2 * eps) + (1 - eps)
        return compute_router_logits(x, self.weight, dtype=dtype, jitter=jitter)

    def route(self, x: Tensor, sizes: Sizes, *, group_capacity: Tensor | None = None,
              valid: Tensor | None = None) -> Routing | ExpertChoiceRouting:
        """The selection for grouped tokens x: [G, T, d].

        sizes: the static sizes (C is the capacity of the buffers); group_capacity:
        [G, 1, 1] int64, each group's capacity for its real tokens, or None (C for every
        group); valid: [G, T] bool, the real tokens (None: all).
        """
        raise NotImplementedError(f"{type(self).__name__} computes logits only: a Switch "
                                  "layer routes with a TokenChoiceRouter or ExpertChoiceRouter")

    def record(self, routing: Routing | ExpertChoiceRouting, tokens_per_expert: list[int] | None,
               expert_capacity: int, *, seq_len: int) -> RoutingRecord:
        """The losses and statistics of one forward's selection. ``tokens_per_expert``:
        the counts a dispatcher already took (None: counted here); ``seq_len``: the
        length of the layer input's sequences (its second-to-last axis), which groups
        need not be (``group_size``)."""
        raise NotImplementedError(f"{type(self).__name__} computes logits only")


class TokenChoiceRouter(Router):
    """Tokens choose their top-``top_k`` experts (Switch top-1, GShard top-2, any k);
    ``random_routing``: GShard's random second expert in training (top-2).

    ``scoring``, ``gate`` and ``routed_scaling`` turn the logits into the selection and
    the combine weights (`moeify.switch.routing.route`). ``seq_balance``: compute the
    sequence-wise balance loss in `record` (``MoEConfig.seq_aux_loss_coef > 0``).

    ``bias_balancing`` (fixed at construction: it decides the state dict) registers
    ``expert_bias``, a persistent float32 ``[E]`` buffer of zeros outside autograd that
    is added to the scores to select the experts, in training and in evaluation alike
    (DeepSeek-V3 routes with the bias at inference too); the combine weights and the
    losses use the unbiased scores, so the router weight's gradient does not see it.
    ``expert_load`` is None until `moeify.balance_experts` attaches an update to an
    optimizer: from then on a float32 ``[E]`` buffer (not saved) adding up, in every
    training forward, the top-k choices of the real tokens (what the router asked of
    each expert, before random routing and capacity drops), on the device, with no
    host synchronization; the update reads and clears it.
    """

    def __init__(self, d_model: int, num_experts: int, *, top_k: int = 1,
                 gate: Gate = Gate.SOFTMAX, scoring: Scoring = Scoring.SOFTMAX,
                 routed_scaling: float = 1.0, bias_balancing: bool = False,
                 bias_update_rate: float = 1e-3, seq_balance: bool = False,
                 jitter_eps: float = 0.0, router_dtype: str = "float32",
                 random_routing: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__(d_model, num_experts, jitter_eps=jitter_eps,
                         router_dtype=router_dtype, device=device)
        self.top_k, self.gate, self.scoring = top_k, Gate(gate), Scoring(scoring)
        self.routed_scaling = routed_scaling
        self.random_routing = random_routing  # MoEConfig.uses_random_routing states the default
        self.bias_update_rate, self.seq_balance = bias_update_rate, seq_balance
        if bias_balancing:
            self.register_buffer("expert_bias", torch.zeros(num_experts, device=device,
                                                            dtype=torch.float32))
            self.register_buffer("expert_load", None, persistent=False)

    @property
    def bias_balancing(self) -> bool:
        """Whether the router has a selection bias (``MoEConfig.bias_balancing``)."""
        return "expert_bias" in self._buffers

    def configure(self, config: MoEConfig) -> None:
        super().configure(config)
        self.top_k, self.gate, self.scoring = config.top_k, config.gate, config.scoring
        self.routed_scaling = config.routed_scaling
        self.random_routing = config.uses_random_routing
        self.bias_update_rate = config.bias_update_rate
        self.seq_balance = config.seq_aux_loss_coef > 0

    def route(self, x: Tensor, sizes: Sizes, *, group_capacity: Tensor | None = None,
              valid: Tensor | None = None) -> Routing:
        router_logits = self(x)  # [G, T, E] float32
        uniform = None
        if self.training and self.random_routing:
            uniform = torch.rand_like(router_logits[..., 0])  # GShard random routing
        capacity = sizes.expert_capacity if group_capacity is None else group_capacity
        routing = route(
            router_logits, num_experts=self.num_experts, top_k=self.top_k,
            expert_capacity=capacity, gate=self.gate, scoring=self.scoring,
            selection_bias=self.expert_bias if self.bias_balancing else None,
            routed_scaling=self.routed_scaling, second_uniform=uniform, valid=valid,
        )
        if self.training and self.bias_balancing and self.expert_load is not None:
            self._count_load(routing)
        return routing

    @torch.no_grad()
    def _count_load(self, routing: Routing) -> None:
        """Add this forward's top-k choices of real tokens to ``expert_load`` (device
        ops only: no host synchronization)."""
        index = routing.expert_index.flatten()
        if routing.valid is None:
            asked = torch.ones_like(index, dtype=self.expert_load.dtype)
        else:
            asked = routing.valid.unsqueeze(-1).expand_as(routing.expert_index).flatten()
            asked = asked.to(self.expert_load.dtype)
        self.expert_load.index_add_(0, index, asked)

    def record(self, routing: Routing, tokens_per_expert: list[int] | None,
               expert_capacity: int, *, seq_len: int) -> RoutingRecord:
        E = self.num_experts
        if tokens_per_expert is None:
            assigned = F.one_hot(routing.expert_index, E) * routing.kept.unsqueeze(-1)
            counts = assigned.sum(dim=(0, 1, 2)).detach()
        else:
            counts = torch.tensor(tokens_per_expert, dtype=torch.int64)
        reached = routing.kept.any(dim=-1)  # [G, T]
        valid = routing.valid
        real = reached.numel() if valid is None else int(valid.sum())
        # sigmoid scores need not sum to 1: the losses use them normalized per token
        scores = normalized_scores(routing.router_probs, self.scoring)
        if self.seq_balance:
            seq_loss = sequence_balance_loss(scores, routing.expert_index, num_experts=E,
                                             seq_len=seq_len, valid=valid)
        else:
            seq_loss = torch.zeros((), device=scores.device)
        return RoutingRecord(
            load_balancing_loss=load_balancing_loss(
                scores, routing.expert_index[..., 0], num_experts=E, valid=valid
            ),
            z_loss=router_z_loss(routing.router_logits, valid),
            seq_balance_loss=seq_loss,
            tokens_per_expert=counts,
            dropped_fraction=(1.0 - reached.sum().float() / max(real, 1)).detach(),
            expert_capacity=expert_capacity,
            num_tokens=real,
            num_sequences=real_sequences(valid, reached.numel(), seq_len),
        )

    def extra_repr(self) -> str:
        extra = "".join([
            f", scoring={self.scoring.value}" if self.scoring != Scoring.SOFTMAX else "",
            f", routed_scaling={self.routed_scaling}" if self.routed_scaling != 1.0 else "",
            ", bias_balancing=True" if self.bias_balancing else "",
            ", random_routing=True" if self.random_routing else "",
        ])
        return f"top_k={self.top_k}, gate={self.gate.value}{extra}"


def real_sequences(valid: Tensor | None, num_tokens: int, seq_len: int) -> int:
    """Sequences of ``seq_len`` tokens among ``num_tokens`` that hold a real token
    (``valid``: [G, T] bool or None, every token real)."""
    if valid is None:
        return num_tokens // seq_len
    return int(valid.reshape(-1, seq_len).any(dim=-1).sum())


class ExpertChoiceRouter(Router):
    """Experts choose their top-C tokens of each group (Zhou et al. 2022); each pair's
    weight is the expert's softmax score for the token, times ``routed_scaling``."""

    def __init__(self, d_model: int, num_experts: int, *, routed_scaling: float = 1.0,
                 jitter_eps: float = 0.0, router_dtype: str = "float32",
                 device: torch.device | str | None = None) -> None:
        super().__init__(d_model, num_experts, jitter_eps=jitter_eps,
                         router_dtype=router_dtype, device=device)
        self.routed_scaling = routed_scaling

    def configure(self, config: MoEConfig) -> None:
        super().configure(config)
        self.routed_scaling = config.routed_scaling

    def route(self, x: Tensor, sizes: Sizes, *, group_capacity: Tensor | None = None,
              valid: Tensor | None = None) -> ExpertChoiceRouting:
        routing = route_expert_choice(self(x), expert_capacity=sizes.expert_capacity,
                                      valid=valid, group_capacity=group_capacity)
        if self.routed_scaling != 1.0:
            routing = routing._replace(
                combine_weights=routing.combine_weights * self.routed_scaling)
        return routing

    def record(self, routing: ExpertChoiceRouting, tokens_per_expert: list[int] | None,
               expert_capacity: int, *, seq_len: int) -> RoutingRecord:
        valid = routing.valid
        chosen = times_chosen(routing) > 0  # [G, T]; padding is never chosen
        real = chosen.numel() if valid is None else int(valid.sum())
        return RoutingRecord(
            load_balancing_loss=torch.zeros((), device=chosen.device),
            z_loss=router_z_loss(routing.router_logits, valid),
            seq_balance_loss=torch.zeros((), device=chosen.device),
            tokens_per_expert=routing.kept.sum(dim=(0, 2)).detach(),
            dropped_fraction=(1.0 - chosen.sum().float() / max(real, 1)).detach(),
            expert_capacity=expert_capacity,
            num_tokens=real,
            num_sequences=real_sequences(valid, chosen.numel(), seq_len),
        )
