"""`ConversionReport`: what a conversion found, chose, rejected and costs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

from moeify.compiler.plan import (
    ConversionPlan,
    Rejection,
    layer_config,
    switch_params,
    weight_bytes,
)
from moeify.config import Init, MoEConfig, RouterKind, Scoring


@dataclass(frozen=True)
class SiteReport:
    path: str
    stack: str
    index: int
    ffn: str  # "d->f->d activation"
    found_by: str
    selected: bool
    replace: tuple[str, ...]
    dense_params: int
    moe_params: int  # experts + shared experts + router when selected, else the dense FFN's
    capacity_train: int | None
    capacity_eval: int | None
    ffn_dropout: float = 0.0  # the dropout the dense FFN applies between its projections
    expert_dropout: float | None = None  # the experts' dropout when selected, else None
    router: str | None = None  # "token-choice" / "expert-choice" when selected, else None


@dataclass(frozen=True)
class ConversionReport:
    """The analysis and its consequences: sites, rejections, parameter counts.

    params_dense / params_moe: parameters of the model before and after conversion
    (``params_moe = params_dense + sum over converted sites of (E x expert - dense FFN
    + router)``). active_params_per_token: parameters a token's forward touches
    (top_k experts per converted site, plus the router). Per site, ``ffn_dropout`` is
    the dropout found inside the dense FFN and ``expert_dropout`` the rate its experts
    apply (None for a site left dense), ``router`` its layer's routing (token choice at
    a causal site when the config asks for expert choice; `router_text` sums it up).
    """

    model: str
    config: MoEConfig
    seq_len: int | None
    examined: tuple[str, ...]
    sites: tuple[SiteReport, ...]
    rejected: tuple[Rejection, ...]
    params_dense: int
    params_moe: int
    active_params_per_token: int

    def nbytes(self, dtype) -> dict[str, int]:
        """Weight bytes before and after conversion in ``dtype`` (a torch dtype), as
        `ConversionPlan.nbytes`."""
        return weight_bytes(self.params_dense, self.params_moe, dtype)

    @property
    def converted(self) -> list[str]:
        return [s.path for s in self.sites if s.selected]

    @classmethod
    def from_plan(cls, plan: ConversionPlan) -> ConversionReport:
        """The report of a plan (what `moeify.inspect` and `moeify.convert` return)."""
        config = plan.config
        chosen = set(plan.selected)
        sites = []
        for site in plan.sites:
            is_chosen = site.path in chosen
            moe = switch_params(site, config) if is_chosen else site.num_params
            sites.append(SiteReport(
                path=site.path, stack=site.stack, index=site.index, ffn=site.describe(),
                found_by=site.found_by, selected=is_chosen, replace=site.replace,
                dense_params=site.num_params, moe_params=moe,
                capacity_train=plan.capacity(training=True) if is_chosen else None,
                capacity_eval=plan.capacity(training=False) if is_chosen else None,
                ffn_dropout=site.dropout,
                expert_dropout=config.resolve_expert_dropout(site.dropout) if is_chosen else None,
                router=layer_config(site, config).router.value if is_chosen else None,
            ))
        return cls(
            model=plan.model, config=config, seq_len=plan.seq_len, examined=plan.examined,
            sites=tuple(sites), rejected=plan.rejected, params_dense=plan.params_dense,
            params_moe=plan.params_moe, active_params_per_token=plan.active_params_per_token,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "config": self.config.to_dict(),
            "seq_len": self.seq_len,
            "examined": list(self.examined),
            "sites": [{**asdict(s), "replace": list(s.replace)} for s in self.sites],
            "rejected": [asdict(r) for r in self.rejected],
            "converted": self.converted,
            "params_dense": self.params_dense,
            "params_moe": self.params_moe,
            "active_params_per_token": self.active_params_per_token,
        }

    @property
    def experts_init(self) -> str:
        """How the experts start (``config.init``), in words."""
        return _init_text(self.config)

    @property
    def router_text(self) -> str:
        """Who chooses at the converted sites, in words: with expert choice, where it
        applies and where causal sites keep token choice; then the scoring, routed
        scaling, bias balancing and sequence-wise loss where they differ from Switch's."""
        c = self.config
        extras = []
        if c.scoring != Scoring.SOFTMAX:
            extras.append(f"{c.scoring.value} scores")
        if c.routed_scaling != 1.0:
            extras.append(f"routed output scaled by {c.routed_scaling:g}")
        if c.bias_balancing:
            extras.append(f"auxiliary-loss-free bias balancing at rate {c.bias_update_rate:g} "
                          "per optimizer step (moeify.balance_experts)")
        if c.seq_aux_loss_coef > 0:
            extras.append(f"sequence-wise balance loss weight {c.seq_aux_loss_coef:g}")
        extra = "".join(f"; {e}" for e in extras)
        if c.router == RouterKind.TOKEN_CHOICE:
            text = f"token choice: each token picks its top-{c.top_k} expert" + "s" * (c.top_k > 1)
            if c.top_k == 2:
                text += ("; in training the second is kept at random (GShard)"
                         if c.uses_random_routing else "; both kept in training")
            return text + extra
        parts = []
        for kind in (RouterKind.EXPERT_CHOICE, RouterKind.TOKEN_CHOICE):
            sites = [s for s in self.sites if s.router == kind.value]
            if not sites:
                continue
            stacks = ", ".join(dict.fromkeys(s.stack or s.path for s in sites))
            count = f"{len(sites)} layer" + "s" * (len(sites) > 1)
            if kind == RouterKind.EXPERT_CHOICE:
                parts.append(f"expert choice in {stacks} ({count}): each expert takes its "
                             "top-C tokens of a group")
            else:
                parts.append(f"token choice in {stacks} ({count}, causal: an expert would "
                             "choose among future tokens)")
        return ("; ".join(parts) or "expert choice (no site converted)") + extra

    def __str__(self) -> str:
        c = self.config
        lines = [
            f"{self.model}: {len(self.sites)} FFN sites, {len(self.converted)} converted to "
            f"{c.num_experts} experts (top-{c.top_k}, capacity factor {c.capacity_factor} "
            f"train / {c.eval_capacity_factor} eval)",
            f"parameters: {self.params_dense:,} dense -> {self.params_moe:,} MoE "
            f"({self.active_params_per_token:,} active per token)",
            f"experts: {self.experts_init}",
            f"router: {self.router_text}",
        ]
        for s in self.sites:
            mark = "*" if s.selected else " "
            cap = "" if s.capacity_train is None else f" capacity {s.capacity_train}/{s.capacity_eval}"
            drop = "" if s.expert_dropout is None else f" expert dropout {s.expert_dropout:g}"
            lines.append(f" {mark} {s.path} [{s.stack} #{s.index}] {s.ffn}{cap}{drop} "
                         f"({s.found_by})")
        for r in self.rejected:
            lines.append(f"   rejected {r.where}: {r.reason}")
        return "\n".join(lines)


