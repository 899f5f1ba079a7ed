"""Write a converted decoder as a Hugging Face Mixtral, Qwen2-MoE or Qwen3-MoE checkpoint.

``--format hf --hf-arch mixtral|qwen2_moe|qwen3_moe`` (``moeify.write(..., format="hf")``
in Python, `moeify.write`, which runs `save_hf_moe`) writes a directory that
``AutoModelForCausalLM.from_pretrained`` loads with no missing or unexpected keys, and
that computes what moeify's module computes in eval mode (`moeify.hf.switch_transformers` keeps T5's
``switch_transformers`` target).

The targets (transformers 5.x classes, checked against the installed source):

``mixtral`` (`MixtralForCausalLM`), from Llama or Mistral (SwiGLU FFN, bias-free
attention): every decoder layer is sparse; the router takes the softmax over all experts
in float32, the top-k (``num_experts_per_tok``), and renormalises over the k; nothing is
dropped. That is moeify's softmax gate for k >= 2 with ``dropless``, so this target needs
``top_k >= 2`` (2 when not set), ``every=1``, ``dropless`` (filled in when not set; set
otherwise, refused). Top-1 is refused: Mixtral renormalises over the top-k, so a single
expert's weight is always 1 and the router would learn from the auxiliary loss alone;
so is the raw gate. GShard's random second expert (``random_routing``) is set off unless
asked for: HF's classes keep every choice in training.

``qwen2_moe`` (`Qwen2MoeForCausalLM`), from Llama, Mistral or Qwen2, and ``qwen3_moe``
(`Qwen3MoeForCausalLM`), from Qwen3: Switch-style routing. moeify's layer choice maps onto
``decoder_sparse_step`` (``every=N`` selects layers N-1, 2N-1, ...: HF's ``(i + 1) % step
== 0``) or, for any other set, onto ``mlp_only_layers`` (the dense layers keep the
source's ``intermediate_size``); ``norm_topk_prob`` is False for raw probabilities (the
raw gate at any k, top-1 with the softmax gate) and True for weights renormalised over
the k (the softmax gate at k >= 2, the normalized gate); dropless. Fine-grained experts
(``granularity`` G) are ``moe_intermediate_size = d_ff / G`` wide. Qwen2-MoE's attention
has q/k/v biases: a Llama or Mistral source gets zeros (what mergekit writes), so the
model is the same. Qwen3-MoE's attention is Qwen3's: per-head q/k RMS norms (carried as
they are, like ``head_dim`` and ``attention_bias``), a sliding window on every layer or
none. Those norms are why each family keeps to its own: no weights make an RMS norm the
identity, so Llama/Mistral/Qwen2 -> qwen3_moe and Qwen3 -> mixtral/qwen2_moe are refused
(`misfit`) with the targets that fit. Layers left dense and the ``norm_topk_prob`` that
llama.cpp does not follow (it never renormalises Qwen2-MoE's top-k and always Qwen3-MoE's)
are valid for transformers and vLLM; llama.cpp needs a router in every layer; the notes
say so.

Settings no HF target holds are refused with one line (`check_routing`): sigmoid
``scoring`` and a ``routed_scaling`` other than 1 (these classes score with a softmax
and have no scaling factor), shared experts on any target but qwen2_moe. Training-only
settings are set off when not given and noted when given: the router z-loss, the
sequence-wise balance loss (``seq_aux_loss_coef``), Qwen's missing jitter. With
``bias_balancing`` the per-expert selection bias is not carried (no class has a field
for it): the model is written while the bias is still 0, where the routing is the same,
with a note, and refused once the bias has moved (`check_selection_bias`), since HF would
then select other experts than moeify.

Key layout: the one of the published checkpoints (Mistral AI's Mixtral, Qwen's
Qwen1.5-MoE and Qwen3-30B-A3B), which transformers 5 converts from when loading (its
``conversion_mapping``: ``.block_sparse_moe.`` -> ``.mlp.``, per-expert matrices merged
into ``experts.gate_up_proj`` / ``experts.down_proj``; qwen3_moe takes qwen2_moe's
rules) and which transformers 4.x, llama.cpp's ``convert_hf_to_gguf.py`` and vLLM's
loaders read as they are. moeify stores experts as ``x @ W``; ``M`` is
``model.layers.{i}.block_sparse_moe`` (mixtral) or ``model.layers.{i}.mlp`` (qwen2_moe,
qwen3_moe), ``j`` an expert, ``S = N * f`` the width of N shared experts::

    router.weight          [E, d]     -> M.gate.weight                            [E, d]
    experts.w_gate[j]      [d, f]     -> M.experts.{j}.w1 | gate_proj .weight     [f, d]
    experts.w_in[j]        [d, f]     -> M.experts.{j}.w3 | up_proj .weight       [f, d]
    experts.w_out[j]       [f, d]     -> M.experts.{j}.w2 | down_proj .weight     [d, f]
    qwen2_moe, shared_experts N >= 1:
    shared_experts.ffn.w_gate [1, d, S] -> M.shared_expert.gate_proj.weight       [S, d]
    shared_experts.ffn.w_in   [1, d, S] -> M.shared_expert.up_proj.weight         [S, d]
    shared_experts.ffn.w_out  [1, S, d] -> M.shared_expert.down_proj.weight       [d, S]
    shared_experts.gate.weight   [1, d] -> M.shared_expert_gate.weight            [1, d]
    qwen2_moe, no shared expert:         M.shared_expert.{gate,up}_proj.weight    [1, d] zeros
                                         M.shared_expert.down_proj.weight         [d, 1] zeros
                                         M.shared_expert_gate.weight              [1, d] ones
    qwen2_moe:                           self_attn.{q,k,v}_proj.bias zeros if absent
    everything else keeps its name (lm_head.weight left out when embeddings are tied;
    Qwen3's self_attn.{q,k}_norm.weight included)

Qwen2-MoE always adds a sigmoid-gated shared expert: ``sigmoid(x . w) * FFN(x)``, which
is moeify's gated shared experts (``shared_experts`` N >= 1 with ``shared_gate``, which
this target fills in and refuses off), written with ``shared_expert_intermediate_size =
N * f``. With no shared expert asked for it is written one unit wide with an all-zero
down projection, so its output is exactly 0: llama.cpp reads a width of 0 as "not set"
(and then expects the dense width), and computes the gate's sigmoid as ``silu(x) / x``,
which is NaN at a zero gate, hence the gate row of ones (an upcycled shared gate starts
as a row of zeros: the notes say what llama.cpp then computes).

The writer streams: converting a dense model (`moeify.write`), the plan is applied
with the Switch layers on the meta device and each layer's tensors come from
`moeify.switch.upcycled_tensors` when the writer reaches them (`moeify.io.streaming`; peak
memory: the dense model plus one layer), in the dtype asked for, into numbered
safetensors shards with the standard ``model.safetensors.index.json``, beside
``config.json`` and ``generation_config.json``, assembled atomically.

Settings that map onto the target config: ``num_experts`` (``num_local_experts`` /
``num_experts``), ``top_k`` (``num_experts_per_tok``), ``gate`` (Qwen's
``norm_topk_prob``), ``aux_loss_coef`` (``router_aux_loss_coef``), ``jitter_eps``
(Mixtral's ``router_jitter_noise``, which multiplies the whole MoE block's input, the
experts' too, where moeify jitters the router's input only; Qwen2-MoE and Qwen3-MoE have
no jitter), the expert width (``intermediate_size`` / ``moe_intermediate_size``), the
shared experts' width (``shared_expert_intermediate_size``), tied embeddings, RoPE
(``rope_parameters``) and sliding windows. ``output_router_logits`` is written ``False``
(HF's default; pass ``output_router_logits=True`` to the forward when training, which
adds the aux loss to ``loss``). What cannot map (the router z-loss, the sequence-wise
loss, the selection bias's update, expert dropout, a float64 router, GShard's random
second expert in training, source config fields the target lacks) is listed in
`HFExport.notes`, which the CLI prints.

The two load-balancing losses (both Switch eq. 4-6, ``E * sum_i f_i * P_i``):

- moeify: per Switch layer and per group (one sequence by default), ``f_i`` the fraction
  of the group's real tokens whose *top-1* choice is i; averaged over groups and layers;
  1 at perfect balance whatever k.
- HF (``load_balancing_loss_func``): the router logits of *all* layers pooled into one
  set of rows, ``f_i`` the fraction of rows' *top-k* assignments to i (so ``sum_i f_i =
  k``), ``P_i`` the mean probability over the pooled rows, padding excluded by the
  attention mask; k at perfect balance.

They agree for one layer, one group and k=1; in general HF's value is not a function of
moeify's per-layer values. `pooled_load_balancing_loss` computes HF's definition from any
router logits, e.g. moeify's own (the tests check it equals the HF model's ``aux_loss``).
The coefficient is carried as is (``router_aux_loss_coef = aux_loss_coef``): at balance
the HF term is k times moeify's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moeify.compiler.plan import expert_width as site_expert_width
from moeify.compiler.plan import plan_of
from moeify.config import Activation, Gate, MoEConfig, RouterKind, Scoring, config_param
from moeify.errors import MoEError, Param
from moeify.io.files import atomic_directory
from moeify.io.shards import DEFAULT_SHARD_BYTES, plan_shards, write_shards
from moeify.io.streaming import LayerTensors
from moeify.io.tokenizer import Tokenizer
from moeify.switch import switch_layers

SWITCH_TRANSFORMERS, MIXTRAL = "switch_transformers", "mixtral"
QWEN2_MOE, QWEN3_MOE = "qwen2_moe", "qwen3_moe"
HF_ARCHES = (SWITCH_TRANSFORMERS, MIXTRAL, QWEN2_MOE, QWEN3_MOE)
QWEN_ARCHES = (QWEN2_MOE, QWEN3_MOE)  # decoder_sparse_step / mlp_only_layers, norm_topk_prob

# what each target takes, for messages and the README's table
TARGET_SOURCES = {
    SWITCH_TRANSFORMERS: "T5 v1.0 (ReLU FFN)",
    MIXTRAL: "Llama/Mistral (SwiGLU FFN, bias-free attention)",
    QWEN2_MOE: "Llama/Mistral/Qwen2",
    QWEN3_MOE: "Qwen3",
}
_TARGET_CLASS = {MIXTRAL: "MixtralForCausalLM", QWEN2_MOE: "Qwen2MoeForCausalLM",
                 QWEN3_MOE: "Qwen3MoeForCausalLM"}
_CONFIG_CLASS = {MIXTRAL: "MixtralConfig", QWEN2_MOE: "Qwen2MoeConfig",
                 QWEN3_MOE: "Qwen3MoeConfig"}
_SOURCES = {
    MIXTRAL: ("LlamaForCausalLM", "MistralForCausalLM"),
    QWEN2_MOE: ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    QWEN3_MOE: ("Qwen3ForCausalLM",),
}
# sources whose attention normalises queries and keys per head (q_norm, k_norm): the
# targets with that norm take exactly these, the others none of them
_QK_NORM_SOURCES = _SOURCES[QWEN3_MOE]
# HF hidden_act names of each moeify activation (the experts compute act(gate) * up)
_ACTS = {
    Activation.SILU: ("silu", "swish"),
    Activation.GELU: ("gelu",),
    Activation.GELU_TANH: ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"),
    Activation.RELU: ("relu",),
}
_CAPACITY_FIELDS = ("capacity_factor", "eval_capacity_factor", "min_capacity")
# the published per-expert layout: (MoE block, gate/activated, up/linear, down) names
EXPERT_NAMES = {
    MIXTRAL: ("block_sparse_moe", "w1", "w3", "w2"),
    QWEN2_MOE: ("mlp", "gate_proj", "up_proj", "down_proj"),
    QWEN3_MOE: ("mlp", "gate_proj", "up_proj", "down_proj"),
}
# the shared expert written when none is asked for (qwen2_moe): one unit wide, see above
SHARED_WIDTH = 1
# the parameters messages name: ``hf_arch='mixtral'`` in Python (`moeify.write`), ``--hf-arch
# mixtral`` on the command line (`moeify.errors`)
ARCH, FORMAT = Param("hf_arch"), Param("format")


def _fail(reason: str, **values: Any) -> MoEError:
    """The HF format refused: ``reason`` is a message template over ``values``."""
    return MoEError("{format_hf} is not possible: " + reason, format_hf=FORMAT.given("hf"),
                    **values)


def _top1_mixtral() -> MoEError:
    return MoEError(
        "{mixtral} cannot take {top_1}: Mixtral renormalises the router's top-k probabilities, "
        "so a single expert's weight is always 1 and the router would learn from the "
        "auxiliary loss alone; use {top_2} (the default for mixtral) or more, or {qwen2_moe}, which "
        "routes top-1 with the raw router probability", mixtral=ARCH.given(MIXTRAL),
        top_1=config_param("top_k").given(1), top_2=config_param("top_k").given(2),
        qwen2_moe=ARCH.given(QWEN2_MOE))


def _expert_choice() -> MoEError:
    return _fail(
        "{router} has no HF counterpart: SwitchTransformers, Mixtral, Qwen2-MoE and "
        "Qwen3-MoE route by token choice (each token picks its experts); use {torch} or onnx",
        router=config_param("router").given(RouterKind.EXPERT_CHOICE),
        torch=FORMAT.given("torch"))


def check_routing(arch: str, c: MoEConfig) -> None:
    """Refuse (`MoEError`, one line) the settings of ``c`` that target ``arch`` cannot
    hold, whatever else it fills in: sigmoid scores and a routed scaling factor (every HF
    target scores with a softmax and has no such factor), shared experts (Qwen2-MoE's is
    the only HF class with one) and the raw gate on Mixtral (which always renormalises)."""
    torch_format = FORMAT.given("torch")
    if c.scoring != Scoring.SOFTMAX:
        raise _fail("{scoring} has no HF counterpart: SwitchTransformers, Mixtral, Qwen2-MoE "
                    "and Qwen3-MoE score the experts with a softmax over all of them; use "
                    "{softmax} or {torch}", scoring=config_param("scoring").given(c.scoring),
                    softmax=config_param("scoring").given(Scoring.SOFTMAX), torch=torch_format)
    if c.routed_scaling != 1:
        raise _fail("{routed_scaling} has no HF counterpart: SwitchTransformers, Mixtral, "
                    "Qwen2-MoE and Qwen3-MoE have no routed scaling factor; use {one} or "
                    "{torch}", routed_scaling=config_param("routed_scaling").given(
                        c.routed_scaling), one=config_param("routed_scaling").given(1.0),
                    torch=torch_format)
    if c.shared_experts and arch != QWEN2_MOE:
        raise MoEError("{arch} has no shared expert, {shared_experts} asks for some: use "
                       "{qwen2_moe} (from " + TARGET_SOURCES[QWEN2_MOE] + "; its gated shared "
                       "expert) or {torch}", arch=ARCH.given(arch),
                       shared_experts=config_param("shared_experts").given(c.shared_experts),
                       qwen2_moe=ARCH.given(QWEN2_MOE), torch=torch_format)
    if c.gate == Gate.RAW and arch == MIXTRAL:
        raise MoEError("{mixtral} cannot take {raw}: Mixtral always renormalises the router's "
                       "top-k probabilities; use {qwen2_moe} or {qwen3_moe}, which keep them "
                       "raw (norm_topk_prob=False)", mixtral=ARCH.given(MIXTRAL),
                       raw=config_param("gate").given(Gate.RAW),
                       qwen2_moe=ARCH.given(QWEN2_MOE), qwen3_moe=ARCH.given(QWEN3_MOE))


# --- which targets fit a model ---------------------------------------------------------------


def misfit(arch: str, model: nn.Module) -> str | None:
    """Why ``model`` (dense, or converted) cannot be written as ``arch``; None if it can.
    Looks at the architecture only (class and config), so it works on the meta device."""
    if arch not in HF_ARCHES:
        raise MoEError("{arch!r} is not one of {arches}", arch=ARCH.given(arch),
                       arches=", ".join(HF_ARCHES))
    name = type(model).__name__
    config = getattr(model, "config", None)
    if arch == SWITCH_TRANSFORMERS:
        if name != "T5ForConditionalGeneration":
            return f"{name} is not a T5ForConditionalGeneration"
        if config.is_gated_act or config.dense_act_fn != "relu":
            return f"the T5 uses the {config.feed_forward_proj!r} FFN, not T5 v1.0's ReLU"
        return None
    target = _TARGET_CLASS[arch]
    qk_norm = arch == QWEN3_MOE
    if qk_norm and name in _SOURCES[MIXTRAL] + _SOURCES[QWEN2_MOE]:
        return (f"{target} normalises queries and keys per head (q_norm, k_norm) and {name} "
                "does not: no weights make an RMS norm the identity")
    if not qk_norm and name in _QK_NORM_SOURCES:
        return (f"{name} normalises queries and keys per head (q_norm, k_norm), which "
                f"{target} has no place for")
    if name not in _SOURCES[arch]:
        return f"{name} is not one of {', '.join(_SOURCES[arch])}"
    if getattr(config, "mlp_bias", False):
        return "its MLP has biases (mlp_bias=True); the target's experts have none"
    if arch != QWEN3_MOE and getattr(config, "attention_bias", False):
        return (f"its attention has biases (attention_bias=True, o_proj included); "
                f"{target}'s has none")
    windowed = _windowed_layers(config)
    if arch == QWEN3_MOE and 0 < len(windowed) < config.num_hidden_layers:
        return (f"its sliding window covers layers {windowed} only (max_window_layers="
                f"{config.max_window_layers}); {target}'s covers every layer or none")
    return None


def _windowed_layers(config: Any) -> list[int]:
    """The decoder layers a Qwen2/Qwen3 ``config`` gives a sliding window (its
    ``layer_types``, with ``sliding_window`` set); [] for the other sources."""
    if getattr(config, "sliding_window", None) is None or not getattr(config, "layer_types",
                                                                       None):
        return []
    return [i for i, kind in enumerate(config.layer_types) if kind == "sliding_attention"]


def fitting_arches(model: nn.Module) -> list[str]:
    """The targets (``arch``, ``--hf-arch``) ``model``'s architecture fits."""
    return [arch for arch in HF_ARCHES if misfit(arch, model) is None]


