"""`verify(path)`: run the verification contract's checks that apply to a checkpoint.

| check | what it proves |
| --- | --- |
| reload | the checkpoint rebuilds and loads; saved again and reloaded, it gives bitwise the same outputs |
| upcycled weights | (source available, ``init=copy``, no noise) every non-expert weight equals the source's and every expert equals the source FFN |
| dense identity | (source available) with the normalized gate and room for every token, the converted model reproduces the source model's outputs (fp32: max abs diff <= 1e-5) |

Each check returns a `Check` (name, passed / skipped, detail); the CLI prints a table
and exits non-zero if any failed.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeify.config import Init
from moeify.errors import MoEError
from moeify.api import switch_layers
from moeify.checkpoint import CheckpointMeta, load, read_meta, save
from moeify.conversion import conversion_of
from moeify.sources import load_source
from moeify.trace import default_example_inputs

IDENTITY_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "pass", "fail" or "skip"
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "fail"


def _outputs(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise MoEError(f"cannot find a tensor output in {type(out).__name__}")


def _inputs(model: nn.Module, seq_len: int | None) -> dict[str, Any]:
    example = default_example_inputs(model)
    if example is None:
        raise MoEError("the model makes no example inputs of its own (not a transformers model)")
    _, kwargs = example
    if seq_len is not None:  # a declared length: feed exactly that many tokens
        generator = torch.Generator().manual_seed(0)
        vocab = getattr(model.config, "vocab_size", 100)
        for key in ("input_ids", "decoder_input_ids"):
            if key in kwargs:
                kwargs[key] = torch.randint(2, vocab, (2, seq_len), generator=generator)
        kwargs = {k: v for k, v in kwargs.items() if not k.endswith("attention_mask")}
    return kwargs


def check_reload(path: Path) -> tuple[Check, nn.Module | None]:
    try:
        model = load(path)
    except MoEError as error:
        return Check("reload", "fail", str(error)), None
    meta = read_meta(path)
    try:
        inputs = _inputs(model, meta.seq_len)
    except MoEError as error:
        return Check("reload", "pass", f"loaded; outputs not compared: {error}"), model
    before = _outputs(model, inputs)
    with tempfile.TemporaryDirectory() as tmp:
        save(model, Path(tmp) / "again", source=meta.source)
        again = load(Path(tmp) / "again")
        after = _outputs(again, inputs)
    same = torch.equal(before, after)
    detail = "saved again and reloaded: outputs bitwise equal" if same else (
        f"outputs differ after save + load (max abs diff {(before - after).abs().max():.3g})"
    )
    return Check("reload", "pass" if same else "fail", detail), model


def _source_model(meta: CheckpointMeta) -> nn.Module | None:
    source = meta.source
    if source is None or source.kind not in ("hf-dir", "hub"):
        return None
    model, _ = load_source(source.ref)
    return model.float().eval()


def check_upcycled_weights(model: nn.Module, dense: nn.Module) -> Check:
    conversion = conversion_of(model)
    config = conversion.config
    if config.init != Init.COPY or config.noise > 0:
        return Check("upcycled weights", "skip", f"init={config.init.value}, noise={config.noise}")
    dense_state = dense.state_dict()
    replaced = {p for site in conversion.selected_sites for p in site.replace}
    mismatched = []
    for name, tensor in model.state_dict().items():
        if ".experts." in name or ".router." in name:
            continue
        if any(name.startswith(p + ".") for p in replaced):
            continue
        source = dense_state.get(name)
        if source is None or not torch.equal(source.to(tensor.dtype), tensor):
            mismatched.append(name)
    for site in conversion.selected_sites:
        weights = site.dense_weights(dense)
        experts = model.get_submodule(site.path).experts
        for field in ("w_in", "w_out", "w_gate", "b_in", "b_out", "b_gate"):
            reference = getattr(weights, field)
            if reference is None:
                continue
            actual = getattr(experts, field)
            if not all(torch.equal(actual[e], reference.to(actual.dtype))
                       for e in range(actual.shape[0])):
                mismatched.append(f"{site.path}.experts.{field}")
    if mismatched:
        return Check("upcycled weights", "fail",
                     f"{len(mismatched)} tensors differ from the source, first {mismatched[0]}")
    return Check("upcycled weights", "pass",
                 f"non-expert weights equal the source; {len(conversion.selected)} sites x "
                 f"{config.num_experts} experts equal their dense FFN")


@contextlib.contextmanager
def _float32_eval(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` cast to float32 and in eval mode inside the block; afterwards exactly as
    it was: every module holds its own parameter and buffer tensors again (dtype, device
    and values untouched, gradients included; the float32 copies are dropped) and its own
    train/eval flag (modes may differ between modules)."""
    modules = list(model.modules())
    modes = [m.training for m in modules]
    parameters = [(m, dict(m._parameters)) for m in modules]
    # a cast replaces the .data of a parameter and of its gradient in place: keep both
    tensors = [(p, p.data, p.grad, None if p.grad is None else p.grad.data)
               for _, owned in parameters for p in owned.values() if p is not None]
    buffers = [(m, dict(m._buffers)) for m in modules]
    try:
        yield model.float().eval()
    finally:
        for m, owned in parameters:  # the same Parameter objects, should a cast replace them
            m._parameters.update(owned)
        for p, data, grad, grad_data in tensors:
            p.data = data
            if grad is not None:
                grad.data = grad_data
            p.grad = grad
        for m, owned in buffers:
            m._buffers.update(owned)
        for m, mode in zip(modules, modes):
            m.training = mode


