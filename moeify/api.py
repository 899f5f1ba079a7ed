"""User-facing functions over a model that contains Switch layers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

from moeify.compiler.pipeline import Pipeline, analysis_pipeline, apply_program
from moeify.compiler.plan import ConversionPlan, plan_of, record_plan
from moeify.compiler.program import Program, Progress
from moeify.compiler.report import ConversionReport
from moeify.config import MoEConfig
from moeify.errors import MoEError
from moeify.io.checkpoint import install_save_pretrained
from moeify.passes import FindFFN, SelectSites
from moeify.switch import switch_layers


@dataclass(frozen=True)
class LayerStats:
    """Routing statistics of one Switch layer's last forward pass.

    For an expert-choice layer (``router == "expert-choice"``): ``tokens_per_expert`` is
    C per group for every expert (fewer in groups with padding), ``dropped_fraction``
    the fraction of the real tokens that no expert chose, ``load_balancing_loss`` and
    ``seq_balance_loss`` 0.
    """

    name: str
    tokens_per_expert: tuple[int, ...]
    dropped_fraction: float
    expert_capacity: int
    num_tokens: int
    load_balancing_loss: float = float("nan")  # unweighted, as recorded by the forward
    z_loss: float = float("nan")
    router: str = "token-choice"
    seq_balance_loss: float = float("nan")  # 0 unless the layer's seq_aux_loss_coef > 0


def _records(model: nn.Module):
    """(name, layer, record) of every Switch layer that ran in the last forward."""
    layers = switch_layers(model)
    if not layers:
        raise MoEError("the model has no Switch layers: convert it with moeify.convert first")
    ran = [(name, layer, layer.last_routing) for name, layer in layers if layer.last_routing is not None]
    if not ran:
        raise MoEError(
            "no Switch layer has run yet: call the model's forward before reading its "
            "losses or statistics"
        )
    return ran


def aux_loss(model: nn.Module) -> Tensor:
    """Weighted auxiliary loss of the last forward pass, a scalar with gradient.

    ``mean over Switch layers of (aux_loss_coef * load_balancing + z_loss_coef * z_loss
    + seq_aux_loss_coef * seq_balance)`` over the layers that ran (a converted model
    clears older records at each forward); averaged over layers (as t5x does) so the
    weight does not grow with depth. Add it to the task loss before ``backward()``. The
    sequence-wise term (DeepSeek-V3's complementary balance loss, per sequence of the
    layer's input) is there only where ``seq_aux_loss_coef > 0``. An expert-choice
    layer's balance terms are 0 (its experts are full by construction; Zhou et al. use
    no such loss): it counts in the mean with its z-loss alone. Bias balancing
    (`balance_experts`) adds nothing here: its update is outside autograd.
    """
    terms = []
    for _, layer, record in _records(model):
        c = layer.config
        term = c.aux_loss_coef * record.load_balancing_loss + c.z_loss_coef * record.z_loss
        if c.seq_aux_loss_coef > 0:
            term = term + c.seq_aux_loss_coef * record.seq_balance_loss
        terms.append(term)
    return torch.stack(terms).mean()


AUX_HOOK_ATTR = "_moeify_aux_loss_hook"


def add_aux_loss_to_output(model: nn.Module):
    """After every forward of ``model`` that returns a ``loss`` (a transformers model
    called with ``labels``), add `aux_loss` to it: ``outputs.loss`` is then what to
    ``backward()``. Forwards without a loss are left alone; the per-layer values stay
    readable with `routing_stats`. Idempotent; returns the hook's handle (``.remove()``
    undoes it).
    """
    return _install_aux_hook(model)


def _install_aux_hook(model: nn.Module):
    handle = model.__dict__.get(AUX_HOOK_ATTR)
    if handle is not None and handle.id in model._forward_hooks:
        return handle  # still installed
    if not switch_layers(model):
        raise MoEError("the model has no Switch layers: convert it with moeify.convert first")

    def add(module, args, kwargs, output):
        loss = getattr(output, "loss", None)
        if isinstance(loss, Tensor) and any(l.last_routing is not None
                                            for _, l in switch_layers(module)):
            output["loss"] = loss + aux_loss(module)
        return output

    handle = model.register_forward_hook(add, with_kwargs=True)
    model.__dict__[AUX_HOOK_ATTR] = handle
    return handle


def set_expert_dropout(model: nn.Module, rate: float) -> None:
    """Set the dropout inside every Switch layer's experts (fine-tuning: the paper uses
    0.4 there and 0.1 elsewhere); the rest of the model's dropout is untouched.

    Overrides the rate each site took at conversion (by default the dropout inside its
    dense FFN); recorded in the model's conversion, so `save` / `load` keep it.
    """
    if not 0.0 <= rate < 1.0:
        raise MoEError(f"expert dropout must be within [0, 1), got {rate}")
    layers = switch_layers(model)
    if not layers:
        raise MoEError("the model has no Switch layers: convert it with moeify.convert first")
    for _, layer in layers:
        layer.config = layer.config.replace(expert_dropout=rate)
    plan = plan_of(model)
    if plan is not None:
        record_plan(model, dataclasses.replace(
            plan, config=plan.config.replace(expert_dropout=rate)))


def set_seq_len(model: nn.Module, seq_len: int | None) -> None:
    """Switch a converted model between a declared and a per-call capacity.

    ``seq_len=None``: every Switch layer computes its capacity from each input's
    sequence length, in eager mode: what ``generate()`` needs (a prompt, then one token
    per step). ``seq_len=n``: every layer is declared for sequences of n tokens, with the
    capacity fixed for them (what tracing, ``torch.compile(fullgraph=True)`` and ONNX
    export need; inputs of another length are refused). Layers whose config has a
    ``group_size`` keep it (their group length is always declared). The model's recorded
    conversion plan (`moeify.plan_of`) is updated, so `save` stores the new length
    and `load` restores it.
    """
    _check_seq_len(seq_len)
    layers = switch_layers(model)
    if not layers:
        raise MoEError("the model has no Switch layers: convert it with moeify.convert first")
    for _, layer in layers:
        if layer.config.group_size is None:
            layer.set_tokens_per_group(seq_len)
    plan = plan_of(model)
    if plan is not None:
        record_plan(model, dataclasses.replace(plan, seq_len=seq_len))


def routing_stats(model: nn.Module) -> list[LayerStats]:
    """Per Switch layer: tokens per expert, fraction dropped, capacity (last forward)."""
    return [
        LayerStats(
            name=name,
            tokens_per_expert=tuple(record.tokens_per_expert.tolist()),
            dropped_fraction=float(record.dropped_fraction),
            expert_capacity=record.expert_capacity,
            num_tokens=record.num_tokens,
            load_balancing_loss=float(record.load_balancing_loss.detach()),
            z_loss=float(record.z_loss.detach()),
            router=layer.config.router.value,
            seq_balance_loss=float(record.seq_balance_loss.detach()),
        )
        for name, layer, record in _records(model)
    ]


# --- conversion ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConversionResult:
    """What `convert` and `apply` return: the rewritten model (the same object), the
    plan it was converted by, and the report."""

    model: nn.Module
    plan: ConversionPlan
    report: ConversionReport


ExampleInputs = Union[Tensor, tuple, dict, None]


def _normalize_inputs(example_inputs: ExampleInputs) -> tuple[tuple, dict] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple):
        if len(example_inputs) == 2 and isinstance(example_inputs[1], dict) and isinstance(
            example_inputs[0], tuple
        ):
            return example_inputs[0], example_inputs[1]
        return example_inputs, {}
    raise MoEError(
        f"example_inputs must be a tensor, a tuple of positional inputs, a dict of keyword "
        f"inputs or (args, kwargs), got {type(example_inputs).__name__}"
    )


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise MoEError(f"moeify converts a torch.nn.Module, got {type(model).__name__}")


def _check_config(config: Any) -> MoEConfig:
    if config is None:
        return MoEConfig()
    if not isinstance(config, MoEConfig):
        hint = " (MoEConfig(**that_dict) or MoEConfig.from_dict)" if isinstance(config, dict) else ""
        raise MoEError(f"config must be a moeify.MoEConfig, got {type(config).__name__}{hint}")
    return config


def _check_seq_len(seq_len: Any) -> None:
    if seq_len is not None and (not isinstance(seq_len, int) or isinstance(seq_len, bool)
                                or seq_len < 1):
        raise MoEError(f"seq_len must be an int >= 1 or None, got {seq_len!r}")


def plan(
    model: nn.Module,
    config: MoEConfig | None = None,
    *,
    example_inputs: ExampleInputs = None,
    seq_len: int | None = None,
    progress: Progress | None = None,
) -> ConversionPlan:
    """Analyse ``model`` and decide its conversion, changing nothing.

    Traces the model, finds every FFN (`FFNSite`, with the modules its rewrite touches)
    and every rejected candidate with its reason, selects the sites ``config`` asks for
    and plans the expert sharding. Works on a model on the meta device. The result is a
    `ConversionPlan`: JSON-serializable, what `apply` carries out and what a checkpoint
    stores.

    config: the Switch settings (`MoEConfig()` by default: 8 experts, every other FFN).
    example_inputs: inputs that run the model (tensor, tuple, dict or (args, kwargs));
        needed only when an FFN spans code fx cannot trace and the model cannot make
        its own (HF models can).
    seq_len: the declared sequence length that fixes every layer's capacity (needed for
        tracing and ONNX export); None: capacity per input length in eager mode.
    """
    _check_model(model)
    config = _check_config(config)
    _check_seq_len(seq_len)
    program = Program(model, config, seq_len=seq_len,
                      example_inputs=_normalize_inputs(example_inputs), progress=progress)
    analysis_pipeline()(program)
    return program.plan


def apply(
    model: nn.Module,
    plan: ConversionPlan,
    *,
    progress: Progress | None = None,
    add_aux_loss_to_output: bool = False,
) -> ConversionResult:
    """Carry out ``plan`` on ``model``, in place, without tracing it.

    ``model`` must have the architecture the plan was made for (every selected site's
    modules, with the same projection shapes): a `MoEError` says which site does not fit.
    A model on the meta device gets Switch layers on the meta device (loading a
    checkpoint assigns their tensors).
    add_aux_loss_to_output: see `add_aux_loss_to_output`.
    """
    program = apply_program(model, plan, progress=progress)
    return _finish(program, add_aux_loss_to_output)


def _finish(program: Program, add_aux_loss: bool) -> ConversionResult:
    plan = program.plan
    record_plan(program.model, plan)
    install_save_pretrained(program.model)
    if add_aux_loss:
        _install_aux_hook(program.model)
    return ConversionResult(program.model, plan, ConversionReport.from_plan(plan))


def convert(
    model: nn.Module,
    config: MoEConfig | None = None,
    *,
    example_inputs: ExampleInputs = None,
    seq_len: int | None = None,
    pipeline: Pipeline | None = None,
    progress: Progress | None = None,
    add_aux_loss_to_output: bool = False,
) -> ConversionResult:
    """Turn ``model``'s FFNs into Switch layers, in place: `plan` then `apply`.

    Arguments as for `plan` and `apply`. ``pipeline``: a `moeify.compiler.pipeline.Pipeline` to
    run instead of the standard analysis and transformation (e.g. with a pass of your
    own inserted, ``examples/custom_pass.py``).
    """
    if pipeline is None:
        return apply(model, plan(model, config, example_inputs=example_inputs,
                                 seq_len=seq_len, progress=progress),
                     progress=progress, add_aux_loss_to_output=add_aux_loss_to_output)
    _check_model(model)
    _check_seq_len(seq_len)
    program = Program(model, _check_config(config), seq_len=seq_len,
                      example_inputs=_normalize_inputs(example_inputs), progress=progress)
    pipeline(program)
    return _finish(program, add_aux_loss_to_output)


def inspect(
    model: nn.Module,
    config: MoEConfig | None = None,
    *,
    example_inputs: ExampleInputs = None,
    seq_len: int | None = None,
) -> ConversionReport:
    """The report `convert` would give, without converting: `plan`'s report. Works on
    the meta device; a model whose FFNs are all rejected reports why instead of raising."""
    _check_model(model)
    config = _check_config(config)
    _check_seq_len(seq_len)
    program = Program(model, config, seq_len=seq_len,
                      example_inputs=_normalize_inputs(example_inputs))
    Pipeline([FindFFN(), SelectSites(allow_empty=True)])(program)
    return ConversionReport.from_plan(program.plan)