def default_arch(model: nn.Module) -> str:
    """The target when none is given: switch_transformers for T5, mixtral for Llama and
    Mistral, qwen2_moe for Qwen2, qwen3_moe for Qwen3; a `MoEError` naming the targets
    when none fits."""
    fits = fitting_arches(model)
    if not fits:
        raise no_target(model)
    return fits[0]


def no_target(model: nn.Module, arch: str | None = None) -> MoEError:
    """The refusal of ``model``, which target ``arch`` (or, with None, no target) fits."""
    values = dict(name=type(model).__name__, format_hf=FORMAT.given("hf"),
                  torch=FORMAT.given("torch"),
                  targets="; ".join(f"{a}: {w}" for a, w in TARGET_SOURCES.items()))
    if arch is None:
        return MoEError("no {format_hf} target fits {name} ({targets}): use {torch}", **values)
    head = "{arch} does not fit {name} ({misfit})"
    values.update(arch=ARCH.given(arch), misfit=misfit(arch, model))
    fits = fitting_arches(model)
    if fits:
        return MoEError(head + "; targets that fit it: {fits}", fits=", ".join(fits), **values)
    return MoEError(head + "; no HF target fits it ({targets}): use {torch}", **values)


# --- the config a target needs ---------------------------------------------------------------


def target_config(arch: str, model: nn.Module, config: MoEConfig,
                  explicit: Iterable[str] | None = None) -> MoEConfig:
    """``config`` with the target's compatible defaults filled in, or a `MoEError`.

    explicit: the `MoEConfig` fields the user set (the CLI passes the options given on
        the command line); None counts every field that differs from its default.
    Fields the target requires are filled where not explicit and refused (one line
    listing what the target requires) where explicitly set otherwise. Also checks that
    ``model``'s architecture fits the target.
    """
    if misfit(arch, model) is not None:
        raise no_target(model, arch)
    if config.router == RouterKind.EXPERT_CHOICE:
        raise _expert_choice()
    check_routing(arch, config)
    if arch == SWITCH_TRANSFORMERS:
        return config
    if explicit is None:
        explicit = {f.name for f in dataclasses.fields(MoEConfig)
                    if getattr(config, f.name) != f.default}
    explicit = set(explicit)
    layers = model.config.num_hidden_layers
    fields: dict[str, Param] = {}  # the placeholders of the refusal below

    def field(name: str, value: Any = None) -> str:
        """A placeholder for config field ``name`` (stating ``value`` unless None)."""
        param = config_param(name)
        fields[f"field{len(fields)}"] = param if value is None else param.given(value)
        return f"{{field{len(fields) - 1}}}"

    if arch == MIXTRAL:
        if "top_k" in explicit and config.top_k == 1:
            raise _top1_mixtral()
        wanted: dict[str, Any] = {"every": 1, "dropless": True}
        if "top_k" not in explicit:
            wanted["top_k"] = 2
        required = [field("top_k") + " >= 2", field("every", 1) + " (every decoder layer)",
                    field("dropless", True)]
        all_layers = tuple(range(layers))
        if "layers" in explicit and config.layers is not None and config.layers != all_layers:
            conflicts = [field("layers", config.layers)]
        else:
            conflicts = []
            wanted["layers"] = config.layers if "layers" in explicit else None
    else:
        wanted = {"dropless": True}
        required = [field("dropless", True)]
        conflicts = []
        if config.shared_experts:  # Qwen2-MoE (the only one check_routing lets through)
            wanted["shared_gate"] = True
            required.append(field("shared_gate", True) + " (Qwen2-MoE gates its shared "
                            "expert's output by sigmoid(x . w))")
    # training-only settings a target has no place for: off unless asked for
    wanted["z_loss_coef"] = 0.0
    wanted["seq_aux_loss_coef"] = 0.0
    wanted["random_routing"] = False
    if arch in QWEN_ARCHES:
        wanted["jitter_eps"] = 0.0
    for name in ("top_k", "every", "dropless", "shared_gate"):
        if name in wanted and name in explicit and getattr(config, name) != wanted[name]:
            conflicts.append(field(name, getattr(config, name)))
    conflicts += [field(n) for n in _CAPACITY_FIELDS if n in explicit]
    if conflicts:
        required.append(f"no {'/'.join(field(n) for n in _CAPACITY_FIELDS)} (HF's MoE "
                        "classes route dropless: there is no expert capacity)")
        raise MoEError("{arch} requires " + ", ".join(required) + "; conflicting: "
                       + ", ".join(conflicts), arch=ARCH.given(arch), **fields)
    return config.replace(**{k: v for k, v in wanted.items() if k not in explicit})


