"""The conversion plan: the records every route of a conversion shares.

`moeify.plan` analyses a model (trace, find the FFNs, choose the sites, plan the expert
sharding) without touching it and returns a `ConversionPlan`; `moeify.apply` carries a
plan out. The plan is data: it round-trips through JSON (`ConversionPlan.to_dict` /
`ConversionPlan.from_dict`), a checkpoint stores it in ``moeify.json``, and loading a
checkpoint applies the stored plan to the source architecture without tracing it again.

Records, from the inside out:

* `Projection`: one linear map a module computes (``nn.Linear``, HF ``Conv1D``).
* `FFNSite`: one dense FFN the analysis found, with the modules its rewrite touches.
* `Rejection`: a candidate that is not an FFN site, and why.
* `ParamSharding` / `ShardingPlan`: how each parameter of the converted model lays out
  under expert parallelism (experts split on their expert axis, the rest replicated).
* `ConversionPlan`: config, declared sequence length, every site and rejection, the
  chosen sites, the sharding plan and the parameter estimates.

Nothing here imports a pass: the passes import these records.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from moeify.config import Activation, MoEConfig, RouterKind, config_param
from moeify.errors import MoEError
from moeify.switch.dispatchers import expert_block
from moeify.switch.experts import DenseFFNWeights

PLAN_FORMAT_VERSION = 1
EXPERT_AXIS = "expert"


# --- projections --------------------------------------------------------------------------


class ProjectionKind(str, enum.Enum):
    LINEAR = "linear"  # nn.Linear: weight [out, in], y = x W^T + b
    CONV1D = "conv1d"  # transformers' Conv1D (GPT-2): weight [in, out], y = x W + b


@dataclass(frozen=True)
class Projection:
    """A linear map ``in_features -> out_features`` held by one module."""

    path: str
    kind: ProjectionKind
    in_features: int
    out_features: int
    bias: bool

    def weight_in_out(self, module: nn.Module) -> torch.Tensor:
        """The weight as ``[in, out]`` (``x @ W`` layout), detached."""
        w = module.weight.detach()
        return w.T if self.kind == ProjectionKind.LINEAR else w

    def weight_shape(self) -> tuple[int, int]:
        """The module's weight shape (``nn.Linear``: [out, in]; ``Conv1D``: [in, out])."""
        if self.kind == ProjectionKind.LINEAR:
            return self.out_features, self.in_features
        return self.in_features, self.out_features

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Projection:
        return cls(data["path"], ProjectionKind(data["kind"]), int(data["in_features"]),
                   int(data["out_features"]), bool(data["bias"]))


# --- sites and rejections -----------------------------------------------------------------


