"""Distillation back to dense (Switch Transformer §5.1): a dense student from a Switch model.

`distill(moe_model)` builds a dense model with the teacher's architecture before
conversion and initializes it from the teacher: every weight outside the converted
FFNs is copied, and each converted FFN gets one FFN made from its experts by a rule:

- ``"mean"`` (default): the plain mean of the E experts' weights and biases;
- ``"usage"``: the mean weighted by how many tokens each expert processed in the
  teacher's latest forward (`moeify.routing_stats`): run the teacher on representative
  data first. Experts the router ignores then contribute nothing.

An upcycled teacher whose experts are still exact copies gives back the original dense
FFN under either rule. Granular experts (``MoEConfig.granularity``) merge per copy: each
copy's G slices joined back into one FFN, then the copies merged by the rule (a copy's
usage is its slices' total).

Shared experts (``MoEConfig.shared_experts`` N) hold N / G whole FFNs of the dense width
(shared expert j is slice ``j % G``), which always contribute: the layer computes
``r * sum_c w_c FFN_c(x) + g * sum_u FFN_u(x)`` over the routed copies c (rule weights
``w_c``, summing to 1; ``r`` the ``routed_scaling``) and the shared FFNs u, ``g`` the
shared gate (1 without one; with one, ``sigmoid(0) = 1/2``, its value at init: a dense
FFN cannot hold an input-dependent gate, so a trained gate is approximated by it). The
student's FFN takes the input projections as the mean of all those FFNs weighted by
their coefficients ``a`` (``r w_c`` and ``g``), and the output projection as their
``a``-weighted sum, so equal FFNs give back their function exactly. `distillation_loss` mixes the hard-label loss and the soft
teacher loss with the paper's best setting as default: weight 0.75 on the ground-truth
labels and 0.25 on the teacher's probabilities.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeify.compiler.plan import plan_of
from moeify.errors import MoEError, Param
from moeify.switch import switch_layers

Rule = Literal["mean", "usage"]
RULES: tuple[Rule, ...] = ("mean", "usage")
RULE = Param("rule")  # ``rule='usage'`` in Python, ``--rule usage`` on the command line


def _dense_architecture(moe_model: nn.Module, dense: nn.Module | None) -> nn.Module:
    if dense is not None:
        return copy.deepcopy(dense)
    config = getattr(moe_model, "config", None)
    if config is None:
        raise MoEError("distill needs the dense architecture of a non-transformers model: "
                       "pass dense=<a dense model of that architecture>")
    device = next(moe_model.parameters()).device
    with torch.device(device):
        return type(moe_model)(copy.deepcopy(config))  # a transformers model: dense again


def _expert_weights(layer, rule: Rule) -> Tensor:
    E = layer.config.num_experts
    if rule == "mean":
        return torch.full((E,), 1.0 / E)
    record = layer.last_routing  # rule "usage"
    if record is None:
        raise MoEError("{usage} weighs experts by the tokens they processed: run the teacher's "
                       "forward on representative data first", usage=RULE.given("usage"))
    counts = record.tokens_per_expert.double()
    if counts.sum() == 0:
        raise MoEError("the teacher's latest forward routed no tokens: run it on data")
    return (counts / counts.sum()).float()


def _whole_copies(name: str, experts: Tensor, granularity: int) -> Tensor:
    """Granular experts (slice ``e % G`` of copy ``e // G``) as whole FFNs, one per copy:
    the G slices joined along the hidden axis, ``w_out`` divided by G (each slice's
    combine weight is 1/G when a token reaches its whole copy), ``b_out`` averaged over
    the slices. ``granularity`` 1: the experts as they are."""
    if granularity == 1:
        return experts
    G = granularity
    slices = experts.unflatten(0, (-1, G))  # [copies, G, ...]
    if name == "b_out":
        return slices.mean(1)
    if name in ("w_in", "w_gate"):  # [copies, G, d, f/G] -> [copies, d, f]
        return slices.permute(0, 2, 1, 3).flatten(2)
    joined = slices.flatten(1, 2)  # w_out [copies, f, d]; b_in / b_gate [copies, f]
    return joined / G if name == "w_out" else joined


def _dense_units(layer, rule: Rule) -> tuple[Tensor, dict[str, Tensor]]:
    """The whole FFNs of dense width a Switch layer sums, and their coefficients (see
    the module docs): the routed copies (``rule``'s weights times ``routed_scaling``),
    then the shared experts' N / G copies (the gate's value at init, 1/2, or 1).
    Returns ``[U]`` coefficients and each tensor name's ``[U, ...]`` stack; ``b_out``
    is one row per unit, the shared FFN's bias on its first unit."""
    config = layer.config
    G = config.granularity
    weights = _expert_weights(layer, rule).to(layer.experts.w_in.device)
    if G > 1:  # one weight per copy: the sum over its G slices
        weights = weights.view(-1, G).sum(1)
    coefficients = [weights * config.routed_scaling]
    ffns = {name: [_whole_copies(name, tensor, G)]
            for name, tensor in layer.experts.named_parameters(recurse=False)}
    shared = getattr(layer, "shared_experts", None)
    if shared is not None:
        units = config.shared_experts // G  # whole FFNs: N slices j % G, G at a time
        gate = 1.0 if shared.gate is None else 0.5  # sigmoid(0): the gate at init
        coefficients.append(torch.full((units,), gate, device=weights.device))
        for name, tensor in shared.ffn.named_parameters(recurse=False):
            tensor = tensor[0]  # the one shared FFN: [d, N f], [N f, d], [N f] or [d]
            if name in ("w_in", "w_gate"):
                unit = tensor.unflatten(1, (units, -1)).transpose(0, 1)  # [units, d, f]
            elif name == "b_out":  # added once: on the first unit, zeros on the others
                unit = torch.cat([tensor[None], tensor.new_zeros(units - 1, *tensor.shape)])
                unit = unit / gate  # the coefficient multiplies it back
            else:  # w_out [N f, d] -> [units, f, d]; b_in / b_gate [N f] -> [units, f]
                unit = tensor.unflatten(0, (units, -1))
            ffns[name].append(unit)
    return torch.cat(coefficients), {name: torch.cat(parts) for name, parts in ffns.items()}


@torch.no_grad()
def distill(moe_model: nn.Module, *, dense: nn.Module | None = None,
            rule: Rule = "mean") -> nn.Module:
    """A dense student initialized from ``moe_model`` (see the module docs).

    ``dense``: a dense model of the teacher's architecture (needed for models that are
    not transformers models; its weights are not used). Returns the student in the
    teacher's dtype and train/eval mode.
    """
    if rule not in RULES:
        raise MoEError("{rule!r} is not one of {rules}", rule=RULE.given(rule),
                       rules=", ".join(RULES))
    conversion = plan_of(moe_model)
    if conversion is None:
        raise MoEError("distill takes a converted model (moeify.convert or moeify.load)")
    layers = dict(switch_layers(moe_model))
    student = _dense_architecture(moe_model, dense)
    teacher_state = moe_model.state_dict()
    student_state = student.state_dict()
    ffn_params: set[str] = set()
    for site in conversion.selected_sites:
        layer = layers.get(site.path)
        if layer is None:
            raise MoEError(f"{site.path} is not a Switch layer in this model")
        coefficients, ffns = _dense_units(layer, rule)
        modules = dict(student.named_modules())
        projections = {"in": site.up, "out": site.down, "gate": site.gate}
        for kind, proj in projections.items():
            if proj is None:
                continue
            module = modules[proj.path]
            w = ffns[f"w_{kind}"]  # [units, in, out]
            merged = torch.einsum("u,uio->io", coefficients.to(w.dtype), w)
            if kind != "out":  # input projections: the coefficient-weighted mean
                merged = merged / coefficients.sum().to(w.dtype)
            target = merged.T if proj.kind.value == "linear" else merged
            module.weight.copy_(target.to(module.weight.dtype))
            ffn_params.add(f"{proj.path}.weight")
            b = ffns.get(f"b_{kind}")
            if b is not None and getattr(module, "bias", None) is not None:
                merged_b = coefficients.to(b.dtype) @ b
                if kind != "out":
                    merged_b = merged_b / coefficients.sum().to(b.dtype)
                module.bias.copy_(merged_b.to(module.bias.dtype))
                ffn_params.add(f"{proj.path}.bias")
    missing = []
    for name, value in student_state.items():
        if name in ffn_params:
            continue
        if name not in teacher_state or teacher_state[name].shape != value.shape:
            missing.append(name)
            continue
        value.copy_(teacher_state[name].to(value.dtype))
    if missing:
        raise MoEError(f"the student's {missing[0]} (and {len(missing) - 1} more) has no "
                       "counterpart in the teacher: is `dense` the right architecture?")
    dtype = next(moe_model.parameters()).dtype
    return student.to(dtype).train(moe_model.training)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    hard_weight: float = 0.75,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """``hard_weight * CE(student, labels) + (1 - hard_weight) * CE(student, teacher)``.

    The soft term is the cross-entropy of the student against the teacher's
    probabilities (at ``temperature``, scaled by T^2 as usual); positions whose label is
    ``ignore_index`` are left out of both terms. Logits: [..., V]; labels: [...].
    Default 0.75 on the labels and 0.25 on the teacher: the Switch Transformer paper's
    best mix (its Table 6).
    """
    if not 0.0 <= hard_weight <= 1.0:
        raise MoEError(f"hard_weight must be within [0, 1], got {hard_weight}")
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab).float()
    t = teacher_logits.reshape(-1, vocab).float().detach()
    y = labels.reshape(-1)
    keep = y != ignore_index
    hard = F.cross_entropy(s[keep], y[keep])
    soft_targets = F.softmax(t[keep] / temperature, dim=-1)
    soft = -(soft_targets * F.log_softmax(s[keep] / temperature, dim=-1)).sum(-1).mean()
    return hard_weight * hard + (1.0 - hard_weight) * soft * temperature**2
