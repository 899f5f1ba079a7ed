"""Sparse upcycling: the initial tensors of a Switch layer made from one dense FFN.

`upcycled_tensors` is the one definition of what a new Switch layer holds: every route
that creates one reads it (`SwitchFFN.from_dense`, the conversion passes through it, and
the streaming checkpoint writer, which writes the tensors without building the layer).
So the same config, seed and site path give bitwise identical weights whichever route
made them, on any device: random numbers are always drawn on the CPU from generators
seeded by ``(config.seed, site path, purpose)``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from moeify.config import Activation, Init, MoEConfig
from moeify.switch.experts import HIDDEN_AXIS, DenseFFNWeights, Experts
from moeify.switch.router import Router
from moeify.switch.shared import SharedExperts


def seeded_generator(seed: int, path: str, purpose: str) -> torch.Generator:
    """A CPU generator seeded by the config seed, the site's path and the purpose.

    Independent of the order and number of sites, so converting more layers does not
    change the weights of the others.
    """
    mixed = (seed * 1_000_003 + zlib.crc32(f"{purpose}:{path}".encode())) % (2**63)
    return torch.Generator().manual_seed(mixed)


@dataclass(frozen=True)
class TensorSource:
    """A tensor's initial value: ``tensor`` itself, or ``repeat`` copies of it stacked on
    a new leading (expert) axis, which a writer streams without materializing them."""

    tensor: Tensor
    repeat: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        base = tuple(self.tensor.shape)
        return base if self.repeat is None else (self.repeat, *base)

    def chunks(self) -> list[Tensor]:
        """The value's bytes in order, as tensors (a repeated tensor ``repeat`` times)."""
        return [self.tensor] if self.repeat is None else [self.tensor] * self.repeat

    def copy_to(self, target: Tensor) -> None:
        value = self.tensor if self.repeat is None else self.tensor.expand(self.shape)
        with torch.no_grad():
            target.copy_(value)


