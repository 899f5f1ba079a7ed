"""User-facing functions over a model that contains Switch layers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

from moeify.config import MoEConfig
from moeify.errors import MoEError
from moeify.report import ConversionReport
from moeify.switch.layer import SwitchFFN


@dataclass(frozen=True)
class LayerStats:
    """Routing statistics of one Switch layer's last forward pass."""

    name: str
    tokens_per_expert: tuple[int, ...]
    dropped_fraction: float
    expert_capacity: int
    num_tokens: int
    load_balancing_loss: float = float("nan")  # unweighted, as recorded by the forward
    z_loss: float = float("nan")


def switch_layers(model: nn.Module) -> list[tuple[str, SwitchFFN]]:
    """Every Switch layer in ``model`` with its qualified name, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SwitchFFN)]


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

    ``mean over Switch layers of (aux_loss_coef * load_balancing + z_loss_coef * z_loss)``
    over the layers that ran (a converted model clears older records at each forward);
    averaged over layers (as t5x does) so the weight does not grow with depth. Add it to
    the task loss before ``backward()``.
    """
    terms = [
        layer.config.aux_loss_coef * record.load_balancing_loss
        + layer.config.z_loss_coef * record.z_loss
        for _, layer, record in _records(model)
    ]
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
    if AUX_HOOK_ATTR in model.__dict__:
        return model.__dict__[AUX_HOOK_ATTR]
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
        layer.experts.dropout = rate
        layer.config = layer.config.replace(expert_dropout=rate)
    from moeify.program import CONVERSION_ATTR, conversion_of

    conversion = conversion_of(model)
    if conversion is not None:
        model.__dict__[CONVERSION_ATTR] = dataclasses.replace(
            conversion, config=conversion.config.replace(expert_dropout=rate)
        )


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
        )
        for name, _, record in _records(model)
    ]


# --- conversion ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConversionResult:
    """What `convert` returns: the rewritten model (the same object) and the report."""

    model: nn.Module
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


def convert(
    model: nn.Module,
    config: MoEConfig | None = None,
    *,
    example_inputs: ExampleInputs = None,
    seq_len: int | None = None,
    pipeline: Any = None,
    progress: Callable[[str, int, int], None] | None = None,
    add_aux_loss_to_output: bool = False,
) -> ConversionResult:
    """Turn ``model``'s FFNs into Switch layers, in place; returns the model and a report.

    config: the Switch settings (`MoEConfig()` by default: 8 experts, every other FFN).
    example_inputs: inputs that run the model (tensor, tuple, dict or (args, kwargs));
        needed only when an FFN spans code fx cannot trace and the model cannot make
        its own (HF models can).
    seq_len: the declared sequence length that fixes every layer's capacity (needed for
        tracing and ONNX export); None: capacity per input length in eager mode.
    pipeline: a ``PassManager`` to run instead of ``default_pipeline(config, seq_len=)``.
    progress: callback ``(stage, done, total)``.
    add_aux_loss_to_output: see `add_aux_loss_to_output` (for models whose outputs carry
        a ``loss``, like transformers models called with ``labels``).
    """
    from moeify.pipeline import default_pipeline, run_pipeline
    from moeify.program import CONVERSION_ATTR, Program

    _check_model(model)
    config = config if config is not None else MoEConfig()
    params_dense = sum(p.numel() for p in model.parameters())
    program = Program(
        model, config, seq_len=seq_len, example_inputs=_normalize_inputs(example_inputs),
        progress=progress,
    )
    manager = pipeline if pipeline is not None else default_pipeline(config, seq_len=seq_len)
    run_pipeline(manager, program)
    model.__dict__[CONVERSION_ATTR] = program.conversion()
    if add_aux_loss_to_output:
        _install_aux_hook(model)
    report = ConversionReport.build(
        type(model).__name__, config, program.seq_len, program.analysis, program.selected,
        params_dense,
    )
    return ConversionResult(model, report)


def inspect(
    model: nn.Module,
    config: MoEConfig | None = None,
    *,
    example_inputs: ExampleInputs = None,
    seq_len: int | None = None,
) -> ConversionReport:
    """The report `convert` would give, without converting; works on the meta device."""
    from moeify.passes import FindFFN, SelectSites
    from moeify.pipeline import run_pipeline
    from moeify.program import Program
    from torch.fx.passes.infra.pass_manager import PassManager

    _check_model(model)
    config = config if config is not None else MoEConfig()
    program = Program(model, config, seq_len=seq_len, example_inputs=_normalize_inputs(example_inputs))
    run_pipeline(PassManager([FindFFN(), SelectSites(allow_empty=True)]), program)
    return ConversionReport.build(
        type(model).__name__, config, seq_len, program.analysis, program.selected,
        sum(p.numel() for p in model.parameters()),
    )