# --- config and layout -----------------------------------------------------------------------


_CARRIED = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
    "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id",
    "eos_token_id", "tie_word_embeddings", "attention_dropout", "rope_parameters",
)
_WINDOW = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")
_READ = ("intermediate_size", "attention_bias", "mlp_bias", "rope_theta", "rope_scaling")


@dataclass
class Layout:
    """What a converted model becomes in the target: its config, which decoder layers are
    sparse, and the notes on what did not map."""

    arch: str
    config: Any  # the transformers config
    sparse: tuple[int, ...]
    notes: list[str] = field(default_factory=list)

    @property
    def model_class(self) -> str:
        return _TARGET_CLASS[self.arch]


def _sparse_layers(plan, arch: str, num_layers: int) -> tuple[int, ...]:
    """Decoder layer index of every selected site; each must be a whole decoder MLP."""
    c = plan.config
    found = []
    for site in plan.selected_sites:
        match = re.fullmatch(r"model\.layers\.(\d+)\.mlp", site.path)
        if match is None or site.replace != (site.path,):
            raise _fail("site {path} is not a decoder layer's whole MLP (model.layers.N.mlp)",
                        path=site.path)
        if not site.gated:
            raise _fail("site {path} is not a gated FFN (the target's experts are SwiGLU)",
                        path=site.path)
        if site.bias:
            raise _fail("site {path} has biases; the target's experts have none", path=site.path)
        found.append(int(match.group(1)))
    split = c.hidden_split
    if any(s.d_ff % split.parts for s in plan.selected_sites):
        raise _fail("{who} needs {parts} to divide the FFN width", who=split.who,
                    parts=split.parts)
    sparse = tuple(sorted(found))
    if arch == MIXTRAL and sparse != tuple(range(num_layers)):
        raise _fail("Mixtral makes every decoder layer sparse, the plan converts layers "
                    "{sparse} of {num_layers}: use {every_1}", sparse=list(sparse),
                    num_layers=num_layers, every_1=config_param("every").given(1))
    return sparse


