"""`MoEConfig`: every choice that defines a Switch Transformer conversion.

A frozen dataclass, validated at construction, saved beside every checkpoint as JSON.
Enumerated fields take the enum or its string value (``gate="normalized"``); the stored
value is always the enum, and ``to_dict`` writes the string back. Each field's metadata
holds its command-line option (``cli``: the option's names; ``help``), from which
`moeify.cli` declares the options; a value a field cannot take raises `ConfigError`, a
`moeify.MoEError` naming the field as the caller writes it (``MoEConfig.top_k=3`` in
Python, ``--top-k 3`` on the command line). Also the capacity formula, `expert_capacity`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import Any, Callable, NamedTuple

from moeify.errors import MoEError, Param


class Gate(str, enum.Enum):
    """How the chosen experts' outputs are weighted, from their scores (`Scoring`).

    ``softmax`` (Switch): top-1 output times that expert's score; top-k (k >= 2) weights
    are the chosen experts' scores renormalized over the k choices (GShard's pair,
    Mixtral's top-k, DeepSeek-V3's sigmoid top-8).
    ``normalized``: weights renormalized over the experts a token actually reaches, so
    they sum to 1 (top-1: weight 1). An upcycled model then computes exactly the dense
    function at init, but at top-1 the task loss gives the router no gradient.
    ``raw``: every choice weighted by its own score at any k, never renormalized
    (DeepSeek-V2, Qwen2-MoE and Qwen3-MoE with ``norm_topk_prob=False``).
    """

    SOFTMAX = "softmax"
    NORMALIZED = "normalized"
    RAW = "raw"


class Scoring(str, enum.Enum):
    """How router logits become the scores that select and weigh the experts.

    ``softmax`` (Switch, GShard, Mixtral, Qwen): probabilities over the E experts.
    ``sigmoid`` (DeepSeek-V3): an independent score ``sigmoid(logit)`` per expert, so
    one expert's score does not depend on the others'.
    """

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


class Init(str, enum.Enum):
    """How experts are initialized from the dense FFN (used by the upcycling pass)."""

    COPY = "copy"  # every expert an exact copy (sparse upcycling)
    PARTITION = "partition"  # hidden neurons split into E groups (MoEfication)
    RANDOM = "random"  # fresh scaled init
    DROP = "drop"  # copies, each with a random fraction of its neurons re-initialized


class RouterKind(str, enum.Enum):
    """Who chooses: tokens their experts, or experts their tokens.

    ``token-choice`` (Switch, GShard): each token picks its top-k experts; an expert
    takes the first C tokens that picked it and the rest overflow (dropped).
    ``expert-choice`` (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice
    Routing"): each expert picks the C tokens of a group it scores highest, so every
    expert is exactly full and a token gets any number of experts, none included
    (`moeify.switch.expert_choice`). An expert then chooses among all of a group's
    tokens, later ones included: causal sites (a decoder's FFNs) keep token choice.
    """

    TOKEN_CHOICE = "token-choice"
    EXPERT_CHOICE = "expert-choice"


class Activation(str, enum.Enum):
    """Elementwise activations an expert FFN supports (gated or not)."""

    RELU = "relu"
    GELU = "gelu"  # exact (erf)
    GELU_TANH = "gelu_tanh"  # tanh approximation ("gelu_new", "gelu_pytorch_tanh")
    SILU = "silu"


ROUTER_DTYPES = ("float32", "float64")


def expert_capacity(
    tokens_per_group: int,
    *,
    num_experts: int,
    capacity_factor: float,
    top_k: int = 1,
    min_capacity: int = 1,
) -> int:
    """Slots per expert and group: ``min(T, max(min_capacity, ceil(cf * k * T / E)))``.

    Ceil (DeepSpeed, Tutel) rather than Mesh-TF's floor or flaxformer's round: a factor
    of 1.0 then always leaves room for a perfectly balanced group. The product is
    rounded to 9 decimals first so that 1.1 * 10 does not become 12 through float error.
    """
    if tokens_per_group < 1:
        raise MoEError(f"tokens_per_group={tokens_per_group} must be >= 1")
    even_share = round(capacity_factor * top_k * tokens_per_group / num_experts, 9)
    return min(tokens_per_group, max(min_capacity, math.ceil(even_share)))


class ConfigError(MoEError):
    """A `MoEConfig` field holds a value it cannot take.

    ``fields`` maps each field the message names (the one at fault first) to its value;
    ``template`` is the message with ``{name!r}`` where a field is named. In Python a
    field reads ``MoEConfig.top_k=3``; the CLI renders it as its option, ``--top-k 3``
    (`moeify.errors`). A `Param` among the keywords is a setting the message suggests
    (``config_param("gate").given("softmax")``), not a field at fault.
    """

    def __init__(self, template: str, **fields: Any) -> None:
        self.fields = {n: v for n, v in fields.items() if not isinstance(v, Param)}
        super().__init__(template, **{n: v if isinstance(v, Param) else config_param(n).given(v)
                                      for n, v in fields.items()})

    @property
    def field(self) -> str:
        """The field at fault."""
        return next(iter(self.fields))


def config_param(name: str) -> Param:
    """Field ``name`` of `MoEConfig` as a message names it: ``MoEConfig.top_k`` in
    Python, its option ``--top-k`` on the command line."""
    field = next(f for f in dataclasses.fields(MoEConfig) if f.name == name)
    # a setting that is on, off or unset (its default decides) is typed with a value
    return Param(name, field.metadata["cli"][0], owner=MoEConfig.__name__,
                 switch=field.type == "bool | None")


def _field(default: Any, *cli: str, help: str) -> Any:
    """A field with its command-line option: ``cli`` holds the option's names (long name
    first), ``help`` its one-line help. `moeify.cli` builds one option per field from this."""
    return dataclasses.field(default=default, metadata={"cli": cli, "help": help})


class HiddenSplit(NamedTuple):
    """How `MoEConfig` splits a dense FFN's hidden neurons, with the words a refusal
    uses: "{who} splits d_ff into {parts} {unit}", then ``fix``."""

    parts: int
    who: str
    unit: str
    fix: str


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Switch Transformer settings (Fedus, Zoph, Shazeer 2021; defaults from the paper).

    num_experts: experts per Switch layer (E >= 2).
    capacity_factor / eval_capacity_factor: slots per expert as a multiple of an even
        share of a group's tokens, in training / in evaluation (paper: 1.25 / 2.0).
    top_k: experts per token, 1 (Switch) to ``num_experts``: 2 is GShard's, 8 of 128
        Qwen3-MoE's. Slots of an expert are filled by choice rank first (every first
        choice of a group before any second choice, ...), then by position, and the
        capacity grows with k (`expert_capacity`).
    random_routing: GShard's random routing of the second expert in training (kept with
        probability ``2 * p2 / (p1 + p2)``; top-2 only). None: on for ``top_k=2`` (the
        Switch/GShard recipe), off otherwise; the HF targets, whose classes keep every
        choice, set it off.
    scoring: ``softmax`` or ``sigmoid``, see `Scoring`; the ``gate`` then weighs the
        chosen experts' scores.
    routed_scaling: a constant multiplying the routed experts' combined output
        (DeepSeek-V3's ``routed_scaling_factor``; 1 elsewhere). Upcycled experts have
        their output projections divided by it, so an upcycled layer still starts as the
        dense FFN.
    bias_balancing: auxiliary-loss-free load balancing (Wang et al. 2024, DeepSeek-V3):
        a per-expert bias, a buffer outside autograd, is added to the scores for the
        *selection* only (the combine weights keep the unbiased scores); after each
        optimizer step ``bias += bias_update_rate * sign(mean load - load)`` from the
        loads the router asked for since the previous update (`moeify.balance_experts`
        registers that update on an optimizer). Token choice only.
    bias_update_rate: the bias's step per update (DeepSeek-V3: 1e-3).
    router: ``token-choice`` or ``expert-choice``, see `RouterKind`. With expert choice
        each expert takes ``C = capacity(T)`` tokens of a group of T (the same formula,
        the capacity factor taking top_k's role: a token gets ``capacity_factor``
        experts on average), so ``top_k`` must stay 1; ``dropless`` (which has no
        capacity) and the ``normalized`` gate (the paper weighs each pair by the
        expert's score) are refused. Its layers need no load-balancing loss (every
        expert is full by construction): their term of `moeify.aux_loss` is 0, the
        router z-loss still applies. Sites in causal stacks keep token choice, and a
        model whose selected sites are all causal is refused (`ConversionPlan`).
    min_capacity: floor on the expert capacity.
    group_size: tokens routed together; ``None`` means one sequence per group, so the
        capacity does not depend on the batch size.
    every / layers: which FFN layers become Switch layers (every other one by default,
        odd indices); ``layers`` lists explicit indices and overrides ``every``.
    init / noise: expert initialization and relative noise added to copied experts.
    drop_ratio: with ``init="drop"`` (Drop-Upcycling, Nakamura et al., ICLR 2025), the
        fraction of each expert's hidden neurons re-initialized, to the nearest neuron.
    granularity: granular upcycling (He et al. 2024, "Upcycling Large Language Models
        into Mixture of Experts"; Megatron-Core's upcycling utilities) with G > 1: each
        dense FFN splits into G slices of ``d_ff / G`` hidden neurons, and the layer's
        ``num_experts`` experts (a multiple of G: ``num_experts / G`` copies of the G
        slices) are those slices, expert ``j`` being slice ``j % G`` of copy ``j // G``.
        The router's rows are drawn for the ``num_experts / G`` copies and repeated for
        each copy's G slices, so at init a token's top-``top_k`` picks whole copies
        (``top_k`` is a multiple of G) with equal weights ``1 / G`` per slice (the
        pair's renormalized weights); each slice's output projection is scaled by G,
        and the layer reproduces the dense FFN (the paper scales by ``E*G/K`` because
        its combine weights are raw softmax probabilities; renormalized weights need G).
        Requires ``init="copy"``.
    gate: ``softmax`` or ``normalized``, see `Gate`.
    jitter_eps: multiplicative router-input jitter U(1-eps, 1+eps), training only.
    aux_loss_coef / z_loss_coef: weights of the load-balancing loss (alpha) and the
        router z-loss (beta).
    seq_aux_loss_coef: weight of DeepSeek-V3's complementary sequence-wise balance loss
        (the load-balancing loss computed per sequence over the top-k choices, with the
        scores normalized per token), next to the batch-level one; 0: off.
    shared_experts: N always-on experts (DeepSeekMoE, Qwen2-MoE) added to every token's
        output, computed as one FFN N expert widths wide. Upcycled (``init="copy"`` or
        ``"drop"``), shared expert ``j`` is slice ``j % G`` of the dense FFN (a whole
        copy with ``granularity`` 1), so N must be a multiple of G: the shared experts
        hold N / G copies of the dense FFN, the routed experts one, and every output
        projection is scaled by ``G / (N + G)`` so that the layer starts as the dense
        FFN. ``init="random"`` draws them fresh; ``"partition"`` is refused.
    shared_gate: Qwen2-MoE's ``shared_expert_gate``: the shared output times
        ``sigmoid(x . w)``, ``w`` a learned row; upcycled ``w`` is 0 (a gate of 1/2)
        and the shared output projections are doubled to compensate.
    expert_dropout: dropout rate inside the experts, between the two matmuls. ``None``
        (the default): each site takes the dropout found inside the dense FFN it
        replaces, between its two projections (T5's FFN dropout; 0 where there is none,
        e.g. GPT-2 and BERT, whose dropout follows the FFN and stays in the model), so
        conversion does not change the function in training. A number overrides it for
        every site (the paper fine-tunes with 0.4). See `resolve_expert_dropout`.
    router_dtype: the router's compute dtype ("selective precision").
    seed: seeds every random initialization the conversion makes.
    dropless: every routed choice is computed (MegaBlocks / Mixtral semantics): the
        capacity becomes the group's length, so no token can overflow its expert; the
        capacity factors are then unused. Eager execution computes the occupied slots
        only; a traced or exported graph pads every expert to the group's length.
    """

    num_experts: int = _field(8, "--experts", "-e", help="Experts per Switch layer (>= 2).")
    capacity_factor: float = _field(
        1.25, "--capacity", help="Training capacity factor: slots per expert as a multiple of T/E."
    )
    eval_capacity_factor: float = _field(2.0, "--eval-capacity", help="Evaluation capacity factor.")
    top_k: int = _field(1, "--top-k", help="Experts per token: 1 (Switch), 2 (GShard), any k "
                        "up to --experts (fine-grained MoE).")
    random_routing: bool | None = _field(
        None, "--random-routing", help="on or off: GShard's random second expert in training "
        "(top-2 only); default: on for --top-k 2, off otherwise.")
    scoring: Scoring = _field(
        Scoring.SOFTMAX, "--scoring", help="Router scores: softmax over the experts (Switch, "
        "Mixtral, Qwen) or a sigmoid per expert (DeepSeek-V3)."
    )
    routed_scaling: float = _field(
        1.0, "--routed-scaling", help="Multiplies the routed experts' combined output "
        "(DeepSeek-V3's routed_scaling_factor); upcycled experts are divided by it."
    )
    bias_balancing: bool = _field(
        False, "--bias-balancing", help="Auxiliary-loss-free balancing: a per-expert bias on "
        "the scores for selection only, moved by --bias-rate after each optimizer step "
        "(moeify.balance_experts)."
    )
    bias_update_rate: float = _field(
        1e-3, "--bias-rate", help="With --bias-balancing: the bias's step per optimizer step."
    )
    router: RouterKind = _field(
        RouterKind.TOKEN_CHOICE, "--router", help="token-choice (each token picks its top-k "
        "experts) or expert-choice (each expert takes the top-C tokens of a group, Zhou et "
        "al. 2022; causal sites such as a decoder's keep token choice)."
    )
    min_capacity: int = _field(4, "--min-capacity", help="Floor on the expert capacity.")
    group_size: int | None = _field(
        None, "--group-size", help="Tokens routed together; default: one sequence per group."
    )
    every: int = _field(
        2, "--every", help="Convert every N-th FFN of each stack (2: odd indices 1, 3, 5, ...)."
    )
    layers: tuple[int, ...] | None = _field(
        None, "--layers", help="Explicit FFN indices to convert, e.g. 1,3,5 (overrides --every)."
    )
    init: Init = _field(
        Init.COPY, "--init", help="Expert init: copy (upcycling), partition, random, or drop "
        "(Drop-Upcycling: copies with --drop-ratio of each expert's neurons re-initialized)."
    )
    noise: float = _field(0.0, "--noise", help="Relative noise added to copied experts.")
    drop_ratio: float = _field(
        0.5, "--drop-ratio", help="With --init drop: the fraction of each expert's hidden "
        "neurons re-initialized, a different random subset per expert (0.5 in the paper)."
    )
    granularity: int = _field(
        1, "--granularity", help="Granular upcycling: split each dense FFN into G slices of "
        "d_ff/G; the experts (a multiple of G) are copies of the slices and top-k (a "
        "multiple of G) picks whole copies at init. 1: experts are whole copies."
    )
    gate: Gate = _field(
        Gate.SOFTMAX, "--gate", help="softmax (Switch; top-k renormalized over the k), "
        "normalized (weights sum to 1) or raw (each choice's own score, never renormalized)."
    )
    jitter_eps: float = _field(0.01, "--jitter", help="Router input jitter eps (training only).")
    aux_loss_coef: float = _field(0.01, "--aux-loss-coef", help="Load-balancing loss weight.")
    z_loss_coef: float = _field(0.001, "--z-loss-coef", help="Router z-loss weight.")
    seq_aux_loss_coef: float = _field(
        0.0, "--seq-aux-loss-coef", help="Weight of the sequence-wise balance loss "
        "(DeepSeek-V3), next to the batch-level one; 0: off."
    )
    shared_experts: int = _field(
        0, "--shared-experts", help="Always-on shared experts added to every token's output "
        "(DeepSeekMoE, Qwen2-MoE), upcycled like the routed ones."
    )
    shared_gate: bool = _field(
        False, "--shared-gate", help="A learned sigmoid gate on the shared experts' output "
        "(Qwen2-MoE's shared_expert_gate)."
    )
    expert_dropout: float | None = _field(
        None,
        "--expert-dropout",
        help="Dropout inside the experts; default: the dropout inside the source FFN (0 if "
        "none); the paper uses 0.4 for fine-tuning.",
    )
    router_dtype: str = _field(
        "float32", "--router-dtype", help="The router's compute dtype: float32 or float64."
    )
    seed: int = _field(0, "--seed", help="Seeds every random initialization.")
    dropless: bool = _field(
        False, "--dropless", help="Compute every routed choice, nothing dropped (MegaBlocks, "
        "Mixtral): the capacity is the group's length."
    )

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        for name, kind in (("init", Init), ("gate", Gate), ("router", RouterKind),
                           ("scoring", Scoring)):
            value = getattr(self, name)
            try:
                set_(name, kind(value))
            except ValueError:
                allowed = ", ".join(repr(k.value) for k in kind)
                raise ConfigError(f"{{{name}!r}} is not one of {allowed}",
                                  **{name: value}) from None
        if self.layers is not None:
            set_("layers", tuple(self.layers))

        # One field at a time, in declaration order, then the checks that relate fields.
        _require_int("num_experts", self.num_experts, lambda v: v >= 2, ">= 2")
        _require_int("top_k", self.top_k, lambda v: v >= 1, ">= 1")
        if self.random_routing is not None and not isinstance(self.random_routing, bool):
            raise ConfigError("{random_routing!r} must be true, false or None",
                              random_routing=self.random_routing)
        if self.random_routing and self.top_k != 2:
            raise ConfigError(
                "{random_routing!r} is GShard's rule for a second expert (kept with "
                "probability 2 * p2 / (p1 + p2)), defined for top-2 only; got {top_k!r}",
                random_routing=True, top_k=self.top_k)
        _require_int("min_capacity", self.min_capacity, lambda v: v >= 1, ">= 1")
        if self.group_size is not None:
            _require_int("group_size", self.group_size, lambda v: v >= 1, ">= 1 or None")
        _require_int("every", self.every, lambda v: v >= 1, ">= 1")
        _require_int("granularity", self.granularity, lambda v: v >= 1, ">= 1")
        _require_int("seed", self.seed, lambda v: v >= 0, ">= 0")
        _require_int("shared_experts", self.shared_experts, lambda v: v >= 0, ">= 0")
        if self.layers is not None:
            bad = [i for i in self.layers if not _is_int(i) or i < 0]
            if bad or len(set(self.layers)) != len(self.layers):
                raise ConfigError("{layers!r} must list distinct layer indices >= 0",
                                  layers=self.layers)
        positive = lambda v: v > 0  # noqa: E731
        non_negative = lambda v: v >= 0  # noqa: E731
        unit = lambda v: 0 <= v < 1  # noqa: E731
        _require_float("capacity_factor", self.capacity_factor, positive, "> 0")
        _require_float("eval_capacity_factor", self.eval_capacity_factor, positive, "> 0")
        _require_float("noise", self.noise, non_negative, ">= 0")
        _require_float("drop_ratio", self.drop_ratio, lambda v: 0 <= v <= 1, "in [0, 1]")
        _require_float("jitter_eps", self.jitter_eps, unit, "in [0, 1)")
        _require_float("aux_loss_coef", self.aux_loss_coef, non_negative, ">= 0")
        _require_float("z_loss_coef", self.z_loss_coef, non_negative, ">= 0")
        _require_float("seq_aux_loss_coef", self.seq_aux_loss_coef, non_negative, ">= 0")
        _require_float("routed_scaling", self.routed_scaling, positive, "> 0")
        _require_float("bias_update_rate", self.bias_update_rate, positive, "> 0")
        if self.expert_dropout is not None:
            _require_float("expert_dropout", self.expert_dropout, unit, "in [0, 1) or None")
        if self.router_dtype not in ROUTER_DTYPES:
            raise ConfigError(
                "{router_dtype!r} is not one of "
                + ", ".join(repr(d) for d in ROUTER_DTYPES)
                + " (the router always runs in full precision)",
                router_dtype=self.router_dtype,
            )
        for name in ("dropless", "bias_balancing", "shared_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{{{name}!r}} must be true or false",
                                  **{name: getattr(self, name)})
        if self.shared_gate and not self.shared_experts:
            raise ConfigError("{shared_gate!r} gates the shared experts' output, and there "
                              "are none: set {shared_experts} or more",
                              shared_gate=True, shared_experts=config_param(
                                  "shared_experts").given(1))
        if self.shared_experts:
            self._check_shared_experts()
        if self.router == RouterKind.EXPERT_CHOICE:
            self._check_expert_choice()
        if self.granularity > 1:
            G = self.granularity
            if self.init != Init.COPY:
                raise ConfigError("{granularity!r} splits copies of the dense FFN: it needs "
                                  "{copy}, not {init!r}", granularity=G, init=self.init,
                                  copy=config_param("init").given(Init.COPY))
            if self.top_k % G:
                raise ConfigError(
                    "{granularity!r} needs top_k a multiple of it (a token picks whole copies "
                    "of the G slices at init), got {top_k!r}; for example {top_k_g}",
                    granularity=G, top_k=self.top_k, top_k_g=config_param("top_k").given(G))
            if self.num_experts % G:
                raise ConfigError("{num_experts!r} must be a multiple of {granularity!r} (each "
                                  "copy of the dense FFN is G experts)",
                                  num_experts=self.num_experts, granularity=G)
        if self.top_k > self.num_experts:
            raise ConfigError("{top_k!r} exceeds {num_experts!r}: a token cannot choose "
                              "more experts than there are",
                              top_k=self.top_k, num_experts=self.num_experts)

    def _check_shared_experts(self) -> None:
        N, G = self.shared_experts, self.granularity
        if self.init == Init.PARTITION:
            raise ConfigError(
                "{shared_experts!r} are copies of the dense FFN or of its slices; with "
                "{init!r} every expert is a different slice and none is left to share: use "
                "{copy} or {random}", shared_experts=N, init=self.init,
                copy=config_param("init").given(Init.COPY),
                random=config_param("init").given(Init.RANDOM))
        if self.init != Init.RANDOM and N % G:
            raise ConfigError(
                "{shared_experts!r} must be a multiple of {granularity!r}: shared expert j is "
                "slice j % G of the dense FFN, so the shared experts hold N / G whole copies "
                "of it and the layer can start as the dense FFN", shared_experts=N,
                granularity=G)

    def _check_expert_choice(self) -> None:
        router = self.router
        for name, value, default in (("scoring", self.scoring, Scoring.SOFTMAX),
                                     ("bias_balancing", self.bias_balancing, False),
                                     ("gate", self.gate, Gate.SOFTMAX)):
            if value != default:
                raise ConfigError(
                    "{" + name + "!r} is a token-choice option; with {router!r} each expert "
                    "takes its top-C tokens by softmax score (balanced by construction): "
                    "use {default}", **{name: value}, router=router,
                    default=config_param(name).given(default))
        if self.top_k != 1:
            raise ConfigError(
                "{top_k!r} has no role with {router!r}: each expert takes its top-C tokens, "
                "C = capacity_factor x T / E, so a token gets capacity_factor experts on "
                "average; set {top_k_1}", top_k=self.top_k, router=router,
                top_k_1=config_param("top_k").given(1))
        if self.dropless:
            raise ConfigError(
                "{dropless!r} computes every choice a token makes; with {router!r} the experts "
                "choose, C tokens each: use one of the two", dropless=self.dropless,
                router=router)

    def capacity(self, tokens_per_group: int, *, training: bool) -> int:
        """Expert capacity for a group of ``tokens_per_group`` tokens (a Python int);
        the group's length itself when ``dropless``. With expert choice, the number
        of tokens each expert takes (top_k is 1: ``ceil(capacity_factor * T / E)``)."""
        if self.dropless:
            return tokens_per_group
        factor = self.capacity_factor if training else self.eval_capacity_factor
        return expert_capacity(
            tokens_per_group,
            num_experts=self.num_experts,
            capacity_factor=factor,
            top_k=self.top_k,
            min_capacity=self.min_capacity,
        )

    @property
    def uses_random_routing(self) -> bool:
        """Whether training keeps the second expert at random (GShard): ``random_routing``,
        by default on for top-2."""
        return self.top_k == 2 if self.random_routing is None else self.random_routing

    def resolve_expert_dropout(self, source_dropout: float = 0.0) -> float:
        """The experts' dropout rate for a site whose dense FFN applies ``source_dropout``
        between its projections: ``expert_dropout`` when set, else ``source_dropout``
        (0 for a layer built without a source FFN)."""
        if self.expert_dropout is not None:
            return float(self.expert_dropout)
        return float(source_dropout)

    @property
    def hidden_split(self) -> HiddenSplit:
        """Into how many slices each dense FFN's hidden neurons split: one per expert
        (``partition``), G (``granularity``), or 1 (whole copies)."""
        if self.init == Init.PARTITION:
            return HiddenSplit(self.num_experts, "init='partition'", "experts",
                               "pick a num_experts dividing d_ff or init='copy'")
        G = self.granularity
        return HiddenSplit(G, f"granularity {G}", "slices", "pick a granularity dividing d_ff")

    def expert_width(self, d_ff: int) -> int:
        """Hidden width of each expert made from a dense FFN of width ``d_ff``."""
        return d_ff // self.hidden_split.parts

    @property
    def plain_copies(self) -> bool:
        """Whether every expert starts as an exact copy of the dense FFN (``init="copy"``
        without noise or granularity)."""
        return self.starts_dense and self.granularity == 1

    @property
    def starts_dense(self) -> bool:
        """Whether the upcycled layer computes the dense FFN at init (with room for every
        token and renormalized weights): plain copies, or copies of G slices (granular)."""
        return self.init == Init.COPY and self.noise == 0

    def replace(self, **changes: Any) -> MoEConfig:
        """A copy with some fields changed (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["init"] = self.init.value
        out["gate"] = self.gate.value
        out["router"] = self.router.value
        out["scoring"] = self.scoring.value
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
            raise MoEError(
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
        raise ConfigError(f"{{{name}!r}} must be an integer {allowed}", **{name: value})


def _require_float(name: str, value: Any, ok: Callable[[float], bool], allowed: str) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or not ok(value):
        raise ConfigError(f"{{{name}!r}} must be a finite number {allowed}", **{name: value})
