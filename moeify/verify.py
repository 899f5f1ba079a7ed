"""`verify(path)`: run the verification contract's checks that apply to a checkpoint.

| check | what it proves |
| --- | --- |
| integrity | always runs: every tensor's bytes in the shards hash to the sha256 digest recorded when they were written (a flipped bit fails) |
| reload | the checkpoint rebuilds and loads (no parameter holds NaN / inf); saved again and reloaded, it gives bitwise the same outputs |
| upcycled weights | (source available, ``init=copy``, no noise) every non-expert weight equals the source's and every expert equals the source FFN (or its slice), output projections scaled as upcycling scales them; shared experts are N / G copies of it |
| dense identity | (source available, experts that start as the dense FFN: ``init=copy`` without noise) with the normalized gate and room for every token, the converted model reproduces the source model's outputs, computed in float32; other inits (``drop``, ``random``, ``partition``, noise) change the function by design and say so |
| dense identity (bfloat16 / float16) | (half-precision checkpoints, source available) the same, each model computed in the checkpoint's own dtype |
| onnx parity | (an ``.onnx`` file in the checkpoint, ``DIR.onnx`` beside it, or ``onnx=``) ONNX Runtime's outputs equal the PyTorch model's on the graph's declared sequence length |

The source is what the checkpoint records (`moeify.io.sources.Source`): a local directory
by its absolute path, a hub id, a preset or a factory built with fresh weights (rebuilt
here with the conversion's seed), a factory. Its weights are used only if their
fingerprint equals the one recorded at conversion; otherwise (source missing, changed
since conversion, no weights recorded) the checks that need it are skipped and say why.

Each check returns a `Check` (name, pass / fail / skip, detail); the CLI prints a table
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

from moeify.compiler.plan import plan_of
from moeify.compiler.trace import default_example_inputs
from moeify.config import Init, RouterKind
from moeify.errors import MoEError
from moeify.io.checkpoint import CheckpointMeta, load, read_meta, save
from moeify.io.shards import read_index, stored_digest, stored_entries
from moeify.io.sources import load_source
from moeify.switch import switch_layers
from moeify.switch.experts import HIDDEN_AXIS, granular_slices
from moeify.switch.upcycle import routed_output_scale, shared_output_scale

# Tolerances follow the dtype of the arithmetic compared and the scale of the output:
#     tolerance = ULPS * eps(dtype) * max(1, max |reference output|)
# eps(dtype) is the relative spacing of the dtype's numbers (float32 2**-23, bfloat16
# 2**-7, float16 2**-10): two computations of the same function that differ only in the
# order of their roundings (a batched expert matmul against the dense linear, a sum over
# different groupings) differ by a few eps relative to the magnitudes involved, which
# the largest output bounds (outputs below 1 still carry errors of intermediate values
# of order 1, hence the max with 1). The dense identity runs in float32 on the
# checkpoint's own weights (both models hold the same rounded values), so float32's eps
# applies to checkpoints of any dtype; the half-precision row runs both models in the
# checkpoint's dtype, where every layer's rounding is that dtype's. ULPS is headroom for
# the error growing through the layers: measured differences stay below ~8 eps (float32)
# and ~2 eps (bf16, fp16) times the scale on the models in the tests and on t5-small,
# gpt2 and bert-base presets, while a changed expert moves outputs by far more.
IDENTITY_ULPS = {torch.float32: 64.0, torch.bfloat16: 8.0, torch.float16: 8.0}
ONNX_TOLERANCE = 1e-4  # ONNX Runtime against PyTorch, float32 graphs, times max(1, scale)
HALF = (torch.bfloat16, torch.float16)


def identity_tolerance(dtype: torch.dtype, scale: float) -> float:
    """The largest max-abs difference accepted between two computations of the same
    function in ``dtype`` whose outputs reach ``scale`` (see `IDENTITY_ULPS`)."""
    return IDENTITY_ULPS.get(dtype, 64.0) * torch.finfo(dtype).eps * max(1.0, scale)


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "pass", "fail" or "skip"
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "fail"


Inputs = tuple[tuple, dict[str, Any]]


def _outputs(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    args, kwargs = inputs
    with torch.no_grad():
        out = model(*args, **kwargs)
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise MoEError(f"cannot find a tensor output in {type(out).__name__}")


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _inputs(model: nn.Module, seq_len: int | None) -> Inputs:
    """Inputs of ``seq_len`` tokens (batch 2): a transformers model's own dummy inputs
    with random ids, or, for a module with a ``d_model`` attribute (a factory model),
    one random float32 ``[2, seq_len, d_model]`` tensor, as `moeify.export_onnx` feeds
    it (`_as_dtype` casts it for a model in another dtype)."""
    example = default_example_inputs(model)
    if example is None:
        d = getattr(model, "d_model", None)  # the model's own (a Switch layer's is not it)
        if not isinstance(d, int):
            raise MoEError("the model makes no example inputs of its own (not a transformers "
                           "model, no d_model attribute)")
        generator = torch.Generator().manual_seed(0)
        return (torch.randn(2, seq_len or 8, d, generator=generator),), {}
    _, kwargs = example
    if seq_len is not None:  # a declared length: feed exactly that many tokens
        generator = torch.Generator().manual_seed(0)
        vocab = getattr(model.config, "vocab_size", 100)
        for key in ("input_ids", "decoder_input_ids"):
            if key in kwargs:
                kwargs[key] = torch.randint(2, vocab, (2, seq_len), generator=generator)
        kwargs = {k: v for k, v in kwargs.items() if not k.endswith("attention_mask")}
    return (), kwargs


def _as_dtype(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """Floating inputs (a factory model's ``[B, T, d]``) cast to the model's dtype."""
    args, kwargs = inputs
    cast = lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


# --- integrity -----------------------------------------------------------------------------


def check_integrity(path: Path, meta: CheckpointMeta) -> Check:
    """Hash every tensor's bytes straight from the shard files and compare with the
    digests recorded when the checkpoint was written."""
    index = read_index(path)
    tensors = stored_entries(index)
    unrecorded = [n for n in tensors if n not in meta.digests]
    absent = [n for n in meta.digests if n not in tensors]
    if absent:
        return Check("integrity", "fail", f"{len(absent)} tensors with a recorded digest are "
                     f"not in the index, first {absent[0]}")
    headers: dict[str, tuple[int, dict[str, Any]]] = {}
    mismatched: list[tuple[str, str]] = []
    total = 0
    for name, entries in tensors.items():
        if name not in meta.digests:
            continue
        try:
            digest, read = stored_digest(path, entries, headers)
        except MoEError as error:
            return Check("integrity", "fail", f"{error} at tensor {name}")
        total += read
        if digest != meta.digests[name]:
            mismatched.append((name, ", ".join(sorted({file for file, _ in entries}))))
    if mismatched:
        name, files = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        return Check("integrity", "fail", f"tensor {name} in shard {files} does not match its "
                     f"recorded sha256 digest{more}: the file changed after it was written")
    if unrecorded:
        return Check("integrity", "fail", f"{len(unrecorded)} tensors have no recorded digest, "
                     f"first {unrecorded[0]}")
    shards = len(set(index["weight_map"].values()))
    return Check("integrity", "pass", f"{len(tensors)} tensors in {shards} shards match their "
                 f"recorded sha256 digests ({total:,} bytes read)")


# --- reload --------------------------------------------------------------------------------


def check_reload(path: Path) -> tuple[Check, nn.Module | None]:
    """Load (digests are the integrity check's: not checked twice), then save again,
    reload and compare outputs bitwise."""
    try:
        model = load(path, check_digests=False)
    except MoEError as error:
        return Check("reload", "fail", str(error)), None
    meta = read_meta(path)
    try:
        inputs = _as_dtype(_inputs(model, meta.seq_len), _weights_dtype(model))
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


# --- the source ----------------------------------------------------------------------------


def _weights_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the converted model's expert weights (the conversion's ``--dtype``)."""
    for _, layer in switch_layers(model):
        return layer.experts.w_in.dtype
    return _float_dtype(model)


def source_model(meta: CheckpointMeta, model: nn.Module) -> tuple[nn.Module | None, str]:
    """The dense model the checkpoint was converted from, in eval mode, with a note on how
    it was found; or None and the reason it is not available.

    Loaded in the dtype the conversion loaded it in (so it holds the same rounded
    weights as the checkpoint), and accepted only if its fingerprint equals the recorded
    one. Fresh weights (``--random-init``) and factories are built again after seeding
    with the conversion's seed, as ``moeify convert`` did."""
    source = meta.source
    if source is None:
        return None, ("the checkpoint records no source (saved by moeify.save without one): "
                      "no dense weights to compare with")
    if source.kind == "hf":
        return None, (f"the checkpoint records the architecture only ({source.model_class}, "
                      "saved by moeify.save from Python), not where its weights came from: "
                      "no dense weights to compare with")
    ref, notes = source.ref, []
    if source.kind == "hf-dir":
        directory = Path(ref)
        if not directory.is_absolute():
            notes.append(f"source recorded as the relative path {ref!r}, taken from the "
                         "current directory")
        if not directory.is_dir():
            return None, f"the source directory {ref} does not exist (any more)"
    dtype = getattr(torch, source.dtype, None) if isinstance(source.dtype, str) else None
    if not isinstance(dtype, torch.dtype):  # not recorded: the checkpoint's expert dtype
        dtype = _weights_dtype(model)
    seed = meta.config.seed
    rebuilt = source.random_init or source.kind == "factory"
    with torch.random.fork_rng(devices=[]):
        if rebuilt:
            torch.manual_seed(seed)
        try:
            dense, found = load_source(ref, random_init=source.random_init, dtype=dtype)
        except MoEError as error:
            return None, f"cannot load the source {ref}: {error}"
    if source.weights is None:
        notes.append("no source fingerprint recorded: not proven to be the weights converted")
    elif found.weights != source.weights:
        if source.random_init:
            return None, (f"{ref} built again with fresh weights (seed {seed}) differs from "
                          "the weights converted (fingerprint differs: another torch or "
                          "transformers version?)")
        if source.kind == "factory":
            return None, (f"calling {ref} again (seed {seed}) builds other weights than at "
                          "conversion (fingerprint differs)")
        return None, f"the source {ref} changed since conversion (weights fingerprint differs)"
    else:
        notes.append("fresh weights rebuilt with the conversion's seed, " if rebuilt else "")
        notes[-1] += "source fingerprint matches"
    return dense.eval(), "; ".join(n for n in notes if n)


def check_upcycled_weights(model: nn.Module, dense: nn.Module) -> Check:
    """Every non-expert weight equals the source's; every routed expert equals its dense
    FFN (or slice) with its output projection scaled as the upcycling scales it
    (`moeify.switch.upcycle.routed_output_scale`), and the shared experts are N / G
    copies of it side by side (`moeify.switch.upcycle.shared_expert_tensors`)."""
    conversion = plan_of(model)
    config = conversion.config
    if not config.starts_dense:
        return Check("upcycled weights", "skip", f"init={config.init.value}, noise={config.noise}")
    dense_state = dense.state_dict()
    layers = {site.path + "." for site in conversion.selected_sites}
    replaced = {p for site in conversion.selected_sites for p in site.replace}
    mismatched = []
    for name, tensor in model.state_dict().items():
        if ".experts." in name or ".router." in name or name.startswith(tuple(layers)):
            continue
        if any(name.startswith(p + ".") for p in replaced):
            continue
        source = dense_state.get(name)
        if source is None or not torch.equal(source.to(tensor.dtype), tensor):
            mismatched.append(name)
    scale = routed_output_scale(config)
    for site in conversion.selected_sites:
        weights = site.dense_weights(dense)
        layer = model.get_submodule(site.path)
        for field in ("w_in", "w_out", "w_gate", "b_in", "b_out", "b_gate"):
            reference = getattr(weights, field)
            if reference is None:
                continue
            actual = getattr(layer.experts, field)
            reference = reference.to(actual.dtype)
            if config.granularity > 1:  # slice e % G, w_out times G: the init's own product
                expected = granular_slices(field, reference, config.num_experts,
                                           config.granularity)
            else:
                expected = reference.unsqueeze(0).expand_as(actual)
            if field in ("w_out", "b_out") and scale != 1:
                expected = expected * scale
            if not torch.equal(actual, expected):
                mismatched.append(f"{site.path}.experts.{field}")
            if layer.shared_experts is not None:
                shared = getattr(layer.shared_experts.ffn, field)[0]
                if not _copies_of(field, shared, reference, config):
                    mismatched.append(f"{site.path}.shared_experts.ffn.{field}")
        gate = None if layer.shared_experts is None else layer.shared_experts.gate
        if gate is not None and bool(gate.weight.any()):
            mismatched.append(f"{site.path}.shared_experts.gate.weight")
    if mismatched:
        return Check("upcycled weights", "fail",
                     f"{len(mismatched)} tensors differ from the source, first {mismatched[0]}")
    what = (f"slices of their dense FFN (granularity {config.granularity})"
            if config.granularity > 1 else "their dense FFN")
    if scale != 1:
        what += f" (output projections x {scale:.6g})"
    N, G = config.shared_experts, config.granularity
    if N:
        what += (f"; shared experts ({N}): {N // G} cop{'ies' if N // G > 1 else 'y'} of "
                 f"it, output projections x {shared_output_scale(config):.6g}"
                 + ", gate row 0" * config.shared_gate)
    return Check("upcycled weights", "pass",
                 f"non-expert weights equal the source; {len(conversion.selected)} sites x "
                 f"{config.num_experts} experts equal {what}")


def _copies_of(field: str, shared: torch.Tensor, dense: torch.Tensor, config) -> bool:
    """Whether the shared experts' tensor ``field`` (its one-expert axis indexed away) is
    N / G copies of the dense FFN's side by side along the hidden axis, ``w_out`` times
    `shared_output_scale` and ``b_out`` times that and N / G (the upcycling's rule)."""
    copies, scale = config.shared_experts // config.granularity, shared_output_scale(config)
    if field == "b_out":
        return torch.equal(shared, dense * (scale * copies))
    if field == "w_out":
        dense = dense * scale
    return all(torch.equal(part, dense)
               for part in shared.chunk(copies, dim=HIDDEN_AXIS[field]))


# --- dense identity ------------------------------------------------------------------------


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


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block, every module's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model.eval()
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def _room_for_every_token(model: nn.Module) -> Iterator[None]:
    """Every Switch layer with the normalized gate and capacity for every token (an
    upcycled model then computes the dense function); restored afterwards. An
    expert-choice layer keeps its softmax gate: with room for every token each expert
    takes all of them, and a token's scores over the experts sum to 1."""
    layers = [layer for _, layer in switch_layers(model)]
    saved = [(layer.config, layer.tokens_per_group, layer.last_routing) for layer in layers]
    try:
        for layer in layers:
            E = layer.config.num_experts
            gate = {} if layer.config.router == RouterKind.EXPERT_CHOICE else {"gate": "normalized"}
            layer.config = layer.config.replace(
                capacity_factor=float(E), eval_capacity_factor=float(E), group_size=None, **gate,
            )
            layer.set_tokens_per_group(layer.tokens_per_group)
        yield
    finally:
        for layer, (config, tokens, routing) in zip(layers, saved):
            layer.config = config
            layer.set_tokens_per_group(tokens)
            layer.last_routing = routing


def _compare(name: str, converted: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype,
             how: str) -> Check:
    diff = (converted.float() - reference.float()).abs().max().item()
    scale = reference.float().abs().max().item()
    tolerance = identity_tolerance(dtype, scale)
    passed = math.isfinite(diff) and diff <= tolerance
    dtype_name = str(dtype).removeprefix("torch.")
    return Check(name, "pass" if passed else "fail",
                 f"{how}: max |moe - dense| = {diff:.3g} (tolerance {tolerance:.3g} = "
                 f"{IDENTITY_ULPS.get(dtype, 64.0):g} eps({dtype_name}) x max(1, max|dense| "
                 f"{scale:.3g}))")


def _not_the_dense_function(model: nn.Module) -> str | None:
    """Why ``model``'s experts do not start as its dense FFN (no identity to check), or
    None when they do."""
    config = plan_of(model).config
    if config.starts_dense:
        return None
    how = {Init.COPY: f"noise={config.noise:g} perturbs every copied expert",
           Init.DROP: f"init=drop re-initializes {config.drop_ratio:g} of every expert's "
                      "hidden neurons",
           Init.RANDOM: "init=random draws fresh experts",
           Init.PARTITION: "init=partition gives each expert a slice of the hidden neurons"}
    return f"{how[config.init]}: the converted model is not the dense one by design"


def check_dense_identity(model: nn.Module, dense: nn.Module, seq_len: int | None) -> Check:
    """Run ``model`` and ``dense`` in float32, the former with room for every token and
    the normalized gate, and compare; both are left as they came (dtype, device, modes,
    configs). ``dense`` should hold the checkpoint's rounded weights (`source_model`
    loads it so): the tolerance is float32's."""
    if (why := _not_the_dense_function(model)) is not None:
        return Check("dense identity", "skip", why)
    try:
        inputs = _inputs(dense, seq_len)
        with _float32_eval(dense):
            reference = _outputs(dense, inputs)
        with _room_for_every_token(model), _float32_eval(model):
            converted = _outputs(model, inputs)
    except MoEError as error:
        return Check("dense identity", "skip", str(error))
    dtype = _weights_dtype(model)
    weights = str(dtype).removeprefix("torch.")
    how = f"normalized gate, no drops, float32 on the {weights} weights"
    if dtype != torch.float32 and (factor := _inexact_scale(plan_of(model).config)):
        # the scaled projections were rounded to the weights' dtype: the two models no
        # longer hold the same rounded values, and the weights' eps bounds the difference
        how += f" (output projections x {factor:.6g}, rounded in {weights})"
        return _compare("dense identity", converted, reference, dtype, how)
    return _compare("dense identity", converted, reference, torch.float32, how)


def _inexact_scale(config) -> float | None:
    """A factor the upcycling multiplies output projections by that is not a power of two
    (its products round in the weights' dtype), or None when every one is exact."""
    factors = [config.granularity, routed_output_scale(config)]
    if config.shared_experts:
        factors += [shared_output_scale(config),
                    shared_output_scale(config) * (config.shared_experts // config.granularity)]
    return next((f for f in factors if math.frexp(f)[0] != 0.5), None)


def check_native_identity(model: nn.Module, dense: nn.Module, seq_len: int | None) -> Check:
    """The dense identity with both models computed in the checkpoint's half dtype (the
    converted model as loaded, its routers float32): the path half-precision users run."""
    dtype = _weights_dtype(model)
    name = f"dense identity ({str(dtype).removeprefix('torch.')})"
    if (why := _not_the_dense_function(model)) is not None:
        return Check(name, "skip", why)
    try:
        inputs = _as_dtype(_inputs(dense, seq_len), dtype)
        with _eval(dense):
            reference = _outputs(dense, inputs)
        with _room_for_every_token(model), _eval(model):
            converted = _outputs(model, inputs)
    except MoEError as error:
        return Check(name, "skip", str(error))
    return _compare(name, converted, reference, dtype,
                    f"normalized gate, no drops, both models in {str(dtype).removeprefix('torch.')}")


# --- ONNX ----------------------------------------------------------------------------------


def onnx_files(path: Path) -> list[Path]:
    """The graphs that belong to a checkpoint: ``*.onnx`` inside it, ``DIR.onnx`` beside."""
    beside = path.with_name(path.name + ".onnx")
    return sorted(path.glob("*.onnx")) + ([beside] if beside.is_file() else [])


def check_onnx_parity(model: nn.Module, graph: Path) -> Check:
    """Run ``graph`` in ONNX Runtime and the PyTorch ``model`` (eval mode; in float32 when
    the graph is float32, as half-precision checkpoints export) on the same random
    inputs of the graph's declared sequence length, and compare."""
    import numpy as np

    from moeify.onnx import OnnxRunner
    from moeify.onnx.export import _wrap

    name = "onnx parity"
    try:
        runner = OnnxRunner(graph)
    except Exception as error:  # noqa: BLE001 - onnx / onnxruntime raise several kinds
        return Check(name, "fail", f"{graph} cannot be loaded by ONNX Runtime: "
                     f"{str(error).splitlines()[0] if str(error) else type(error).__name__}")
    seq_len = runner.seq_len
    if seq_len is None:
        return Check(name, "skip", f"{graph} declares no sequence length (not exported by "
                     "moeify): nothing to compare it with")
    batch = runner.metadata.get("batch_size", "dynamic")
    batch = int(batch) if batch.isdigit() else 2
    wrapper = _wrap(model)
    if list(wrapper.inputs) != list(runner.inputs):
        return Check(name, "fail", f"{graph} takes inputs {runner.inputs}, the model "
                     f"{list(wrapper.inputs)}: exported from another model?")
    generator = torch.Generator().manual_seed(0)
    vocab = getattr(getattr(model, "config", None), "vocab_size", 100)
    feeds: dict[str, torch.Tensor] = {}
    for input_name, spec in zip(runner.inputs, runner.session.get_inputs()):
        if input_name == "attention_mask":
            feeds[input_name] = torch.ones(batch, seq_len, dtype=torch.long)
        elif input_name == "input":
            feeds[input_name] = torch.randn(batch, seq_len, int(spec.shape[-1]),
                                            generator=generator)
        else:
            feeds[input_name] = torch.randint(2, vocab, (batch, seq_len), generator=generator)
    try:
        got = np.asarray(runner.run(**feeds))
    except Exception as error:  # noqa: BLE001 - ONNX Runtime errors
        return Check(name, "fail", f"ONNX Runtime failed on {graph}: "
                     f"{str(error).splitlines()[0] if str(error) else type(error).__name__}")
    layers = [layer for _, layer in switch_layers(model)]
    saved = [layer.tokens_per_group for layer in layers]
    float32 = got.dtype == np.float32
    try:
        for layer in layers:  # capacity declared for the graph's length, as export does
            if layer.config.group_size is None:
                layer.set_tokens_per_group(seq_len)
        context = _float32_eval(model) if float32 else _eval(model)
        with context, torch.no_grad():
            expected = wrapper(*(feeds[n] for n in wrapper.inputs)).float().numpy()
    finally:
        for layer, tokens in zip(layers, saved):
            layer.set_tokens_per_group(tokens)
    if got.shape != expected.shape:
        return Check(name, "fail", f"{graph} gives outputs of shape {list(got.shape)}, the "
                     f"model {list(expected.shape)}")
    diff = float(np.abs(got.astype(np.float32) - expected).max())
    scale = float(np.abs(expected).max())
    tolerance = ONNX_TOLERANCE * max(1.0, scale)
    passed = math.isfinite(diff) and diff <= tolerance
    return Check(name, "pass" if passed else "fail",
                 f"{graph.name}, {batch} x {seq_len} tokens: max |onnxruntime - torch| = "
                 f"{diff:.3g} (tolerance {tolerance:.3g} = {ONNX_TOLERANCE:g} x max(1, max|out| "
                 f"{scale:.3g}))")


# --- all of them ---------------------------------------------------------------------------


def verify(path: str | Path, *, onnx: str | Path | None = None) -> list[Check]:
    """Every check that applies to the checkpoint at ``path`` (see the module docs).

    onnx: an ONNX graph exported from the checkpoint to compare; default: the graphs of
        `onnx_files`.
    """
    path = Path(path)
    meta = read_meta(path)
    checks = [check_integrity(path, meta)]
    reload, model = check_reload(path)
    checks.append(reload)
    half = model is not None and _weights_dtype(model) in HALF
    if model is None:
        why = "the checkpoint does not load (see reload)"
        checks += [Check("upcycled weights", "skip", why), Check("dense identity", "skip", why)]
        checks.append(Check("onnx parity", "skip", why))
        return checks
    dense, note = source_model(meta, model)
    if dense is None:
        checks += [Check("upcycled weights", "skip", note), Check("dense identity", "skip", note)]
        if half:
            dtype = str(_weights_dtype(model)).removeprefix("torch.")
            checks.append(Check(f"dense identity ({dtype})", "skip", note))
    else:
        weights = check_upcycled_weights(model, dense)
        if note and weights.status != "skip":
            weights = Check(weights.name, weights.status, f"{weights.detail} ({note})")
        checks += [weights, check_dense_identity(model, dense, meta.seq_len)]
        if half:
            checks.append(check_native_identity(model, dense, meta.seq_len))
    graphs = [Path(onnx)] if onnx is not None else onnx_files(path)
    if onnx is not None and not graphs[0].is_file():
        checks.append(Check("onnx parity", "fail", f"no such ONNX file: {onnx}"))
    elif not graphs:
        checks.append(Check("onnx parity", "skip", f"no ONNX graph in {path} or at "
                            f"{path.name}.onnx beside it (export one with moeify export, or "
                            "pass --onnx PATH)"))
    else:
        checks += [check_onnx_parity(model, graph) for graph in graphs]
    return checks


def checks_to_dict(checks: list[Check]) -> list[dict[str, str]]:
    return [asdict(c) for c in checks]
