"""The Switch layer: a router, a dispatcher and the experts, composed.

`SwitchFFN` is a drop-in replacement for a dense FFN: ``[..., d] -> [..., d]``,
returning 0 for tokens that no expert processed so the surrounding residual carries
them unchanged. It composes three parts, as TorchTitan's and Megatron-Core's MoE layers
do:

* ``router`` (`moeify.switch.router`): scores, selection, losses and the routing
  record; a `TokenChoiceRouter` or an `ExpertChoiceRouter` (``MoEConfig.router``);
* ``dispatcher`` (`moeify.switch.dispatchers`): how the selected tokens reach the
  experts and come back: capacity-padded or sorted in one process, expert choice's
  gather and scatter-add, the all-to-all of expert parallelism
  (`moeify.distributed.AllToAllDispatcher`), ONNX Runtime's MoE operator at export
  (`moeify.onnx.moe_op.OrtDispatcher`);
* ``experts`` (`moeify.switch.experts.Experts`): the weights and their grouped compute;
* ``shared_experts`` (`moeify.switch.shared.SharedExperts`, ``MoEConfig.shared_experts``):
  always-on experts whose output is added to the routed output, or None.

The layer itself owns what is common to every combination: the declared group length
and the capacity fixed for it, the input checks, the real-token mask, and the record of
the last forward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moeify.config import Activation, MoEConfig, RouterKind
from moeify.errors import MoEError
from moeify.switch.dispatch import Sizes
from moeify.switch.dispatchers import (
    Dispatcher,
    DispatchPath,
    ExpertChoiceDispatcher,
    LocalDispatcher,
)
from moeify.switch.experts import DenseFFNWeights, Experts
from moeify.switch.router import ExpertChoiceRouter, Router, RoutingRecord, TokenChoiceRouter
from moeify.switch.routing import group_capacities
from moeify.switch.shared import SharedExperts
from moeify.switch.upcycle import upcycled_tensors


class SwitchFFN(nn.Module):
    """A Switch Transformer FFN layer: router, dispatcher, E experts, static capacity.

    Built for a declared group length (``config.group_size``, else ``seq_len``: one
    sequence per group), the capacity is a Python int fixed here, never computed from
    an input's shape in ``forward``; ``train()`` / ``eval()`` switch between the
    training and the evaluation capacity factor. Input ``[..., d]``: with one sequence
    per group the second-to-last axis must be the declared sequence length; with
    ``group_size`` the token count must divide into groups.

    Without a declared length (``seq_len=None`` and no ``group_size``) each sequence is
    still one group, and in eager mode the capacity follows each input's sequence length
    by the same formula, as a Python int: what autoregressive decoding needs (one new
    token per step). Tracing, compiling and exporting need the fixed capacity of a
    declared length and refuse an undeclared layer.

    With ``config.router == "expert-choice"`` the experts choose their tokens
    (`ExpertChoiceRouter`, `ExpertChoiceDispatcher`): each expert takes C tokens of every
    group, computed in the static ``[E, G*C, d]`` buffers (``dispatch_path`` does not
    apply).

    With ``config.shared_experts`` N > 0, ``shared_experts`` (`SharedExperts`) runs every
    token (padding tokens included, as Qwen2-MoE's does: their outputs are masked
    downstream) and its output is added to the dispatcher's, whichever dispatcher runs
    (one process, expert choice, the all-to-all of expert parallelism, ONNX Runtime's
    operator): the shared experts are replicated, never routed.

    After each forward (outside tracing and export), `last_routing` holds the unweighted
    losses and the routing statistics that `moeify.aux_loss` and `moeify.routing_stats`
    read: the one piece of state a forward writes, the equivalent of flax's ``sow``.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        config: MoEConfig,
        *,
        seq_len: int | None = None,
        activation: Activation | str = Activation.RELU,
        gated: bool = False,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        router: Router | None = None,
        experts: Experts | None = None,
        dispatcher: Dispatcher | None = None,
        source_dropout: float = 0.0,
        shared_experts: SharedExperts | None = None,
    ) -> None:
        """``router`` / ``experts`` / ``shared_experts``: modules built elsewhere to use
        instead of allocating fresh ones; their shapes must match (``experts`` holds the
        experts ``dispatcher.local_experts`` names: all E but under expert parallelism;
        ``shared_experts`` is given only with ``config.shared_experts`` > 0).
        ``dispatcher``: how tokens reach the experts; by default `LocalDispatcher`
        (token choice) or `ExpertChoiceDispatcher`.
        ``source_dropout``: the dropout rate inside the dense FFN this layer replaces;
        fresh experts use it unless ``config.expert_dropout`` overrides it."""
        super().__init__()
        self._config = config
        self.d_model, self.d_ff = d_model, d_ff
        expert_choice = config.router == RouterKind.EXPERT_CHOICE
        if dispatcher is None:
            dispatcher = ExpertChoiceDispatcher() if expert_choice else LocalDispatcher()
        local = dispatcher.local_experts(config.num_experts)
        router_class = ExpertChoiceRouter if expert_choice else TokenChoiceRouter
        if router is None:
            options = {"routed_scaling": config.routed_scaling} if expert_choice else {
                "top_k": config.top_k, "gate": config.gate, "scoring": config.scoring,
                "routed_scaling": config.routed_scaling,
                "bias_balancing": config.bias_balancing,
                "bias_update_rate": config.bias_update_rate,
                "seq_balance": config.seq_aux_loss_coef > 0,
                "random_routing": config.uses_random_routing}
            router = router_class(
                d_model, config.num_experts, jitter_eps=config.jitter_eps,
                router_dtype="float64" if dtype == torch.float64 else config.router_dtype,
                device=device, **options,
            )
        if experts is None:
            experts = Experts(
                len(local), d_model, d_ff, activation=activation, gated=gated,
                bias=bias, dropout=config.resolve_expert_dropout(source_dropout),
                device=device, dtype=dtype,
            )
        if shared_experts is None and config.shared_experts:
            shared_experts = SharedExperts(
                config.shared_experts, d_model, d_ff, gate=config.shared_gate,
                activation=experts.activation, gated=experts.gated,
                bias=experts.b_in is not None, dropout=experts.dropout,
                device=device, dtype=dtype,
            )
        if not isinstance(router, router_class):
            raise MoEError(f"a {config.router.value} layer routes with "
                           f"{router_class.__name__}, got {type(router).__name__}")
        expected = (config.num_experts, d_model)
        if tuple(router.weight.shape) != expected:
            raise MoEError(f"router weight {tuple(router.weight.shape)} != {expected}")
        if (experts.num_experts, experts.d_model, experts.d_ff) != (len(local), d_model, d_ff):
            raise MoEError(
                f"experts ({experts.num_experts}, {experts.d_model}, {experts.d_ff}) != "
                f"{(len(local), d_model, d_ff)}"
            )
        self._check_shared_experts(shared_experts, config, experts)
        self.router = router
        self.dispatcher = dispatcher
        self.experts = experts
        # None without shared experts: such a layer's state_dict is what it always was
        self.shared_experts = shared_experts
        self.set_tokens_per_group(config.group_size if config.group_size is not None else seq_len)
        self.last_routing: RoutingRecord | None = None
        # [batch, length] mask of the real tokens for the model's current forward (set
        # and cleared around it by a hook on the model), or None: every token is real
        self.token_mask: Tensor | None = None

    @staticmethod
    def _check_shared_experts(shared: SharedExperts | None, config: MoEConfig,
                              experts: Experts) -> None:
        """Refuse shared experts that do not match ``config`` (count, gate) or the
        routed experts (width, d_model, activation, gating, biases)."""
        if shared is None:
            if config.shared_experts:
                raise MoEError(f"the config asks for {config.shared_experts} shared experts "
                               "and none were given")
            return
        if not config.shared_experts:
            raise MoEError("shared experts were given to a layer whose config has none "
                           "(MoEConfig.shared_experts=0)")
        ffn = shared.ffn
        got = (shared.num_shared, shared.gate is not None, ffn.d_model, shared.d_ff,
               ffn.activation, ffn.gated, ffn.b_in is not None)
        want = (config.shared_experts, config.shared_gate, experts.d_model, experts.d_ff,
                experts.activation, experts.gated, experts.b_in is not None)
        if got != want:
            names = ("num_shared", "gate", "d_model", "d_ff", "activation", "gated", "bias")
            wrong = [(n, g, w) for n, g, w in zip(names, got, want) if g != w]
            raise MoEError("shared experts do not match the layer: " + ", ".join(
                f"{n} {g!r} != {w!r}" for n, g, w in wrong))

    @classmethod
    def from_dense(
        cls,
        dense: DenseFFNWeights,
        config: MoEConfig,
        *,
        path: str = "",
        seq_len: int | None = None,
        activation: Activation | str = Activation.RELU,
        source_dropout: float = 0.0,
    ) -> SwitchFFN:
        """Upcycle one dense FFN: experts from its weights (``config.init``), new router.

        The one way a Switch layer is made from a dense FFN: conversion, streamed
        conversion and loading all come here or to `upcycled_tensors`, which this uses.
        ``path`` (the FFN's module path in its model) seeds the random draws with
        ``config.seed``, so ``from_dense(moeify.FFNSite.dense_weights(model), config,
        path=site.path)`` equals what ``moeify.convert`` builds for that site.
        ``source_dropout``: the dropout rate the dense FFN applies between its
        projections (the experts' rate unless ``config.expert_dropout`` overrides it).
        Dense weights on the meta device give a layer on the meta device (nothing drawn:
        loading a checkpoint assigns its tensors).
        """
        d, f = dense.w_in.shape
        split = config.hidden_split
        if f % split.parts:
            raise MoEError(f"{split.who} splits the hidden width {f} into {split.parts} "
                             f"{split.unit}, which does not divide it: {split.fix}")
        f = config.expert_width(f)
        layer = cls(  # on meta first: every parameter is written below, none drawn twice
            d, f, config, seq_len=seq_len, activation=activation,
            gated=dense.w_gate is not None, bias=dense.b_in is not None,
            device="meta", dtype=dense.w_in.dtype, source_dropout=source_dropout,
        )
        if dense.w_in.is_meta:
            return layer
        layer = layer.to_empty(device=dense.w_in.device)
        tensors = layer.state_dict(keep_vars=True)  # parameters and persistent buffers
        for name, source in upcycled_tensors(dense, config, path=path,
                                             activation=activation).items():
            source.copy_to(tensors[name])
        return layer

    def set_tokens_per_group(self, tokens_per_group: int | None) -> None:
        """Declare the group length and fix the train and eval capacities for it.

        ``None`` (only without ``MoEConfig.group_size``) undeclares it: eager inputs of
        any sequence length, capacity computed per call (see the class docs).
        """
        if tokens_per_group is None and self.config.group_size is not None:
            raise MoEError("MoEConfig.group_size is set: the group length is always declared")
        if tokens_per_group is not None and (
            not isinstance(tokens_per_group, int) or tokens_per_group < 1
        ):
            raise MoEError(f"tokens_per_group must be an int >= 1, got {tokens_per_group!r}")
        self.tokens_per_group = tokens_per_group
        capacity = lambda training: (  # noqa: E731
            None if tokens_per_group is None
            else self.config.capacity(tokens_per_group, training=training)
        )
        self.train_capacity = capacity(True)
        self.eval_capacity = capacity(False)

    @property
    def config(self) -> MoEConfig:
        """The layer's options. Assigning a new config (``layer.config =
        layer.config.replace(gate="normalized")``) reconfigures the router, and the experts'
        dropout where ``expert_dropout`` is set; the sizes it fixes at construction (the
        number of experts, the router kind) cannot change. Capacities follow at the next
        `set_tokens_per_group`."""
        return self._config

    @config.setter
    def config(self, config: MoEConfig) -> None:
        fixed = ("num_experts", "router", "granularity", "shared_experts", "shared_gate",
                 "bias_balancing")
        changed = [f for f in fixed if getattr(config, f) != getattr(self._config, f)]
        if changed:
            raise MoEError(f"a built Switch layer keeps its {', '.join(changed)}: convert the "
                           "dense model again for other values")
        self._config = config
        self.router.configure(config)
        if config.expert_dropout is not None:
            self.experts.dropout = config.expert_dropout
            if self.shared_experts is not None:
                self.shared_experts.ffn.dropout = config.expert_dropout

    @property
    def expert_capacity(self) -> int | None:
        """Slots per expert and group in the current mode (None: undeclared length)."""
        return self.train_capacity if self.training else self.eval_capacity

    @property
    def sizes(self) -> Sizes:
        """Routing sizes for the declared group length."""
        if self.tokens_per_group is None:
            raise MoEError(
                "this SwitchFFN has no declared sequence length, so no fixed capacity: "
                "call set_tokens_per_group(n) (moeify.convert(..., seq_len=n))"
            )
        return self._sizes(self.tokens_per_group)

    def _sizes(self, tokens_per_group: int) -> Sizes:
        c = self.config
        capacity = c.capacity(tokens_per_group, training=self.training)
        return Sizes(c.num_experts, capacity, tokens_per_group, c.top_k)

    @property
    def dispatch_path(self) -> DispatchPath:
        """The `DispatchPath` of a token-choice layer in one process; setting it swaps
        in the `LocalDispatcher` for that path."""
        if not isinstance(self.dispatcher, LocalDispatcher):
            raise MoEError(f"this layer dispatches with {type(self.dispatcher).__name__}, "
                           "which has no dispatch_path")
        return self.dispatcher.path

    @dispatch_path.setter
    def dispatch_path(self, path: DispatchPath) -> None:
        if not isinstance(self.dispatcher, LocalDispatcher):
            raise MoEError(f"this layer dispatches with {type(self.dispatcher).__name__}: "
                           "dispatch_path applies to one process's token-choice layers")
        self.dispatcher = LocalDispatcher(path)

    @property
    def local_experts(self) -> range:
        """The experts of the layer that ``self.experts`` holds (all of them unless
        they are spread over processes)."""
        return self.dispatcher.local_experts(self.config.num_experts)

    def forward(self, hidden_states: Tensor) -> Tensor:
        tracing = is_tracing(hidden_states)
        if tracing:
            sizes = self.sizes  # a traced graph keeps its capacity: it must be declared
        else:
            self._check_input(hidden_states)
            tokens = self.tokens_per_group or hidden_states.shape[-2]  # eager: a Python int
            sizes = self._sizes(tokens)
        x = hidden_states.reshape(-1, sizes.tokens_per_group, self.d_model)  # [G, T, d]
        valid = self._valid_tokens(hidden_states, x)  # [G, T] bool or None
        group_capacity = None if valid is None else self._group_capacities(valid)
        routing = self.router.route(x, sizes, group_capacity=group_capacity, valid=valid)
        y, tokens_per_expert = self.dispatcher(x, routing, sizes, self.experts,
                                               tracing=tracing)  # [G, T, d]
        if self.shared_experts is not None:  # every token, routed or dropped
            batched = tracing or self.shared_experts.ffn.batched_matmul_ok()
            y = y.reshape_as(x) + self.shared_experts(x, batched=batched)  # [G, T, d]
        if not is_exporting(hidden_states):
            seq_len = hidden_states.shape[-2] if hidden_states.dim() > 1 else 1
            record = self.router.record(routing, tokens_per_expert, sizes.expert_capacity,
                                        seq_len=seq_len)
            self.last_routing = self.dispatcher.batch_record(record, routing)
        return y.reshape_as(hidden_states).to(hidden_states.dtype)

    def _valid_tokens(self, hidden_states: Tensor, x: Tensor) -> Tensor | None:
        """The real tokens of this forward as [G, T] bool, from ``token_mask`` (set around
        the model's forward from its attention mask, see `moeify.passes.RegisterPaddingMask`),
        or None when there is no mask or it does not describe these tokens.

        A mask ``[batch, length]`` covers this input's ``[batch, seq]`` tokens when the
        batch matches and ``length >= seq``: with a KV cache the mask also covers the past
        tokens, and this step's tokens are its last ``seq`` columns.
        """
        mask = self.token_mask
        if mask is None or hidden_states.dim() < 3:
            return None
        batch, seq = hidden_states.shape[0], hidden_states.shape[-2]
        if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < seq:
            return None
        return mask[:, mask.shape[1] - seq:].to(device=x.device, dtype=torch.bool).reshape(x.shape[:2])

    def _group_capacities(self, valid: Tensor) -> Tensor:
        c = self.config
        factor = c.capacity_factor if self.training else c.eval_capacity_factor
        return group_capacities(valid.sum(dim=1), num_experts=c.num_experts,
                                capacity_factor=factor, top_k=c.top_k,
                                min_capacity=c.min_capacity, dropless=c.dropless)

    def _check_input(self, hidden_states: Tensor) -> None:
        shape = tuple(hidden_states.shape)
        if not shape or shape[-1] != self.d_model:
            raise MoEError(f"SwitchFFN expects inputs [..., {self.d_model}], got {shape}")
        if len(shape) < 2 and self.config.group_size is None:
            raise MoEError(
                f"SwitchFFN expects inputs [..., seq_len, {self.d_model}] (one sequence per "
                f"group), got {shape}"
            )
        if self.config.group_size is None:
            if self.tokens_per_group is not None and shape[-2] != self.tokens_per_group:
                raise MoEError(
                    f"SwitchFFN was built for sequences of {self.tokens_per_group} tokens "
                    f"(its capacity is fixed for that length), got input {shape}; call "
                    f"set_tokens_per_group({shape[-2]}) to re-declare it, or "
                    "set_tokens_per_group(None) for a per-call capacity in eager mode"
                )
        elif math.prod(shape[:-1]) % self.tokens_per_group:
            raise MoEError(
                f"SwitchFFN routes groups of {self.tokens_per_group} tokens; input {shape} "
                f"has {math.prod(shape[:-1])} tokens, not a multiple of it"
            )

    def extra_repr(self) -> str:
        c = self.config
        if self.tokens_per_group is None:
            capacity = "per call (undeclared length)"
        else:
            capacity = f"{self.train_capacity} (train) / {self.eval_capacity} (eval)"
        return (
            f"d_model={self.d_model}, num_experts={c.num_experts}, top_k={c.top_k}, "
            f"tokens_per_group={self.tokens_per_group}, expert_capacity={capacity}, "
            f"gate={c.gate.value}, router={c.router.value}"
            + (f", shared_experts={c.shared_experts}" + ", shared_gate" * c.shared_gate
               if c.shared_experts else "")
        )


def captured(x: Tensor) -> bool:
    """Whether this forward is being recorded by fx, the jit tracer or ONNX export."""
    return (
        isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    )


def is_tracing(x: Tensor) -> bool:
    """Whether this forward is traced or compiled rather than run eagerly (static path)."""
    return captured(x) or torch.compiler.is_compiling()


def is_exporting(x: Tensor) -> bool:
    """Whether this forward produces a graph that cannot hold module state writes."""
    return captured(x) or torch.compiler.is_exporting()


def switch_layers(model: nn.Module) -> list[tuple[str, SwitchFFN]]:
    """Every Switch layer in ``model`` with its qualified name, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SwitchFFN)]