@dataclass(frozen=True)
class FFNSite:
    """One dense FFN that can become a Switch layer.

    path: the module replaced by the Switch layer (``replace[0]``).
    replace: the modules that compute exactly this FFN, in dataflow order; the first
        becomes the Switch layer, the rest pass their input through.
    bypass_attributes: ``module.attr`` function attributes (an activation applied in
        a module's own code, ``self.activation = F.relu``) that become pass-throughs.
    stack / index: sites whose paths differ only in numeric components form a stack
        (``"encoder.block.*.layer.*.DenseReluDense"``); index is the position in it.
    up / gate / down: the projections (gate: the activated branch of a gated FFN).
    dropout: the dropout rate the FFN applies between its projections (an
        ``nn.Dropout`` module or a ``F.dropout`` call on the hidden activation, e.g.
        T5's ``DenseReluDense.dropout``), 0.0 if none. That dropout is part of what
        ``replace`` covers, so the rewrite removes it and the experts apply it instead
        (`MoEConfig.expert_dropout` None). A dropout after the down-projection (GPT-2's
        ``mlp.dropout``, BERT's ``output.dropout``) is outside the FFN and stays.
    found_by: how the dataflow was obtained, e.g. "fx.symbolic_trace of h.0.mlp".
    causal: the FFN runs in a causal stack, whose attention hides later tokens (GPT-2,
        Llama, T5's decoder): expert choice cannot route it (`layer_config`). Found from
        the markers transformers' modules carry, see `moeify.passes.find_ffn.is_causal_site`.
    """

    path: str
    replace: tuple[str, ...]
    up: Projection
    down: Projection
    activation: Activation
    gate: Projection | None = None
    bypass_attributes: tuple[str, ...] = ()
    dropout: float = 0.0
    found_by: str = ""
    stack: str = ""
    index: int = 0
    causal: bool = False

    @property
    def d_model(self) -> int:
        return self.up.in_features

    @property
    def d_ff(self) -> int:
        return self.up.out_features

    @property
    def bias(self) -> bool:
        return self.up.bias

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def projections(self) -> tuple[Projection, ...]:
        return (self.up, self.down) + ((self.gate,) if self.gate else ())

    @property
    def num_params(self) -> int:
        """Parameters of the dense FFN (weights and biases of every projection)."""
        return sum(p.in_features * p.out_features + p.bias * p.out_features
                   for p in self.projections)

    def describe(self) -> str:
        kind = f"gated {self.activation.value}" if self.gated else self.activation.value
        return f"{self.d_model}->{self.d_ff}->{self.d_model} {kind}"

    def dense_weights(self, model: nn.Module) -> DenseFFNWeights:
        """This FFN's weights in ``model``, in ``x @ W`` layout (views, no copies)."""

        def weight_bias(proj: Projection | None):
            if proj is None:
                return None, None
            module = model.get_submodule(proj.path)
            bias = getattr(module, "bias", None)
            return proj.weight_in_out(module), None if bias is None else bias.detach()

        (w_in, b_in), (w_out, b_out), (w_gate, b_gate) = (
            weight_bias(self.up), weight_bias(self.down), weight_bias(self.gate)
        )
        return DenseFFNWeights(w_in, w_out, b_in, b_out, w_gate, b_gate)

    def mismatch(self, model: nn.Module) -> str | None:
        """Why ``model`` cannot take this site's rewrite (None if it can): a missing
        module or a projection whose weight shape differs from the analysed one."""
        for path in self.replace:
            try:
                model.get_submodule(path)
            except AttributeError:
                return f"the model has no module {path!r}"
        for proj in self.projections:
            try:
                module = model.get_submodule(proj.path)
            except AttributeError:
                return f"the model has no module {proj.path!r}"
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != proj.weight_shape():
                shape = None if weight is None else tuple(weight.shape)
                return (f"{proj.path} has a weight of shape {shape}, the plan expects "
                        f"{proj.weight_shape()}")
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "replace": list(self.replace), "up": self.up.to_dict(),
            "down": self.down.to_dict(), "gate": None if self.gate is None else self.gate.to_dict(),
            "activation": self.activation.value, "bypass_attributes": list(self.bypass_attributes),
            "dropout": self.dropout, "found_by": self.found_by, "stack": self.stack,
            "index": self.index, "causal": self.causal,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FFNSite:
        return cls(
            path=data["path"], replace=tuple(data["replace"]),
            up=Projection.from_dict(data["up"]), down=Projection.from_dict(data["down"]),
            gate=None if data.get("gate") is None else Projection.from_dict(data["gate"]),
            activation=Activation(data["activation"]),
            bypass_attributes=tuple(data.get("bypass_attributes", ())),
            dropout=float(data.get("dropout", 0.0)), found_by=data.get("found_by", ""),
            stack=data.get("stack", ""), index=int(data.get("index", 0)),
            causal=bool(data.get("causal", False)),
        )


@dataclass(frozen=True)
class Rejection:
    """A candidate that is not converted, and why."""

    where: str
    reason: str
    found_by: str = ""


@dataclass(frozen=True)
class FFNAnalysis:
    """What the FFN analysis found: sites, rejections, and what it examined."""

    sites: tuple[FFNSite, ...]
    rejected: tuple[Rejection, ...]
    examined: tuple[str, ...] = ()