def _init_text(c: MoEConfig) -> str:
    """How the experts start (``config.init``), in words, and the shared experts."""
    return _routed_init_text(c) + _shared_text(c)


def _shared_text(c: MoEConfig) -> str:
    """The shared experts and the upcycling's output scales, in words ("" without)."""
    N, G = c.shared_experts, c.granularity
    scaled = c.init != Init.RANDOM and c.routed_scaling != 1
    routed = f"routed output projections /{c.routed_scaling:g} (routed scaling)"
    if not N:
        return f"; {routed}" if scaled else ""
    shared = f"{N} shared expert" + "s" * (N > 1)
    gate = ("; shared output gated by sigmoid(x . w) (Qwen2-MoE's shared_expert_gate)"
            if c.shared_gate else "")
    if c.init == Init.RANDOM:
        return f"; {shared} (always on), fresh" + gate + (", w = 0 at init" if gate else "")
    copies = N // G
    text = (f"; {shared} (always on; {copies} cop{'ies' if copies > 1 else 'y'} of the "
            f"dense FFN{f', slices j % {G}' if G > 1 else ''}), output projections x "
            f"{Fraction(G, N + G)} (G/(N+G))" + (f", {routed}" if scaled else ""))
    if c.shared_gate:
        text += ", shared ones x 2 more" + gate + ", w = 0 (1/2) at init"
    return text


def _routed_init_text(c: MoEConfig) -> str:
    """How the routed experts start (``config.init``), in words."""
    if c.init == Init.COPY and c.granularity > 1:
        G = c.granularity
        return (f"granular: {c.num_experts // G} copies x {G} slices of d_ff/{G} of the dense "
                f"FFN, router rows repeated per copy, output projections x{G} (top-{c.top_k} "
                f"= {c.top_k // G} copy x {G} slices at init)"
                + (f", plus noise {c.noise:g}" if c.noise else ""))
    if c.init == Init.COPY:
        return "copies of the dense FFN" + (f", plus noise {c.noise:g}" if c.noise else "")
    if c.init == Init.DROP:
        return (f"copies of the dense FFN, {c.drop_ratio:g} of each expert's hidden neurons "
                "re-initialized (Drop-Upcycling)")
    if c.init == Init.PARTITION:
        return "slices of the dense FFN's hidden neurons (partition)"
    return "fresh random weights"
