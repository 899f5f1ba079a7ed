"""The Switch layers `bench_layer.py` times, built with the same weights, and the check
that they compute the same function.

Implementations: moeify's `SwitchFFN` with distinct random experts (`build_moeify`), the
same layer forced onto one dispatch path (`Forced`), the dense FFN of the same shape
(`build_dense`), transformers' ``SwitchTransformersSparseMLP`` holding moeify's weights
(`build_hf`) and a GShard-style one-hot einsum layer (`OneHotEinsum`); `Residual` wraps
any of them as the residual block users run. `check_equivalence` compares their eval
outputs token by token and raises `EquivalenceError` on a mismatch; `switch_routing` and
`hf_routing` tell which tokens HF's bfloat16 router sent elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeify import DenseFFNWeights, MoEConfig, SwitchFFN
from moeify.switch import DispatchPath

CAPACITY_FACTOR = 1.25


def build_moeify(
    d: int, f: int, experts: int, *, seq_len: int, generator: torch.Generator,
    capacity_factor: float = CAPACITY_FACTOR, min_capacity: int | None = None,
) -> tuple[SwitchFFN, DenseFFNWeights]:
    """A Switch layer with distinct random experts and a router at realistic scale, and a
    random dense FFN of the same shape. ``min_capacity=None`` keeps MoEConfig's default.

    Not upcycled: upcycled experts are identical and a new router is tiny, which makes the
    routing uniform-random, and the equivalence check could not tell experts apart. The
    layer is built on the meta device and every parameter drawn once, N(0, 1/fan_in):
    the constructor's truncated-normal init would take ~25 s per layer at d=768, f=3072,
    E=64 on 2 cores, only to be overwritten.
    """
    dense = DenseFFNWeights(
        w_in=torch.randn(d, f, generator=generator) / math.sqrt(d),
        w_out=torch.randn(f, d, generator=generator) / math.sqrt(f),
    )
    extra = {} if min_capacity is None else {"min_capacity": min_capacity}
    moe_cfg = MoEConfig(
        num_experts=experts, capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor, expert_dropout=0.0, jitter_eps=0.0, **extra,
    )
    layer = SwitchFFN(d, f, moe_cfg, seq_len=seq_len, device="meta").to_empty(device="cpu")
    buffers = [name for name, _ in layer.named_buffers()]
    if buffers:
        raise RuntimeError(f"SwitchFFN now has buffers {buffers}: initialize them here")
    with torch.no_grad():
        for param in layer.parameters():  # router [E, d], w_in [E, d, f], w_out [E, f, d]
            param.normal_(0.0, 1 / math.sqrt(param.shape[1]), generator=generator)
    return layer, dense


class Forced(nn.Module):
    """The moeify layer (same module, same parameters) run on one forced dispatch path."""

    def __init__(self, layer: SwitchFFN, path: DispatchPath) -> None:
        super().__init__()
        self.layer = layer
        self.path = path

    def forward(self, x: Tensor) -> Tensor:
        previous = self.layer.dispatch_path
        self.layer.dispatch_path = self.path
        try:
            return self.layer(x)
        finally:
            self.layer.dispatch_path = previous


class Residual(nn.Module):
    """``x + ffn(x)``: the residual block users run, the same for every implementation."""

    def __init__(self, ffn: nn.Module) -> None:
        super().__init__()
        self.ffn = ffn

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ffn(x)


def build_dense(dense: DenseFFNWeights) -> nn.Module:
    d, f = dense.w_in.shape
    ffn = nn.Sequential(nn.Linear(d, f, bias=False), nn.ReLU(), nn.Linear(f, d, bias=False))
    with torch.no_grad():
        ffn[0].weight.copy_(dense.w_in.T)
        ffn[2].weight.copy_(dense.w_out.T)
    return ffn


# From this release on, HF's SparseMLP routes the unflattened [batch, seq, d] input, so its
# expert capacity applies per sequence as moeify's does; before it the capacity applied to
# the whole flattened batch (a different layer: the equivalence check fails on 80-90% of
# the tokens).
HF_PER_SEQUENCE_ROUTING = (5, 18)


def build_hf(layer: SwitchFFN) -> nn.Module:
    """HF's SparseMLP with moeify's weights. Its forward (transformers 5.x) returns the
    output tensor alone; the router works per sequence with an absolute capacity."""
    import transformers
    from transformers import SwitchTransformersConfig

    version = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    if version < HF_PER_SEQUENCE_ROUTING:
        raise SystemExit(
            f"error: transformers {transformers.__version__} applies SparseMLP's capacity to "
            f"the whole flattened batch; the hf comparison needs transformers >= "
            f"{'.'.join(map(str, HF_PER_SEQUENCE_ROUTING))} (per-sequence capacity, as "
            f"moeify): upgrade it, or leave hf out with --impls")
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP,
    )

    E = layer.config.num_experts
    config = SwitchTransformersConfig(
        d_model=layer.d_model, d_ff=layer.d_ff, num_experts=E,
        expert_capacity=layer.expert_capacity, router_jitter_noise=0.0, dropout_rate=0.0,
        dense_act_fn="relu", router_bias=False,
    )
    with torch.device("meta"):  # no random init of E experts we overwrite anyway
        mlp = SwitchTransformersSparseMLP(config)
    mlp.to_empty(device=layer.router.weight.device)
    with torch.no_grad():
        mlp.router.classifier.weight.copy_(layer.router.weight)
        for e in range(E):
            expert = mlp.experts[f"expert_{e}"]
            expert.wi.weight.copy_(layer.experts.w_in[e].T)
            expert.wo.weight.copy_(layer.experts.w_out[e].T)
    return mlp


def keep_hf_router_float32(mlp: nn.Module, layer: SwitchFFN) -> None:
    """After a dtype cast: HF's router classifier back in float32 with moeify's weight
    (HF computes the router in float32; the cast would have rounded the weight)."""
    classifier = mlp.router.classifier
    classifier.to(torch.float32)
    with torch.no_grad():
        classifier.weight.copy_(layer.router.weight.float())


def hf_routing(mlp: nn.Module, x: Tensor) -> Tensor:
    """The expert HF's router sends each token of x [B, S, d] to: [B*S] int64, -1 where
    the token is over capacity (HF's dispatch mask is all zero for it)."""
    mask, _, _ = mlp.router(x)  # [B, S, E] one-hot, zero when dropped
    index = mask.argmax(dim=-1)
    return torch.where(mask.sum(dim=-1) > 0, index, -1).flatten()


def switch_routing(x: Tensor, router_weight: Tensor, capacity: int) -> Tensor:
    """Reference top-1 Switch routing in float32 (DESIGN.md section 2), one group per
    sequence: [B*S] int64 expert per token, -1 where over capacity."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        logits = F.linear(x.float(), router_weight.float())  # [B, S, E]
        index = torch.softmax(logits, dim=-1).argmax(dim=-1)  # [B, S]
    one_hot = F.one_hot(index, router_weight.shape[0])
    position = (one_hot.cumsum(dim=1) * one_hot).sum(-1) - 1  # slot claimed in order
    return torch.where(position < capacity, index, -1).flatten()


class OneHotEinsum(nn.Module):
    """GShard / Mesh-TF / DeepSpeed style top-1 layer: one-hot ``[G, T, E, C]`` dispatch and
    combine tensors contracted with einsum. Shares the moeify layer's Parameters.

    Same routing as moeify: argmax of ``softmax(x @ router.T)``, slots claimed in token
    order (cumsum priority over the group), tokens beyond capacity C dropped (output 0),
    combine weight = the chosen expert's probability.
    """

    def __init__(self, layer: SwitchFFN) -> None:
        super().__init__()
        self.router_weight = layer.router.weight  # [E, d]
        self.w_in = layer.experts.w_in  # [E, d, f]
        self.w_out = layer.experts.w_out  # [E, f, d]
        self.layer = layer  # for the capacity of the current mode

    def forward(self, x: Tensor) -> Tensor:  # [G, T, d]
        E, C = self.router_weight.shape[0], self.layer.expert_capacity
        G, T, d = x.shape
        probs = torch.softmax(F.linear(x, self.router_weight), dim=-1)  # [G, T, E]
        gate, index = probs.max(dim=-1)  # [G, T]
        expert_mask = F.one_hot(index, E)  # [G, T, E]
        position = (expert_mask.cumsum(dim=1) * expert_mask).sum(-1) - 1  # [G, T]
        kept = position < C
        expert_mask = (expert_mask * kept.unsqueeze(-1)).to(x.dtype)
        slot_mask = F.one_hot(torch.where(kept, position, 0), C).to(x.dtype)  # [G, T, C]
        dispatch = expert_mask.unsqueeze(-1) * slot_mask.unsqueeze(-2)  # [G, T, E, C]
        combine = dispatch * gate.unsqueeze(-1).unsqueeze(-1).to(x.dtype)
        dispatched = torch.einsum("gtec,gtd->egcd", dispatch, x).reshape(E, G * C, d)
        hidden = torch.relu(torch.bmm(dispatched, self.w_in))
        expert_out = torch.bmm(hidden, self.w_out).reshape(E, G, C, d)
        return torch.einsum("gtec,egcd->gtd", combine, expert_out)


# ------------------------------------------------------------------- equivalence


class EquivalenceError(AssertionError):
    """An implementation computes a different function from moeify's layer."""


@dataclasses.dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    max_rerouted: float  # fraction of tokens an implementation may route differently


TOLERANCES = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-5, max_rerouted=0.0),
    "bf16": Tolerance(atol=2e-2, rtol=2e-2, max_rerouted=0.05),
}