def layer_config(site: FFNSite, config: MoEConfig) -> MoEConfig:
    """The config of the Switch layer built at ``site``: ``config``, except that a causal
    site keeps token choice where ``config`` asks for expert choice (an expert would rank
    a token against later ones, which causal decoding does not have yet)."""
    if config.router == RouterKind.EXPERT_CHOICE and site.causal:
        return config.replace(router=RouterKind.TOKEN_CHOICE)
    return config


def expert_choice_refusal(sites: tuple[FFNSite, ...], config: MoEConfig) -> MoEError | None:
    """Why ``config`` cannot convert ``sites`` (the selected ones), or None: expert
    choice with every site causal (a decoder-only model) would leave no layer to use it."""
    if config.router != RouterKind.EXPERT_CHOICE or not sites or not all(s.causal for s in sites):
        return None
    return MoEError("expert-choice routing needs a non-causal FFN, but every selected site is "
                    "causal ({stacks}): an expert would choose among future tokens, which causal "
                    "decoding cannot know; use token-choice routing ({token_choice})",
                    stacks=", ".join(dict.fromkeys(s.stack or s.path for s in sites)),
                    token_choice=config_param("router").given(RouterKind.TOKEN_CHOICE))


def expert_width(site: FFNSite, config: MoEConfig) -> int:
    """Hidden width of each expert: the dense d_ff, d_ff / E for ``init="partition"``, or
    d_ff / G with ``granularity`` G."""
    return config.expert_width(site.d_ff)


