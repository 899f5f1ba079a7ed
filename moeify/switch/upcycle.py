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
from dataclasses import dataclass

import torch
from torch import Tensor

from moeify.config import Activation, MoEConfig
from moeify.switch.experts import DenseFFNWeights, Experts
from moeify.switch.router import Router


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
    per copy repeated G times (`MoEConfig.granularity`). Plain copies
    come back as one dense tensor repeated E times (nothing is materialized); the dense
    weights must then not be changed before the values are used.
    """
    E, G = config.num_experts, config.granularity
    d_model = dense.w_in.shape[0]
    # granular: one router row per copy of the dense FFN, repeated for its G slices
    router = Router(d_model, E // G, router_dtype=config.router_dtype, device="cpu")
    router.reset_parameters(seeded_generator(config.seed, path, "router"))
    weight = router.weight.detach()
    tensors = {"router.weight": TensorSource(weight.repeat_interleave(G, dim=0) if G > 1
                                             else weight)}
    pairs = {"w_in": dense.w_in, "w_out": dense.w_out, "w_gate": dense.w_gate,
             "b_in": dense.b_in, "b_out": dense.b_out, "b_gate": dense.b_gate}
    if config.plain_copies:
        for name, source in pairs.items():
            if source is not None:
                tensors[f"experts.{name}"] = TensorSource(source.detach().contiguous(), repeat=E)
        return tensors
    d_ff = config.expert_width(dense.w_in.shape[1])
    experts = Experts(E, d_model, d_ff, activation=activation, gated=dense.w_gate is not None,
                      bias=dense.b_in is not None, device="meta", dtype=dense.w_in.dtype)
    experts = experts.to_empty(device="cpu")
    cpu = DenseFFNWeights(**{k: None if t is None else t.detach().cpu() for k, t in pairs.items()})
    experts.load_dense(cpu, init=config.init, noise=config.noise, drop_ratio=config.drop_ratio,
                       granularity=G, generator=seeded_generator(config.seed, path, "experts"))
    for name, param in experts.named_parameters():
        tensors[f"experts.{name}"] = TensorSource(param.detach())
    return tensors