def hf_layout(model: nn.Module, plan, arch: str, *, dtype: torch.dtype | None = None) -> Layout:
    """The target config for ``model`` (the dense source, or its converted form) converted
    by ``plan``, with the notes on everything that does not map. Raises `MoEError` when
    the conversion cannot be expressed in the target."""
    import transformers

    if arch not in _TARGET_CLASS:
        raise MoEError(f"hf_layout writes {', '.join(_TARGET_CLASS)}, not {arch!r}")
    problem = misfit(arch, model)
    if problem is not None:
        raise no_target(model, arch)
    source = model.config
    c = plan.config
    if c.router == RouterKind.EXPERT_CHOICE:
        raise _expert_choice()
    check_routing(arch, c)
    num_layers = source.num_hidden_layers
    sparse = _sparse_layers(plan, arch, num_layers)
    notes: list[str] = []
    if not c.dropless:
        raise _fail("{arch} routes dropless (no expert capacity): convert with {dropless}",
                    arch=arch, dropless=config_param("dropless").given(True))
    if c.shared_experts and not c.shared_gate:
        raise _fail("Qwen2-MoE gates its shared expert's output by sigmoid(x . w), the "
                    "model's shared experts are ungated: convert with {shared_gate}",
                    shared_gate=config_param("shared_gate").given(True))
    sites = plan.selected_sites
    activation = sites[0].activation
    if any(s.activation != activation for s in sites) or source.hidden_act not in _ACTS[activation]:
        raise _fail("the experts' activation ({activation}) is not the source's hidden_act "
                    "{hidden_act!r}", activation=activation.value, hidden_act=source.hidden_act)
    expert_width = site_expert_width(sites[0], c)
    if arch == MIXTRAL and c.top_k < 2:
        raise _top1_mixtral()
    model_class = _TARGET_CLASS[arch]

    fields = {k: getattr(source, k) for k in _CARRIED if getattr(source, k, None) is not None}
    fields["rope_parameters"] = dict(source.rope_parameters)
    window = getattr(source, "sliding_window", None)
    if arch == MIXTRAL:
        fields.update(
            num_local_experts=c.num_experts, num_experts_per_tok=c.top_k,
            intermediate_size=expert_width, router_aux_loss_coef=c.aux_loss_coef,
            router_jitter_noise=c.jitter_eps, output_router_logits=False,
            sliding_window=window if source.model_type != "qwen2" else None,
        )
        if c.jitter_eps:
            notes.append(
                f"router_jitter_noise={c.jitter_eps:g}: Mixtral multiplies the whole MoE "
                "block's input by U(1-eps, 1+eps) in training (the experts see it too, and "
                "it is applied in place), where moeify jitters a copy of the router's "
                "input only")
    else:
        step = next((s for s in range(1, num_layers + 1)
                     if sparse == tuple(i for i in range(num_layers) if (i + 1) % s == 0)), None)
        fields.update(
            num_experts=c.num_experts, num_experts_per_tok=c.top_k,
            moe_intermediate_size=expert_width, intermediate_size=source.intermediate_size,
            decoder_sparse_step=step or 1,
            mlp_only_layers=[] if step else [i for i in range(num_layers) if i not in sparse],
            norm_topk_prob=norm_topk_prob(c),
            router_aux_loss_coef=c.aux_loss_coef, output_router_logits=False,
        )
        if arch == QWEN2_MOE:
            notes += _qwen2_moe_fields(fields, source, c, expert_width)
        else:
            fields["attention_bias"] = bool(getattr(source, "attention_bias", False))
            if _windowed_layers(source):  # every layer (misfit refuses some of them)
                fields.update(use_sliding_window=True, sliding_window=window)
        dense = [i for i in range(num_layers) if i not in sparse]
        family = {QWEN2_MOE: "Qwen2-MoE", QWEN3_MOE: "Qwen3-MoE"}[arch]
        if dense:
            notes.append(f"layers {dense} left dense: transformers and vLLM run "
                         f"this; llama.cpp's {family} needs a router in every layer "
                         "(convert with every=1, --every 1, for llama.cpp)")
        if arch == QWEN2_MOE and fields["norm_topk_prob"]:
            notes.append("norm_topk_prob=True (top-k renormalised): transformers and vLLM "
                         "renormalise, llama.cpp's Qwen2-MoE does not and computes other "
                         "outputs (for llama.cpp: top_k=1 with the softmax gate, raw top-k "
                         "probabilities with gate='raw', --gate raw, or hf_arch='mixtral', "
                         "--hf-arch mixtral, from Llama or Mistral)")
        if arch == QWEN3_MOE and not fields["norm_topk_prob"]:
            notes.append("norm_topk_prob=False (raw top-k probabilities): transformers and "
                         "vLLM keep them, llama.cpp's Qwen3-MoE always renormalises and "
                         "computes other outputs (for llama.cpp: top_k >= 2 with the softmax "
                         "gate)")
        if c.jitter_eps:
            notes.append(f"jitter_eps={c.jitter_eps:g} not written: {family} has no "
                         "router jitter")
    for name, loss in (("z_loss_coef", "router z-loss"),
                       ("seq_aux_loss_coef", "sequence-wise balance loss")):
        if getattr(c, name):
            notes.append(f"{name}={getattr(c, name):g} not written: {model_class} has no "
                         f"{loss}")
    if c.bias_balancing:
        notes.append(f"bias_balancing not carried: {model_class} has no per-expert selection "
                     "bias and no update for it; written while the bias is 0 (the routing is "
                     "then the same; a bias that has moved is refused), HF trains without it")
    dropout = max((c.resolve_expert_dropout(s.dropout) for s in sites), default=0.0)
    if dropout:
        notes.append(f"expert dropout {dropout:g} not written: the target's experts have none")
    if c.router_dtype != "float32":
        notes.append(f"router_dtype={c.router_dtype} not written: HF computes the router in "
                     "the model's dtype, then the softmax in float32")
    elif dtype is not None and dtype != torch.float32:
        notes.append(f"router weights written in {str(dtype).removeprefix('torch.')} with "
                     "the rest: HF computes the router logits in the model's dtype (moeify "
                     "in float32)")
    if c.uses_random_routing:
        notes.append("random_routing (GShard's random second expert, moeify, training only) "
                     "has no HF counterpart: HF always keeps every choice")
    if c.group_size is not None:
        notes.append(f"group_size={c.group_size} not written: HF routes every token at "
                     "once (dropless: the output is the same; the aux loss pools all tokens)")
    target = getattr(transformers, _CONFIG_CLASS[arch])(**fields)
    if dtype is not None:
        target.dtype = dtype
    target.architectures = [model_class]
    carried = set(fields) | set(_CARRIED) | set(_READ) | set(_WINDOW)
    generic = set(transformers.PretrainedConfig().to_dict())
    skipped = sorted(k for k in source.to_diff_dict()
                     if k not in carried and k not in generic and k != "pretraining_tp")
    if getattr(source, "pretraining_tp", 1) not in (None, 1):
        skipped.append(f"pretraining_tp={source.pretraining_tp}")
    if skipped:
        notes.append(f"source config fields not carried (the target has no such setting): "
                     f"{', '.join(skipped)}")
    return Layout(arch, target, sparse, notes)


