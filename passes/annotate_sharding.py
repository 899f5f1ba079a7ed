"""`AnnotateSharding`: the expert-parallel plan, as data kept with the model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from moeify.passes._base import ProgramPass
from moeify.program import Program
from moeify.switch.experts import Experts

EXPERT_AXIS = "expert"


@dataclass(frozen=True)
class ParamSharding:
    """How one parameter is laid out: split along ``dim`` over ``mesh_axis`` or replicated."""

    name: str
    shape: tuple[int, ...]
    dim: int | None = None
    mesh_axis: str | None = None

    @property
    def sharded(self) -> bool:
        return self.dim is not None


@dataclass(frozen=True)
class ShardingPlan:
    """Expert parallelism: expert weights split along their expert dim (0) over the
    ``expert`` mesh axis, every other parameter (routers included) replicated.

    JSON round trip (`to_dict` / `from_dict`): saved in checkpoints and read by the
    distributed runtime and the ONNX exporter.
    """

    num_experts: int
    params: tuple[ParamSharding, ...]
    mesh_axes: tuple[str, ...] = (EXPERT_AXIS,)

    def sharded(self) -> list[ParamSharding]:
        return [p for p in self.params if p.sharded]

    def experts_of_rank(self, rank: int, world_size: int) -> range:
        """The experts rank ``rank`` of ``world_size`` holds (contiguous blocks)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        if self.num_experts % world_size:
            raise ValueError(
                f"{self.num_experts} experts do not divide over {world_size} processes; "
                "use a world size that divides num_experts"
            )
        per_rank = self.num_experts // world_size
        return range(rank * per_rank, (rank + 1) * per_rank)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_experts": self.num_experts,
            "mesh_axes": list(self.mesh_axes),
            "params": [
                {**asdict(p), "shape": list(p.shape)} for p in self.params
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardingPlan:
        return cls(
            num_experts=int(data["num_experts"]),
            mesh_axes=tuple(data.get("mesh_axes", (EXPERT_AXIS,))),
            params=tuple(
                ParamSharding(p["name"], tuple(p["shape"]), p.get("dim"), p.get("mesh_axis"))
                for p in data["params"]
            ),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


class AnnotateSharding(ProgramPass):
    """Plan expert parallelism for the converted model.

    Requires: `InsertRouter` has run.
    Guarantees: ``program.sharding`` covers every parameter of the model exactly once;
        expert weights (``experts.w_*``, ``experts.b_*``) sharded on dim 0 over the
        ``expert`` axis, everything else replicated.
    Preserves the computation: yes (a plan, not a layout change).
    """

    def requires(self, program: Program) -> None:  # type: ignore[override]
        if not program.layers:
            raise self.fail("no Switch layers: run InsertRouter first")

    def run(self, program: Program) -> bool:
        model = program.model
        expert_param_ids = {
            id(p) for m in model.modules() if isinstance(m, Experts)
            for p in m.parameters(recurse=False)
        }
        params = tuple(
            ParamSharding(name, tuple(p.shape), 0, EXPERT_AXIS)
            if id(p) in expert_param_ids else ParamSharding(name, tuple(p.shape))
            for name, p in model.named_parameters()
        )
        program.sharding = ShardingPlan(program.config.num_experts, params)
        return False