def upcycled_tensors(
    dense: DenseFFNWeights,
    config: MoEConfig,
    *,
    path: str,
    activation: Activation | str = Activation.RELU,
) -> dict[str, TensorSource]:
    """The initial value of every parameter of the Switch layer made from ``dense``,
    by name relative to the layer (``router.weight``, ``experts.w_in``, ...).

    Router: truncated normal, std ``sqrt(0.1 / d_model)`` (`Router.reset_parameters`).
    Experts (``config.init``): ``copy`` (each expert the dense FFN, plus ``noise``),
    ``partition`` (the hidden neurons split into E groups), ``random``, or ``drop``
    (copies with ``drop_ratio`` of each expert's neurons re-initialized); with
    ``granularity`` G > 1, copies of G slices of the hidden neurons and one router row
    per copy repeated G times (`MoEConfig.granularity`). Upcycled experts' output
    projections (``w_out``, ``b_out``) are then scaled by `routed_output_scale`. Plain
    copies come back as one dense tensor repeated E times (nothing is materialized); the
    dense weights must then not be changed before the values are used.

    Shared experts (``config.shared_experts``), ``shared_experts.ffn.*`` and
    ``shared_experts.gate.weight``: see `shared_expert_tensors`.
    """
    E, G = config.num_experts, config.granularity
    d_model = dense.w_in.shape[0]
    # granular: one router row per copy of the dense FFN, repeated for its G slices
    router = Router(d_model, E // G, router_dtype=config.router_dtype, device="cpu")
    router.reset_parameters(seeded_generator(config.seed, path, "router"))
    weight = router.weight.detach()
    tensors = {"router.weight": TensorSource(weight.repeat_interleave(G, dim=0) if G > 1
                                             else weight)}
    if config.bias_balancing:  # the selection bias starts with no preference
        tensors["router.expert_bias"] = TensorSource(torch.zeros(E, dtype=torch.float32))
    pairs = {"w_in": dense.w_in, "w_out": dense.w_out, "w_gate": dense.w_gate,
             "b_in": dense.b_in, "b_out": dense.b_out, "b_gate": dense.b_gate}
    scale = routed_output_scale(config)
    if config.shared_experts:
        tensors.update(shared_expert_tensors(dense, config, path=path, activation=activation))
    if config.plain_copies:
        for name, source in pairs.items():
            if source is not None:
                value = source.detach()
                if name in _OUTPUT_PROJECTION and scale != 1:
                    value = value * scale
                tensors[f"experts.{name}"] = TensorSource(value.contiguous(), repeat=E)
        return tensors
    d_ff = config.expert_width(dense.w_in.shape[1])
    experts = Experts(E, d_model, d_ff, activation=activation, gated=dense.w_gate is not None,
                      bias=dense.b_in is not None, device="meta", dtype=dense.w_in.dtype)
    experts = experts.to_empty(device="cpu")
    cpu = DenseFFNWeights(**{k: None if t is None else t.detach().cpu() for k, t in pairs.items()})
    experts.load_dense(cpu, init=config.init, noise=config.noise, drop_ratio=config.drop_ratio,
                       granularity=G, generator=seeded_generator(config.seed, path, "experts"))
    for name, param in experts.named_parameters():
        value = param.detach()
        if name in _OUTPUT_PROJECTION and scale != 1:
            value.mul_(scale)
        tensors[f"experts.{name}"] = TensorSource(value)
    return tensors


# the output projection of an FFN: what the upcycling scales
_OUTPUT_PROJECTION = ("w_out", "b_out")


def routed_output_scale(config: MoEConfig) -> float:
    """The factor on the routed experts' output projections (``w_out`` and ``b_out``)
    made from the dense FFN, on top of the granular factor G (`MoEConfig.granularity`).

    ``G / (N + G)`` with N shared experts (the routed experts hold one copy of the dense
    FFN at init, the shared ones N / G more: each gets its share), divided by
    ``routed_scaling`` (which multiplies the routed output back); 1 by default, and for
    ``init="random"``, whose experts owe the dense FFN nothing.
    """
    if config.init == Init.RANDOM:
        return 1.0
    return shared_split(config) / config.routed_scaling


def shared_split(config: MoEConfig) -> float:
    """``G / (N + G)``: the dense FFN's share each of its N / G + 1 copies in an upcycled
    layer carries (N shared experts, granularity G; 1 without shared experts)."""
    G = config.granularity
    return G / (config.shared_experts + G)


def shared_output_scale(config: MoEConfig) -> float:
    """The factor on the upcycled shared experts' ``w_out``: ``G / (N + G)``, doubled
    with the shared gate (it starts at ``sigmoid(0) = 1/2``). Their ``b_out`` is the dense
    one times this factor times ``N / G``: the concatenated FFN adds it once, for N / G
    copies (see `shared_expert_tensors`)."""
    return shared_split(config) * (2 if config.shared_gate else 1)


def shared_expert_tensors(
    dense: DenseFFNWeights,
    config: MoEConfig,
    *,
    path: str,
    activation: Activation | str = Activation.RELU,
) -> dict[str, TensorSource]:
    """The initial shared experts of the Switch layer made from ``dense``, by name
    relative to the layer (``shared_experts.ffn.w_in``, ..., ``shared_experts.gate.weight``).

    Upcycled (``init`` copy or drop; `MoEConfig.shared_experts`): shared expert j is
    slice ``j % G`` of the dense FFN's hidden neurons (G = ``granularity``), so the N
    shared experts, one FFN of ``N * d_ff / G`` hidden neurons, are N / G copies of the
    dense FFN side by side: ``w_in`` / ``w_gate`` / ``b_in`` / ``b_gate`` the dense ones
    repeated along the hidden axis, ``w_out`` repeated and scaled by
    `shared_output_scale`, ``b_out`` the dense one times that scale times N / G. The gate
    row is 0. With the routed experts scaled by `routed_output_scale`, the layer then
    starts as the dense FFN: ``c * dense + (N / G) * c * dense = dense`` for
    ``c = G / (N + G)``. Noise and Drop-Upcycling's re-initialization apply to the
    routed experts only: the shared experts have no copies of their own to tell apart.
    ``init="random"``: fresh shared experts at the paper's scale, seeded by
    ``(config.seed, path)``.
    """
    N, G = config.shared_experts, config.granularity
    d_model, d_ff = dense.w_in.shape[0], config.expert_width(dense.w_in.shape[1])
    shared = SharedExperts(N, d_model, d_ff, gate=config.shared_gate, activation=activation,
                           gated=dense.w_gate is not None, bias=dense.b_in is not None,
                           device="meta", dtype=dense.w_in.dtype).to_empty(device="cpu")
    if config.init == Init.RANDOM:
        shared.reset_parameters(seeded_generator(config.seed, path, "shared_experts"))
    else:
        copies, scale = N // G, shared_output_scale(config)
        with torch.no_grad():
            if shared.gate is not None:
                shared.gate.weight.zero_()
            for field in fields(dense):
                source, target = getattr(dense, field.name), getattr(shared.ffn, field.name)
                if source is None:
                    continue
                source = source.detach().cpu()
                if field.name == "b_out":
                    value = source * (scale * copies)
                else:
                    axis = HIDDEN_AXIS[field.name]
                    value = torch.cat([source] * copies, dim=axis)
                    if field.name == "w_out":
                        value = value * scale
                target.copy_(value.unsqueeze(0))
    return {f"shared_experts.{name}": TensorSource(param.detach())
            for name, param in shared.named_parameters()}