def norm_topk_prob(c: MoEConfig) -> bool:
    """Qwen's ``norm_topk_prob`` for ``c``'s gate: renormalised weights (the softmax gate
    at k >= 2, the normalized gate) are True; raw probabilities (the raw gate, the softmax
    gate at top-1) are False."""
    return c.gate != Gate.RAW and not (c.top_k == 1 and c.gate == Gate.SOFTMAX)


def _qwen2_moe_fields(fields: dict[str, Any], source: Any, c: MoEConfig,
                      expert_width: int) -> list[str]:
    """Add Qwen2-MoE's own config fields to ``fields`` (the shared expert, q/k/v biases,
    the sliding window); return the notes on them."""
    notes = []
    num_layers = source.num_hidden_layers
    fields.update(shared_expert_intermediate_size=(
        c.shared_experts * expert_width if c.shared_experts else SHARED_WIDTH), qkv_bias=True)
    if source.model_type == "qwen2":
        fields.update({k: getattr(source, k) for k in _WINDOW})
    elif getattr(source, "sliding_window", None) is not None:  # Mistral: on every layer
        fields.update(use_sliding_window=True, sliding_window=source.sliding_window,
                      max_window_layers=num_layers,
                      layer_types=["sliding_attention"] * num_layers)
    if not c.shared_experts:
        notes.append(f"shared expert written {SHARED_WIDTH} unit wide with an all-zero down "
                     "projection (its output is exactly 0) and a gate of ones: the form "
                     "llama.cpp loads (it reads width 0 as unset and a zero gate gives NaN)")
    else:
        notes.append("llama.cpp computes the shared expert gate's sigmoid(z) as silu(z) / z, "
                     "NaN where z = x . w is 0: for every token while the gate row is 0, as "
                     "upcycling leaves it (transformers and vLLM compute the sigmoid)")
    if source.model_type != "qwen2":
        notes.append("q/k/v biases written as zeros (qkv_bias=True; the source has none)")
    return notes