def check_dense_identity(model: nn.Module, dense: nn.Module, seq_len: int | None) -> Check:
    """Run ``model`` in float32 with room for every token and the normalized gate, and
    compare with ``dense``; ``model`` is left as it came (dtype, device, modes, configs)."""
    layers = [layer for _, layer in switch_layers(model)]
    saved = [(layer.config, layer.tokens_per_group, layer.last_routing) for layer in layers]
    try:
        inputs = _inputs(dense, seq_len)
        reference = _outputs(dense, inputs)
        for layer in layers:
            E = layer.config.num_experts
            layer.config = layer.config.replace(
                gate="normalized", capacity_factor=float(E), eval_capacity_factor=float(E),
                group_size=None,
            )
            layer.set_tokens_per_group(layer.tokens_per_group)
        with _float32_eval(model):
            converted = _outputs(model, inputs)
    except MoEError as error:
        return Check("dense identity", "skip", str(error))
    finally:
        for layer, (config, tokens, routing) in zip(layers, saved):
            layer.config = config
            layer.set_tokens_per_group(tokens)
            layer.last_routing = routing
    diff = (converted - reference).abs().max().item()
    passed = math.isfinite(diff) and diff <= IDENTITY_TOLERANCE
    return Check("dense identity", "pass" if passed else "fail",
                 f"normalized gate, no drops: max |moe - dense| = {diff:.3g} "
                 f"(tolerance {IDENTITY_TOLERANCE:g})")


def verify(path: str | Path) -> list[Check]:
    """Every check that applies to the checkpoint at ``path`` (see the module docs)."""
    path = Path(path)
    meta = read_meta(path)
    reload, model = check_reload(path)
    checks = [reload]
    if model is None:
        return checks
    try:
        dense = _source_model(meta)
    except MoEError as error:
        dense, why = None, str(error)
    else:
        kind = "none recorded" if meta.source is None else meta.source.kind
        why = f"source ({kind}) has no weights to compare"
    if dense is None:
        checks += [Check("upcycled weights", "skip", why), Check("dense identity", "skip", why)]
    else:
        checks += [check_upcycled_weights(model, dense),
                   check_dense_identity(model, dense, meta.seq_len)]
    onnx_files = sorted(path.glob("*.onnx"))
    checks.append(Check("onnx parity", "skip", "no ONNX file in the checkpoint"
                        if not onnx_files else "ONNX checks are not available yet"))
    return checks


def checks_to_dict(checks: list[Check]) -> list[dict[str, str]]:
    return [asdict(c) for c in checks]
