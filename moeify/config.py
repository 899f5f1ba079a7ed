"""`MoEConfig`: every choice that defines a Switch Transformer conversion.

A frozen dataclass, validated at construction, saved beside every checkpoint as JSON.
Enumerated fields take the enum or its string value (``gate="normalized"``); the stored
value is always the enum, and ``to_dict`` writes the string back.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import Any, Callable


class Gate(str, enum.Enum):
    """How the chosen experts' outputs are weighted.

    ``softmax`` (Switch): top-1 output times that expert's router probability; top-2
    weights are the pair's probabilities renormalized over the pair (GShard).
    ``normalized``: weights renormalized over the experts a token actually reaches, so
    they sum to 1 (top-1: weight 1). An upcycled model then computes exactly the dense
    function at init, but at top-1 the task loss gives the router no gradient.
    """

    SOFTMAX = "softmax"
    NORMALIZED = "normalized"


class Init(str, enum.Enum):
    """How experts are initialized from the dense FFN (used by the upcycling pass)."""

    COPY = "copy"  # every expert an exact copy (sparse upcycling)
    PARTITION = "partition"  # hidden neurons split into E groups (MoEfication)
    RANDOM = "random"  # fresh scaled init


class Activation(str, enum.Enum):
    """Elementwise activations an expert FFN supports (gated or not)."""

    RELU = "relu"
    GELU = "gelu"  # exact (erf)
    GELU_TANH = "gelu_tanh"  # tanh approximation ("gelu_new", "gelu_pytorch_tanh")
    SILU = "silu"


ROUTER_DTYPES = ("float32", "float64")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Switch Transformer settings (Fedus, Zoph, Shazeer 2021; defaults from the paper).

    num_experts: experts per Switch layer (E >= 2).
    capacity_factor / eval_capacity_factor: slots per expert as a multiple of an even
        share of a group's tokens, in training / in evaluation (paper: 1.25 / 2.0).
    top_k: experts per token, 1 (Switch) or 2 (GShard random routing).
    min_capacity: floor on the expert capacity.
    group_size: tokens routed together; ``None`` means one sequence per group, so the
        capacity does not depend on the batch size.
    every / layers: which FFN layers become Switch layers (every other one by default,
        odd indices); ``layers`` lists explicit indices and overrides ``every``.
    init / noise: expert initialization and relative noise added to copied experts.
    gate: ``softmax`` or ``normalized``, see `Gate`.
    jitter_eps: multiplicative router-input jitter U(1-eps, 1+eps), training only.
    aux_loss_coef / z_loss_coef: weights of the load-balancing loss (alpha) and the
        router z-loss (beta).
    expert_dropout: dropout rate inside the experts, between the two matmuls. ``None``
        (the default): each site takes the dropout found inside the dense FFN it
        replaces, between its two projections (T5's FFN dropout; 0 where there is none,
        e.g. GPT-2 and BERT, whose dropout follows the FFN and stays in the model), so
        conversion does not change the function in training. A number overrides it for
        every site (the paper fine-tunes with 0.4). See `resolve_expert_dropout`.
    router_dtype: the router's compute dtype ("selective precision").
    seed: seeds every random initialization the conversion makes.
    """

    num_experts: int = 8
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    top_k: int = 1
    min_capacity: int = 4
    group_size: int | None = None
    every: int = 2
    layers: tuple[int, ...] | None = None
    init: Init = Init.COPY
    noise: float = 0.0
    gate: Gate = Gate.SOFTMAX
    jitter_eps: float = 0.01
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    expert_dropout: float | None = None
    router_dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        for name, kind in (("init", Init), ("gate", Gate)):
            value = getattr(self, name)
            try:
                set_(name, kind(value))
            except ValueError:
                allowed = ", ".join(repr(k.value) for k in kind)
                raise ValueError(f"MoEConfig.{name}={value!r} is not one of {allowed}") from None
        if self.layers is not None:
            set_("layers", tuple(self.layers))

        _require_int("num_experts", self.num_experts, lambda v: v >= 2, ">= 2")
        _require_int("top_k", self.top_k, lambda v: v in (1, 2), "1 or 2 (Switch or GShard)")
        _require_int("min_capacity", self.min_capacity, lambda v: v >= 1, ">= 1")
        if self.group_size is not None:
            _require_int("group_size", self.group_size, lambda v: v >= 1, ">= 1 or None")
        _require_int("every", self.every, lambda v: v >= 1, ">= 1")
        _require_int("seed", self.seed, lambda v: v >= 0, ">= 0")
        if self.layers is not None:
            bad = [i for i in self.layers if not _is_int(i) or i < 0]
            if bad or len(set(self.layers)) != len(self.layers):
                raise ValueError(
                    f"MoEConfig.layers={self.layers!r} must list distinct layer indices >= 0"
                )
        positive = lambda v: v > 0  # noqa: E731
        non_negative = lambda v: v >= 0  # noqa: E731
        unit = lambda v: 0 <= v < 1  # noqa: E731
        _require_float("capacity_factor", self.capacity_factor, positive, "> 0")
        _require_float("eval_capacity_factor", self.eval_capacity_factor, positive, "> 0")
        _require_float("noise", self.noise, non_negative, ">= 0")
        _require_float("jitter_eps", self.jitter_eps, unit, "in [0, 1)")
        _require_float("aux_loss_coef", self.aux_loss_coef, non_negative, ">= 0")
        _require_float("z_loss_coef", self.z_loss_coef, non_negative, ">= 0")
        if self.expert_dropout is not None:
            _require_float("expert_dropout", self.expert_dropout, unit, "in [0, 1) or None")
        if self.router_dtype not in ROUTER_DTYPES:
            raise ValueError(
                f"MoEConfig.router_dtype={self.router_dtype!r} is not one of "
                + ", ".join(repr(d) for d in ROUTER_DTYPES)
                + " (the router always runs in full precision)"
            )

    def capacity(self, tokens_per_group: int, *, training: bool) -> int:
        """Expert capacity for a group of ``tokens_per_group`` tokens (a Python int)."""
        from moeify.switch.routing import expert_capacity

        factor = self.capacity_factor if training else self.eval_capacity_factor
        return expert_capacity(
            tokens_per_group,
            num_experts=self.num_experts,
            capacity_factor=factor,
            top_k=self.top_k,
            min_capacity=self.min_capacity,
        )

    def resolve_expert_dropout(self, source_dropout: float = 0.0) -> float:
        """The experts' dropout rate for a site whose dense FFN applies ``source_dropout``
        between its projections: ``expert_dropout`` when set, else ``source_dropout``
        (0 for a layer built without a source FFN)."""
        if self.expert_dropout is not None:
            return float(self.expert_dropout)
        return float(source_dropout)

    def replace(self, **changes: Any) -> MoEConfig:
        """A copy with some fields changed (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["init"] = self.init.value
        out["gate"] = self.gate.value
        if self.layers is not None:
            out["layers"] = list(self.layers)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown MoEConfig field(s) {', '.join(unknown)}; known fields: "
                + ", ".join(sorted(known))
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> MoEConfig:
        return cls.from_dict(json.loads(text))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require_int(name: str, value: Any, ok: Callable[[int], bool], allowed: str) -> None:
    if not _is_int(value) or not ok(value):
        raise ValueError(f"MoEConfig.{name}={value!r} must be an integer {allowed}")


def _require_float(name: str, value: Any, ok: Callable[[float], bool], allowed: str) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or not ok(value):
        raise ValueError(f"MoEConfig.{name}={value!r} must be a finite number {allowed}")