# --- tensors -------------------------------------------------------------------------------


class _Tensor:
    """One output tensor: its final shape and dtype, and how to produce its bytes."""

    def __init__(self, shape: tuple[int, ...], chunks: Callable[[], Iterable[Tensor]]) -> None:
        self.shape, self.chunks = shape, chunks


def hf_tensors(model: nn.Module, layout: Layout, *, dtype: torch.dtype,
               program=None) -> dict[str, _Tensor]:
    """Every tensor of the target checkpoint, in order, from a converted ``model``."""

    switch = dict(switch_layers(model))
    values = LayerTensors(model, program)
    out: dict[str, _Tensor] = {}
    tied = bool(getattr(layout.config, "tie_word_embeddings", False))
    state = model.state_dict()
    done: set[str] = set()
    E = layout.config.num_local_experts if layout.arch == MIXTRAL else layout.config.num_experts
    d = layout.config.hidden_size

    def plain(tensor: Tensor) -> _Tensor:
        return _Tensor(tuple(tensor.shape), lambda: [tensor.detach().to(dtype)])

    def zeros(*shape: int) -> _Tensor:
        return _Tensor(shape, lambda: [torch.zeros(shape, dtype=dtype)])

    block, w_gate, w_in, w_out = EXPERT_NAMES[layout.arch]

    for name, tensor in state.items():
        if tied and name == "lm_head.weight":
            continue
        path = next((p for p in switch if name.startswith(p + ".")), None)
        if path is None:
            out[name] = plain(tensor)
            if layout.arch == QWEN2_MOE and re.fullmatch(r".*\.self_attn\.[qkv]_proj\.weight", name):
                bias = name[: -len("weight")] + "bias"
                if bias not in state:
                    out[bias] = zeros(tensor.shape[0])
            continue
        if path in done:
            continue
        done.add(path)
        layer = switch[path]
        f = layer.experts.d_ff

        def router(path=path):
            return [values.get(path)["router.weight"].tensor.to(dtype)]

        def expert(key: str, j: int, path=path):
            """Expert j's matrix ``key`` in nn.Linear layout ([out, in])."""
            source = values.get(path)[key]
            matrix = source.tensor if source.repeat is not None else source.tensor[j]
            return [matrix.T.to(dtype).contiguous()]

        def gate_row(path=path):
            return [values.get(path)["shared_experts.gate.weight"].tensor.to(dtype)]

        def matrices(ffn: str, width: int) -> tuple[tuple[str, str, tuple[int, int]], ...]:
            """(moeify name, target part, shape) of an FFN's three matrices."""
            return ((f"{ffn}.w_gate", w_gate, (width, d)), (f"{ffn}.w_in", w_in, (width, d)),
                    (f"{ffn}.w_out", w_out, (d, width)))

        prefix = path.removesuffix(".mlp") + "." + block
        out[f"{prefix}.gate.weight"] = _Tensor((E, d), router)
        for j in range(E):
            for key, part, shape in matrices("experts", f):
                out[f"{prefix}.experts.{j}.{part}.weight"] = _Tensor(
                    shape, lambda key=key, j=j, expert=expert: expert(key, j))
        if layout.arch != QWEN2_MOE:
            continue
        width = layout.config.shared_expert_intermediate_size
        if getattr(layer, "shared_experts", None) is None:  # the no-op one (see above)
            out[f"{prefix}.shared_expert.gate_proj.weight"] = zeros(width, d)
            out[f"{prefix}.shared_expert.up_proj.weight"] = zeros(width, d)
            out[f"{prefix}.shared_expert.down_proj.weight"] = zeros(d, width)
            out[f"{prefix}.shared_expert_gate.weight"] = _Tensor(
                (1, d), lambda: [torch.ones((1, d), dtype=dtype)])
            continue
        # the N shared experts are one FFN N expert widths wide, an `Experts` of one
        for key, part, shape in matrices("shared_experts.ffn", width):
            out[f"{prefix}.shared_expert.{part}.weight"] = _Tensor(
                shape, lambda key=key, expert=expert: expert(key, 0))
        out[f"{prefix}.shared_expert_gate.weight"] = _Tensor((1, d), gate_row)
    return out