# --- sharding -----------------------------------------------------------------------------


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

    ``params`` names every parameter of the converted model exactly once; the
    distributed runtime, checkpoint loading and the ONNX annotations read it.
    """

    num_experts: int
    params: tuple[ParamSharding, ...]
    mesh_axes: tuple[str, ...] = (EXPERT_AXIS,)

    def sharded(self) -> list[ParamSharding]:
        return [p for p in self.params if p.sharded]

    def experts_of_rank(self, rank: int, world_size: int) -> range:
        """The experts rank ``rank`` of ``world_size`` holds (`expert_block`'s rule)."""
        return expert_block(self.num_experts, rank, world_size, who="the plan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_experts": self.num_experts,
            "mesh_axes": list(self.mesh_axes),
            "params": [{**asdict(p), "shape": list(p.shape)} for p in self.params],
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


def switch_layer_params(site: FFNSite, config: MoEConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name relative to the Switch layer, shape) of every parameter the layer holds, in
    its ``named_parameters()`` order: the router, the E experts, then the shared experts
    (one FFN ``N * f`` wide, `moeify.switch.shared.SharedExperts`) and their gate."""
    E, d, f = config.num_experts, site.d_model, expert_width(site, config)
    params = [("router.weight", (E, d)), *_ffn_params("experts", site, E, f)]
    N = config.shared_experts
    if N:
        params += _ffn_params("shared_experts.ffn", site, 1, N * f)
        if config.shared_gate:
            params.append(("shared_experts.gate.weight", (1, d)))
    return params


def _ffn_params(prefix: str, site: FFNSite, E: int, f: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the tensors of an `Experts` of E experts of width f at ``site``."""
    d = site.d_model
    params = [(f"{prefix}.w_in", (E, d, f)), (f"{prefix}.w_out", (E, f, d))]
    if site.gated:
        params.append((f"{prefix}.w_gate", (E, d, f)))
    if site.bias:
        params += [(f"{prefix}.b_in", (E, f)), (f"{prefix}.b_out", (E, d))]
        if site.gated:
            params.append((f"{prefix}.b_gate", (E, f)))
    return params


def switch_params(site: FFNSite, config: MoEConfig, *, active: bool = False) -> int:
    """Parameters of the Switch layer made at ``site`` (`switch_layer_params`); with
    ``active``, those one token's forward touches: its ``top_k`` routed experts, the
    router and the shared experts (every token runs them)."""
    total = 0
    for name, shape in switch_layer_params(site, config):
        count = math.prod(shape)
        if active and name.startswith("experts."):
            count = count // config.num_experts * config.top_k
        total += count
    return total


def plan_sharding(model: nn.Module, sites: tuple[FFNSite, ...], config: MoEConfig) -> ShardingPlan:
    """The sharding of the model ``sites`` turn ``model`` into, worked out beforehand:
    the dense parameters outside the replaced modules replicated, each Switch layer's
    router replicated and its expert tensors split on dim 0 over the expert axis. The
    parameters come in the converted model's ``named_parameters()`` order (a Switch
    layer's where the module it replaces had its first parameter)."""

    def layer_params(site: FFNSite) -> list[ParamSharding]:
        out = []
        for name, shape in switch_layer_params(site, config):
            expert = name.startswith("experts.")
            out.append(ParamSharding(f"{site.path}.{name}", shape, 0 if expert else None,
                                     EXPERT_AXIS if expert else None))
        return out

    first = {site.replace[0] + ".": site for site in sites}
    replaced = tuple(p + "." for site in sites for p in site.replace)
    params: list[ParamSharding] = []
    placed: set[str] = set()
    for name, p in model.named_parameters():
        if not name.startswith(replaced):
            params.append(ParamSharding(name, tuple(p.shape)))
            continue
        site = next((s for prefix, s in first.items() if name.startswith(prefix)), None)
        if site is not None and site.path not in placed:
            params += layer_params(site)
            placed.add(site.path)
    for site in sites:
        if site.path not in placed:
            params += layer_params(site)
    return ShardingPlan(config.num_experts, tuple(params))


# --- the plan -----------------------------------------------------------------------------


def weight_bytes(params_dense: int, params_moe: int, dtype: torch.dtype) -> dict[str, int]:
    """Weight bytes before (``dense``) and after (``moe``) conversion with every parameter
    in ``dtype`` (routers counted in it too: a float32 router is at most E x d_model values
    per site)."""
    size = torch.empty((), dtype=dtype).element_size()
    return {"dense": params_dense * size, "moe": params_moe * size}


@dataclass(frozen=True)
class ConversionPlan:
    """Everything a conversion decides, before anything is changed.

    model: the class name of the analysed model.
    config / seq_len: the Switch settings and the declared sequence length (None: the
        capacity follows each input's length in eager mode).
    sites / rejected / examined: the FFN analysis (every site found, every rejected
        candidate with its reason, every graph and opaque module looked at).
    selected: the paths of the sites to convert, in module order.
    sharding: the expert-parallel layout of the converted model's parameters.
    params_dense: parameters of the model before conversion.

    A plan that asks for expert choice where every selected site is causal cannot be
    made (`expert_choice_refusal`); causal sites of a mixed model (T5's decoder) get
    token-choice layers (`layer_config`).
    """

    model: str
    config: MoEConfig
    seq_len: int | None
    sites: tuple[FFNSite, ...]
    selected: tuple[str, ...]
    rejected: tuple[Rejection, ...] = ()
    examined: tuple[str, ...] = ()
    sharding: ShardingPlan | None = None
    params_dense: int = 0

    def __post_init__(self) -> None:
        known = {s.path for s in self.sites}
        unknown = [p for p in self.selected if p not in known]
        if unknown:
            raise MoEError(f"the plan selects {unknown[0]!r}, which is not one of its sites")
        refusal = expert_choice_refusal(self.selected_sites, self.config)
        if refusal is not None:
            raise refusal

    @property
    def selected_sites(self) -> tuple[FFNSite, ...]:
        chosen = set(self.selected)
        return tuple(s for s in self.sites if s.path in chosen)

    @property
    def tokens_per_group(self) -> int | None:
        """The declared group length: ``config.group_size``, else ``seq_len``."""
        c = self.config
        return c.group_size if c.group_size is not None else self.seq_len

    def capacity(self, *, training: bool) -> int | None:
        """Slots per expert and group at the declared length (None when undeclared)."""
        tokens = self.tokens_per_group
        return None if tokens is None else self.config.capacity(tokens, training=training)

    def _params_with(self, *, active: bool) -> int:
        """The dense parameters with each selected site's FFN replaced by its Switch
        layer, whole or as one token touches it (`switch_params`)."""
        return self.params_dense + sum(switch_params(s, self.config, active=active)
                                       - s.num_params for s in self.selected_sites)

    @property
    def params_moe(self) -> int:
        """Parameters after conversion: each site's dense FFN becomes E experts, the
        shared experts and the router."""
        return self._params_with(active=False)

    @property
    def active_params_per_token(self) -> int:
        """Parameters one token's forward touches: per site top_k experts, the shared
        experts and the router."""
        return self._params_with(active=True)

    def nbytes(self, dtype: torch.dtype) -> dict[str, int]:
        """Weight bytes before and after conversion in ``dtype`` (`weight_bytes`)."""
        return weight_bytes(self.params_dense, self.params_moe, dtype)

    def largest_layer_params(self) -> int:
        """Parameters of the largest Switch layer (what streaming holds at once)."""
        return max((switch_params(s, self.config) for s in self.selected_sites), default=0)

    def check_model(self, model: nn.Module) -> None:
        """Raise `MoEError` unless ``model`` has every module and projection shape the
        selected sites rewrite (a plan applied to another architecture)."""
        for site in self.selected_sites:
            problem = site.mismatch(model)
            if problem is not None:
                raise MoEError(
                    f"this plan does not fit the model: site {site.path}: {problem}; make a "
                    "new plan with moeify.plan(model, config)"
                )

    # --- JSON ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict. Derived values (capacities, estimates) are written for
        readers and recomputed, not read, by `from_dict`."""
        return {
            "format_version": PLAN_FORMAT_VERSION,
            "model": self.model,
            "config": self.config.to_dict(),
            "seq_len": self.seq_len,
            "sites": [s.to_dict() for s in self.sites],
            "selected": list(self.selected),
            "rejected": [asdict(r) for r in self.rejected],
            "examined": list(self.examined),
            "sharding": None if self.sharding is None else self.sharding.to_dict(),
            "params_dense": self.params_dense,
            "derived": {
                "capacity_train": self.capacity(training=True),
                "capacity_eval": self.capacity(training=False),
                "params_moe": self.params_moe,
                "active_params_per_token": self.active_params_per_token,
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConversionPlan:
        if not isinstance(data, dict):
            raise MoEError(f"a conversion plan is a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise MoEError(f"conversion plan format_version must be an integer, got {version!r}")
        if version > PLAN_FORMAT_VERSION:
            raise MoEError(
                f"conversion plan format {version} is newer than this moeify reads "
                f"({PLAN_FORMAT_VERSION}): upgrade moeify"
            )
        try:
            return cls(
                model=str(data.get("model", "")),
                config=MoEConfig.from_dict(data["config"]),
                seq_len=data.get("seq_len"),
                sites=tuple(FFNSite.from_dict(s) for s in data["sites"]),
                selected=tuple(data["selected"]),
                rejected=tuple(Rejection(**r) for r in data.get("rejected", ())),
                examined=tuple(data.get("examined", ())),
                sharding=None if data.get("sharding") is None
                else ShardingPlan.from_dict(data["sharding"]),
                params_dense=int(data.get("params_dense", 0)),
            )
        except MoEError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            what = f"missing {error}" if isinstance(error, KeyError) else str(error)
            raise MoEError(f"malformed conversion plan: {what}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ConversionPlan:
        return cls.from_dict(json.loads(text))


CONVERSION_ATTR = "_moeify_conversion"


def plan_of(model: nn.Module) -> ConversionPlan | None:
    """The plan a converted model was built from (None for a dense model)."""
    return model.__dict__.get(CONVERSION_ATTR)


def record_plan(model: nn.Module, plan: ConversionPlan) -> None:
    """Keep ``plan`` on ``model`` (saving, exporting and distributing read it)."""
    model.__dict__[CONVERSION_ATTR] = plan