@dataclasses.dataclass(frozen=True)
class Agreement:
    """How one implementation's eval output compares with the reference's."""

    max_abs_diff: float  # float32, over the compared tokens
    rerouted: int  # tokens it routed differently (left out of the comparison)
    tokens: int


def check_equivalence(
    outputs: dict[str, Tensor], tolerance: Tolerance, *, reference: str = "moeify",
    rerouted: dict[str, Tensor] | None = None, where: str = "",
) -> dict[str, Agreement]:
    """Compare every output ``[..., d]`` with the reference's, token by token, in float32.

    ``rerouted[name]``: bool per token, where that implementation's own router chose a
    different expert (or slot fate) than the reference routing; those tokens are left out
    and counted. Raises `EquivalenceError` when a compared token differs beyond the
    tolerance or too many tokens were rerouted.
    """
    rerouted = rerouted or {}
    ref = outputs[reference].float().flatten(0, -2)
    result = {}
    for name, out in outputs.items():
        if name == reference:
            continue
        out = out.float().flatten(0, -2)
        if out.shape != ref.shape:
            raise EquivalenceError(
                f"{name} output {tuple(out.shape)} != {tuple(ref.shape)} {where}")
        skip = rerouted.get(name, torch.zeros(ref.shape[0], dtype=torch.bool)).to(ref.device)
        n_skip = int(skip.sum())
        if n_skip > tolerance.max_rerouted * ref.shape[0]:
            raise EquivalenceError(
                f"{name} routes {n_skip}/{ref.shape[0]} tokens differently from the float32 "
                f"Switch routing (allowed {tolerance.max_rerouted:.0%}) {where}"
            )
        keep = ~skip
        diff = (out[keep] - ref[keep]).abs()
        max_diff = float(diff.max()) if diff.numel() else 0.0
        bad = diff > tolerance.atol + tolerance.rtol * ref[keep].abs()
        if bad.any() or not torch.isfinite(out[keep]).all():
            n_bad = int(bad.any(dim=-1).sum())
            raise EquivalenceError(
                f"{name} differs from {reference} {where}: {n_bad} tokens beyond atol "
                f"{tolerance.atol:g} / rtol {tolerance.rtol:g}, max |diff| {max_diff:.3g}"
            )
        result[name] = Agreement(max_diff, n_skip, ref.shape[0])
    return result