def check_selection_bias(model: nn.Module, arch: str) -> None:
    """Refuse a model whose selection bias (``bias_balancing``) has moved from 0: the HF
    classes have no place for it, so they would pick other experts than moeify does.
    Switch layers still on the meta device (a streamed conversion) hold the bias of a
    fresh conversion, 0."""
    for path, layer in switch_layers(model):
        bias = getattr(layer.router, "expert_bias", None)
        if bias is not None and not bias.is_meta and bool(bias.any()):
            raise _fail(
                "the selection bias of {path} (bias_balancing) has moved from 0 (largest "
                "|b| {size}): HF's class for {arch} has no place for it and would select "
                "other experts than the model does; use {torch}", path=path,
                size=f"{float(bias.abs().max()):.3g}", arch=ARCH.given(arch),
                torch=FORMAT.given("torch"))


def published_layout(layout: Layout) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the target's published checkpoints: the class's
    own state dict (experts fused), with each layer's fused experts written per expert
    under `EXPERT_NAMES`."""
    import transformers

    with torch.device("meta"):
        target = getattr(transformers, layout.model_class)(layout.config)
    block, w_gate, w_in, w_out = EXPERT_NAMES[layout.arch]
    expected: dict[str, tuple[int, ...]] = {}
    for name, tensor in target.state_dict().items():
        match = re.fullmatch(r"(model\.layers\.\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj"
                             r"|experts\.down_proj)", name)
        if match is None:
            expected[name] = tuple(tensor.shape)
            continue
        prefix, part = f"{match.group(1)}.{block}", match.group(2)
        if part == "gate.weight":
            expected[f"{prefix}.gate.weight"] = tuple(tensor.shape)
        elif part == "experts.gate_up_proj":  # [E, 2f, d]: gate rows, then up rows
            experts, two_f, d = tensor.shape
            for j in range(experts):
                expected[f"{prefix}.experts.{j}.{w_gate}.weight"] = (two_f // 2, d)
                expected[f"{prefix}.experts.{j}.{w_in}.weight"] = (two_f // 2, d)
        else:  # experts.down_proj [E, d, f]
            for j in range(tensor.shape[0]):
                expected[f"{prefix}.experts.{j}.{w_out}.weight"] = tuple(tensor.shape[1:])
    if getattr(layout.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    return expected


def _check_against_hf(layout: Layout, tensors: dict[str, _Tensor]) -> None:
    """The names and shapes must be exactly those of the published layout."""
    expected = published_layout(layout)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(n for n in set(expected) & set(tensors) if expected[n] != tensors[n].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what} {names[:3]}" for what, names in (
            ("missing", missing), ("unexpected", unexpected), ("shape differs", wrong)) if names)
        raise MoEError(f"{layout.model_class} layout mismatch: {detail}")


# --- writing -------------------------------------------------------------------------------


# config.json keys transformers 5 writes under its own alias, by model_type: the published
# name -> transformers 5's (Qwen3MoeConfig maps num_experts onto num_local_experts)
_PUBLISHED_KEYS = {"qwen3_moe": {"num_experts": "num_local_experts"}}


def write_config(config: Any, directory: Path) -> None:
    """``config.json`` as transformers 5 writes it, with the keys of the published
    checkpoints that transformers 4.x, vLLM releases built on it and llama.cpp's converter
    read: the RoPE settings in their top-level form (``rope_theta``; ``rope_scaling`` for
    a scaled RoPE; without them those readers take the class's default base, Mixtral 1e6,
    Qwen2-MoE 1e4, which rotates every position wrongly), and Qwen3-MoE's ``num_experts``
    (transformers 5 writes ``num_local_experts``, which transformers 4.x's Qwen3MoeConfig
    does not read: it would build its default 128 experts). transformers 5 reads either
    form."""
    config.save_pretrained(directory)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    renamed = _PUBLISHED_KEYS.get(config.model_type, {})
    if "rope_theta" not in rope and not renamed:
        return
    file = directory / "config.json"
    data = json.loads(file.read_text())
    for published, alias in renamed.items():
        data[published] = data.pop(alias)
    if "rope_theta" in rope:
        data["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            data["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class HFExport:
    """What `save_hf_moe` wrote."""

    path: Path
    arch: str
    model_class: str
    notes: tuple[str, ...]
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "arch": self.arch, "model_class": self.model_class,
                "notes": list(self.notes), "bytes": self.bytes}


def _model_dtype(model: nn.Module) -> torch.dtype:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.weight.dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def save_hf_moe(model: nn.Module, path: str | os.PathLike, *, arch: str | None = None,
                dtype: torch.dtype | None = None, force: bool = False, program=None,
                progress=None, tokenizer: Tokenizer | None = None) -> HFExport:
    """Write a converted Llama/Mistral/Qwen2/Qwen3 ``model`` as an HF ``arch`` checkpoint.

    arch: ``mixtral``, ``qwen2_moe`` or ``qwen3_moe`` (default: `default_arch`).
    dtype: of every written tensor (default: the model's embedding dtype).
    program: the `Program` of a lazy apply (Switch layers on the meta device): their
        tensors are made one layer at a time while writing (`moeify.io.streaming`).
    tokenizer: the source's tokenizer files, copied in (`moeify.io.tokenizer`).
    """

    plan = plan_of(model)
    if plan is None:
        raise MoEError("the model is not converted: run moeify.convert first")
    arch = arch or default_arch(model)
    if arch == SWITCH_TRANSFORMERS:
        raise MoEError("use moeify.hf.switch_transformers.save_hf_switch (or moeify.write) for "
                       "switch_transformers")
    dtype = dtype or _model_dtype(model)
    layout = hf_layout(model, plan, arch, dtype=dtype)
    check_selection_bias(model, arch)
    tensors = hf_tensors(model, layout, dtype=dtype, program=program)
    _check_against_hf(layout, tensors)
    size = torch.empty((), dtype=dtype).element_size()
    specs = {n: torch.empty(t.shape, dtype=dtype, device="meta") for n, t in tensors.items()}
    nbytes = sum(s.numel() * size for s in specs.values())
    # HF reads whole tensors: a shard grows to hold the largest one rather than split it
    largest = max(s.numel() * size for s in specs.values())
    shards = plan_shards(specs, max(DEFAULT_SHARD_BYTES, largest + (1 << 20)))
    if shards.split_tensors:  # pragma: no cover - the limit prevents it
        raise MoEError("a tensor was split across shards, which HF cannot read")
    with atomic_directory(path, force=force, need=nbytes) as tmp:
        write_shards(tmp, shards, lambda name: tensors[name].chunks(), progress)
        write_config(layout.config, tmp)
        generation = getattr(model, "generation_config", None)
        can_generate = getattr(model, "can_generate", lambda: False)()
        if generation is not None and can_generate:
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.copy_to(tmp)
    return HFExport(Path(path), arch, layout.model_class, tuple(layout.notes), nbytes)


# --- HF's load-balancing loss ------------------------------------------------------------------


def pooled_load_balancing_loss(router_logits: Iterable[Tensor], num_experts: int, top_k: int,
                               attention_mask: Tensor | None = None) -> Tensor:
    """HF's Mixtral / Qwen2-MoE auxiliary loss (``load_balancing_loss_func``), written
    out: every layer's router logits ([..., E], one row per token, in the attention mask's
    token order) pooled; ``f_i`` = top-k assignments to expert i per pooled row, ``P_i`` =
    mean softmax probability; ``E * sum_i f_i * P_i``; masked rows left out. See the
    module docs for how it relates to moeify's per-layer, per-group top-1 loss."""
    counts = torch.zeros(num_experts, dtype=torch.float64)
    prob_sum = torch.zeros(num_experts, dtype=torch.float64)
    rows = torch.zeros((), dtype=torch.float64)
    for logits in router_logits:
        logits = logits.reshape(-1, num_experts).double()
        weight = (torch.ones(logits.shape[0], dtype=torch.float64) if attention_mask is None
                  else attention_mask.reshape(-1).double())
        probs = torch.softmax(logits, dim=-1)
        chosen = probs.topk(top_k, dim=-1).indices  # [N, k]
        counts += torch.nn.functional.one_hot(chosen, num_experts).double().mul(
            weight[:, None, None]).sum(dim=(0, 1))
        prob_sum += (probs * weight[:, None]).sum(dim=0)
        rows += weight.sum()
    return num_experts * ((counts / rows) * (prob_sum / rows)).sum()

