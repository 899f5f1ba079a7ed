"""The router: ``Linear(d_model, E, bias=False)`` computed in float32 (selective precision)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moeify.switch.routing import compute_router_logits


class Router(nn.Module):
    """``Linear(d_model, E, bias=False)`` computed in float32 whatever the model dtype.

    Training adds the Switch recipe's multiplicative jitter to the router *input*
    (a new tensor; the caller's activations are never touched). New weights: truncated
    normal, std ``sqrt(0.1 / d_model)``, cut at 2 std (the paper's reduced scale).
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
        never rounded through the cast dtype)."""
        before = self.weight.data
        super()._apply(fn, recurse)
        if self.weight.dtype != self.router_dtype:
            self.weight.data = before.to(device=self.weight.device, dtype=self.router_dtype)
        return self

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., d] -> router_logits [..., E] in the router dtype."""
        dtype = self.router_dtype
        jitter = None
        if self.training and self.jitter_eps > 0:
            eps = self.jitter_eps
            jitter = torch.rand_like(x, dtype=dtype) * (2 * eps) + (1 - eps)
        return compute_router_logits(x, self.weight, dtype=dtype, jitter=jitter)
