"""--format hf --hf-arch mixtral | qwen2_moe | qwen3_moe, checked against transformers' own
classes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers

import moeify
from moeify import MoEConfig
from moeify.config import Gate
from moeify.hf.decoder_moe import (
    default_arch,
    fitting_arches,
    pooled_load_balancing_loss,
    save_hf_moe,
    target_config,
)
from tests import models
from tests.models import randomize

ROOT = Path(__file__).resolve().parent.parent
BASE = dict(num_experts=4, noise=0.5)  # experts that differ: a wrong expert order shows
CASES = {
    "llama-mixtral": (lambda: models.llama(tie_word_embeddings=True), "mixtral", {}),
    "mistral-mixtral": (models.mistral, "mixtral", {}),
    "llama-qwen2_moe-top1": (models.llama, "qwen2_moe", {"top_k": 1}),
    "llama-qwen2_moe-top2": (models.llama, "qwen2_moe", {"top_k": 2}),
    "qwen2-qwen2_moe": (models.qwen2, "qwen2_moe", {}),
    # granular upcycling: 4 copies x 2 halves of the FFN, Mixtral's intermediate_size d_ff/2
    "llama-mixtral-granular": (models.llama, "mixtral", {"num_experts": 8, "top_k": 2,
                                                         "granularity": 2}),
    # fine-grained routing: any top-k
    "llama-mixtral-top4": (models.llama, "mixtral", {"num_experts": 8, "top_k": 4}),
    "qwen2-qwen2_moe-top3": (models.qwen2, "qwen2_moe", {"num_experts": 8, "top_k": 3}),
    # Qwen3 -> Qwen3-MoE: q/k norms and head_dim carried
    "qwen3-qwen3_moe-top2": (models.qwen3, "qwen3_moe", {"top_k": 2, "every": 1}),
    # fine-grained: 4 copies x 4 quarters of the FFN, moe_intermediate_size d_ff/4; noise
    # 0.1: confident routers on quarters scaled by 4 make the residual stream ~25 wide,
    # where float32's summation order alone moves the logits by up to 1e-5 at noise 0.5
    "qwen3-qwen3_moe-fine-grained": (models.qwen3, "qwen3_moe", {
        "num_experts": 16, "top_k": 4, "granularity": 4, "every": 1, "noise": 0.1}),
    # every other layer dense (decoder_sparse_step 2), raw top-2 probabilities
    "qwen3-qwen3_moe-every2-raw": (models.qwen3, "qwen3_moe", {"top_k": 2, "gate": "raw"}),
    # Qwen2-MoE's gated shared expert: one whole copy; two halves next to 4 x 2 halves
    "llama-qwen2_moe-shared": (models.llama, "qwen2_moe", {"top_k": 1, "shared_experts": 1}),
    "qwen2-qwen2_moe-shared-granular": (models.qwen2, "qwen2_moe", {
        "num_experts": 8, "top_k": 2, "granularity": 2, "shared_experts": 2, "every": 1}),
}


def sharpen_routers(model, seed=1):
    """Confident routers: which experts a token takes matters; shared expert gates that
    differ per token (upcycled, they are 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in moeify.switch_layers(model):
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=generator))
            shared = getattr(layer, "shared_experts", None)
            if shared is not None and shared.gate is not None:
                shared.gate.weight.copy_(torch.randn(shared.gate.weight.shape,
                                                     generator=generator))


def convert_for(arch, dense, **options):
    config = MoEConfig(**{**BASE, **options})
    config = target_config(arch, dense, config, explicit=set(BASE) | set(options))
    return moeify.convert(dense, config).model.eval()  # no seq_len: capacity per call


def padded_batch(seed=2, batch=3, length=10):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, models.VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """`tests.models.qwen3` (seed 0) saved with ``save_pretrained``."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-qwen3") / "qwen3"
    models.qwen3().save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    make, arch, options = CASES[request.param]
    torch.manual_seed(0)
    moe = convert_for(arch, randomize(make()), **options)
    sharpen_routers(moe)
    out = tmp_path_factory.mktemp(request.param) / "hf"
    export = save_hf_moe(moe, out, arch=arch)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    return dict(moe=moe, hf=hf.eval(), info=info, arch=arch, out=out, export=export,
                config=moeify.plan_of(moe).config)


def test_loads_with_no_missing_or_unexpected_keys(exported):
    info, hf, arch = exported["info"], exported["hf"], exported["arch"]
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    want = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM"}
    assert type(hf).__name__ == want[arch]
    files = {p.name for p in exported["out"].iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= files
    config = exported["config"]
    assert hf.config.num_experts_per_tok == config.top_k
    assert hf.config.router_aux_loss_coef == config.aux_loss_coef
    if arch != "mixtral":  # renormalised: the softmax gate's top-k for k >= 2
        assert hf.config.norm_topk_prob == (config.gate != Gate.RAW and config.top_k >= 2)
    if arch == "qwen2_moe" and config.shared_experts:
        f = moeify.switch_layers(exported["moe"])[0][1].experts.d_ff
        assert hf.config.shared_expert_intermediate_size == config.shared_experts * f
        assert not any("unit wide" in note for note in exported["export"].notes)
    elif arch == "qwen2_moe":
        assert hf.config.shared_expert_intermediate_size == 1
        assert any("shared expert" in note for note in exported["export"].notes)
        for layer in hf.model.layers:  # the shared expert adds exactly nothing
            if hasattr(layer.mlp, "shared_expert"):
                assert not layer.mlp.shared_expert.down_proj.weight.any()
                assert layer.mlp.shared_expert_gate.weight.all()
    if arch == "qwen3_moe":  # Qwen3's attention as it is
        source = exported["moe"].config
        assert (hf.config.head_dim, hf.config.num_key_value_heads) == (
            source.head_dim, source.num_key_value_heads)
        layer = exported["moe"].model.layers[0].self_attn
        assert torch.equal(hf.model.layers[0].self_attn.q_norm.weight, layer.q_norm.weight)
        assert torch.equal(hf.model.layers[0].self_attn.k_norm.weight, layer.k_norm.weight)


# The published layout per target, as the checkpoints on the hub store it and llama.cpp's
# convert_hf_to_gguf.py (conversion/llama.py, conversion/qwen.py), vLLM's loaders
# (get_expert_mapping: w1/w2/w3, gate_proj/down_proj/up_proj) and transformers 4.x read it:
# names per sparse layer i and expert j, shapes over E experts, width d, expert width f.
PUBLISHED = {
    "mixtral": {
        "model.layers.{i}.block_sparse_moe.gate.weight": ("E", "d"),
        "model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight": ("f", "d"),
        "model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight": ("f", "d"),
        "model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight": ("d", "f"),
    },
    "qwen2_moe": {  # S: the shared expert's width, N * f (1 with none asked for)
        "model.layers.{i}.mlp.gate.weight": ("E", "d"),
        "model.layers.{i}.mlp.experts.{j}.gate_proj.weight": ("f", "d"),
        "model.layers.{i}.mlp.experts.{j}.up_proj.weight": ("f", "d"),
        "model.layers.{i}.mlp.experts.{j}.down_proj.weight": ("d", "f"),
        "model.layers.{i}.mlp.shared_expert.gate_proj.weight": ("S", "d"),
        "model.layers.{i}.mlp.shared_expert.up_proj.weight": ("S", "d"),
        "model.layers.{i}.mlp.shared_expert.down_proj.weight": ("d", "S"),
        "model.layers.{i}.mlp.shared_expert_gate.weight": (1, "d"),
    },
    "qwen3_moe": {
        "model.layers.{i}.mlp.gate.weight": ("E", "d"),
        "model.layers.{i}.mlp.experts.{j}.gate_proj.weight": ("f", "d"),
        "model.layers.{i}.mlp.experts.{j}.up_proj.weight": ("f", "d"),
        "model.layers.{i}.mlp.experts.{j}.down_proj.weight": ("d", "f"),
    },
}
# config.json keys the readers take the MoE shape from
PUBLISHED_CONFIG = {
    "mixtral": {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
                "num_local_experts": "E", "num_experts_per_tok": "k", "intermediate_size": "f"},
    "qwen2_moe": {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"],
                  "num_experts": "E", "num_experts_per_tok": "k", "moe_intermediate_size": "f",
                  "shared_expert_intermediate_size": "S"},
    "qwen3_moe": {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
                  "num_experts": "E", "num_experts_per_tok": "k", "moe_intermediate_size": "f"},
}


def test_files_hold_the_published_layout(exported):
    """Read from the files, not through transformers: the expert tensors and config keys
    are those of the published checkpoints; nothing of transformers 5's fused form."""
    arch, moe, out = exported["arch"], exported["moe"], exported["out"]
    config = exported["config"]
    layers = [int(path.split(".")[2]) for path, _ in moeify.switch_layers(moe)]
    first = moeify.switch_layers(moe)[0][1]
    f = first.experts.d_ff
    sizes = {"E": config.num_experts, "d": moe.config.hidden_size, "f": f, "k": config.top_k,
             "S": config.shared_experts * f or 1}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    tensors = _tensors(out)
    for i in layers:
        for pattern, shape in PUBLISHED[arch].items():
            for j in range(config.num_experts if "{j}" in pattern else 1):
                name = pattern.format(i=i, j=j)
                assert name in names, name
                assert tuple(tensors[name].shape) == tuple(sizes.get(s, s) for s in shape), name
    assert not [n for n in names if "gate_up_proj" in n or n.endswith("experts.down_proj")]
    moe_names = {n for n in names if ".experts." in n or n.endswith(".gate.weight")
                 or ".shared_expert" in n}
    want = {p.format(i=i, j=j) for i in layers for p in PUBLISHED[arch]
            for j in range(config.num_experts)}
    assert moe_names == want
    written = json.loads((out / "config.json").read_text())
    for key, value in PUBLISHED_CONFIG[arch].items():
        assert written[key] == (sizes[value] if value in ("E", "k", "f", "S") else value), key
    if arch == "qwen3_moe":  # transformers 4.x's Qwen3MoeConfig reads num_experts, not this
        assert "num_local_experts" not in written
    # RoPE in the top-level form too: transformers 4.x and vLLM on it read only that, and
    # would otherwise take the class's default base
    assert written["rope_theta"] == moe.config.rope_parameters["rope_theta"]
    # each expert's matrices are the moeify expert's, transposed to nn.Linear layout
    path, layer = moeify.switch_layers(moe)[-1]
    prefix = path.removesuffix(".mlp") + (".block_sparse_moe" if arch == "mixtral" else ".mlp")
    gate, up, down = [p.split(".")[-2] for p in list(PUBLISHED[arch])[1:4]]
    for j in range(config.num_experts):
        torch.testing.assert_close(tensors[f"{prefix}.experts.{j}.{gate}.weight"],
                                   layer.experts.w_gate[j].T, rtol=0, atol=0)
        torch.testing.assert_close(tensors[f"{prefix}.experts.{j}.{up}.weight"],
                                   layer.experts.w_in[j].T, rtol=0, atol=0)
        torch.testing.assert_close(tensors[f"{prefix}.experts.{j}.{down}.weight"],
                                   layer.experts.w_out[j].T, rtol=0, atol=0)
    if config.shared_experts:  # the shared experts, one FFN N expert widths wide, and the gate
        shared = layer.shared_experts
        for part, weight in (("gate_proj", shared.ffn.w_gate), ("up_proj", shared.ffn.w_in),
                             ("down_proj", shared.ffn.w_out)):
            torch.testing.assert_close(tensors[f"{prefix}.shared_expert.{part}.weight"],
                                       weight[0].T, rtol=0, atol=0)
        torch.testing.assert_close(tensors[f"{prefix}.shared_expert_gate.weight"],
                                   shared.gate.weight, rtol=0, atol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_logits_equal_moeify_eval_logits(exported, padded):
    moe, hf = exported["moe"], exported["hf"]
    ids, mask = padded_batch()
    if not padded:
        mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = moe(input_ids=ids, attention_mask=mask).logits
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-5
    tokens = [s.num_tokens for s in moeify.routing_stats(moe)]
    assert tokens == [int(mask.sum())] * len(tokens)  # padding routed nowhere
    assert all(s.dropped_fraction == 0 for s in moeify.routing_stats(moe))  # dropless


def test_greedy_generation_gives_identical_tokens(exported):
    moe, hf = exported["moe"], exported["hf"]
    ids, mask = padded_batch(seed=5, length=7)
    kwargs = dict(attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                  pad_token_id=0)
    with torch.no_grad():
        ours = moe.generate(ids, **kwargs)
        theirs = hf.generate(ids, **kwargs)
    assert ours.shape == (3, 27)
    assert torch.equal(ours, theirs)


def test_hf_aux_loss_is_hfs_definition_of_moeifys_routing(exported):
    """HF pools every layer's top-k assignments (k at balance); moeify's own loss is per
    layer and sequence over top-1 choices (1 at balance). Computed from moeify's router
    outputs under HF's definition, it equals the HF model's aux_loss."""
    moe, hf, config = exported["moe"], exported["hf"], exported["config"]
    ids, mask = padded_batch(seed=7)
    logits = []
    hooks = [layer.router.register_forward_hook(lambda m, i, o: logits.append(o.detach()))
             for _, layer in moeify.switch_layers(moe)]
    try:
        with torch.no_grad():
            moe(input_ids=ids, attention_mask=mask)
            theirs = hf(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    finally:
        for hook in hooks:
            hook.remove()
    assert len(logits) == len(moeify.switch_layers(moe))
    ours = pooled_load_balancing_loss(logits, config.num_experts, config.top_k, mask)
    assert abs(float(ours) - float(theirs)) <= 1e-5
    # the logits are those of moeify's routing: its own loss (per layer and sequence, top-1
    # choices, padding left out) is HF's definition for one layer and one sequence at k = 1,
    # averaged over the sequences
    E = config.num_experts
    for layer_logits, stats in zip(logits, moeify.routing_stats(moe), strict=True):
        per_sequence = [pooled_load_balancing_loss([row], E, 1, row_mask) for row, row_mask
                        in zip(layer_logits.reshape(len(ids), -1, E), mask)]
        assert abs(float(stats.load_balancing_loss)
                   - float(torch.stack(per_sequence).mean())) <= 1e-5


@pytest.mark.parametrize("case", ["llama-mixtral", "llama-qwen2_moe-top1", "qwen3-qwen3_moe-top2",
                                  "llama-qwen2_moe-shared"])
def test_exported_checkpoint_trains_in_hf(case, tmp_path):
    make, arch, options = CASES[case]
    torch.manual_seed(0)
    moe = convert_for(arch, randomize(make()), **options)
    save_hf_moe(moe, tmp_path / "hf", arch=arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=3e-3)
    ids = torch.randint(2, models.VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(6):
        out = hf(input_ids=ids, labels=ids, output_router_logits=True)
        assert out.aux_loss is not None and torch.isfinite(out.loss)
        out.loss.backward()
        router = next(m.gate.weight for m in (l.mlp for l in hf.model.layers)
                      if hasattr(m, "gate") and hasattr(m, "experts"))
        assert router.grad is not None and router.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out.loss))
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("make, arch", [(models.llama, "qwen2_moe"), (models.qwen3, "qwen3_moe")])
@pytest.mark.parametrize("options, step, mlp_only, sparse", [
    (dict(every=2), 2, [], [1, 3, 5]),
    (dict(every=3), 3, [], [2, 5]),
    (dict(layers=(0, 3)), 1, [1, 2, 4, 5], [0, 3]),
    (dict(every=1), 1, [], [0, 1, 2, 3, 4, 5]),
])
def test_qwen_layer_choice_maps_onto_sparse_step_or_mlp_only_layers(
        make, arch, options, step, mlp_only, sparse, tmp_path):
    torch.manual_seed(0)
    moe = convert_for(arch, randomize(make(layers=6)), **options)
    sharpen_routers(moe)
    save_hf_moe(moe, tmp_path / "hf", arch=arch)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (hf.config.decoder_sparse_step, hf.config.mlp_only_layers) == (step, mlp_only)
    assert [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")] == sparse
    ids, mask = padded_batch()
    with torch.no_grad():
        diff = (moe(input_ids=ids, attention_mask=mask).logits
                - hf.eval()(input_ids=ids, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max() <= 1e-5


def test_qwen3_sliding_window_on_every_layer_is_carried(tmp_path):
    """A window shorter than the sequence on every layer (max_window_layers=0): Qwen3-MoE's
    use_sliding_window."""
    torch.manual_seed(0)
    dense = randomize(models.qwen3(use_sliding_window=True, sliding_window=4,
                                   max_window_layers=0))
    moe = convert_for("qwen3_moe", dense, top_k=2, every=1)
    sharpen_routers(moe)
    save_hf_moe(moe, tmp_path / "hf", arch="qwen3_moe")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (hf.config.use_sliding_window, hf.config.sliding_window) == (True, 4)
    ids, mask = padded_batch()
    with torch.no_grad():
        diff = (moe(input_ids=ids, attention_mask=mask).logits
                - hf(input_ids=ids, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max() <= 1e-5


def test_default_targets_and_python_refusals(tmp_path):
    assert default_arch(models.llama()) == "mixtral"
    assert default_arch(models.mistral()) == "mixtral"
    assert default_arch(models.qwen2()) == "qwen2_moe"
    assert default_arch(models.qwen3()) == "qwen3_moe"
    assert default_arch(models.t5()) == "switch_transformers"
    with pytest.raises(moeify.MoEError, match="no format='hf' target fits GPT2LMHeadModel"):
        default_arch(models.gpt2())
    with pytest.raises(moeify.MoEError, match="targets that fit it: qwen2_moe"):
        target_config("mixtral", models.qwen2(), MoEConfig())
    # per-head q/k norms: Qwen3 and Qwen3-MoE have them, the other families do not
    assert fitting_arches(models.qwen3()) == ["qwen3_moe"]
    for make in (models.llama, models.mistral, models.qwen2):
        assert "qwen3_moe" not in fitting_arches(make())
    with pytest.raises(moeify.MoEError, match=r"hf_arch='qwen3_moe' does not fit "
                       r"LlamaForCausalLM \(Qwen3MoeForCausalLM normalises queries and keys "
                       r"per head \(q_norm, k_norm\) and LlamaForCausalLM does not.*\); "
                       r"targets that fit it: mixtral, qwen2_moe$"):
        target_config("qwen3_moe", models.llama(), MoEConfig())
    with pytest.raises(moeify.MoEError, match=r"hf_arch='qwen2_moe' does not fit "
                       r"Qwen3ForCausalLM \(Qwen3ForCausalLM normalises queries and keys per "
                       r"head \(q_norm, k_norm\), which Qwen2MoeForCausalLM has no place "
                       r"for\); targets that fit it: qwen3_moe$"):
        target_config("qwen2_moe", models.qwen3(), MoEConfig())
    # Qwen3-MoE's sliding window is on every layer or none
    assert fitting_arches(models.qwen3(use_sliding_window=True, sliding_window=6,
                                       max_window_layers=0)) == ["qwen3_moe"]
    with pytest.raises(moeify.MoEError, match=r"sliding window covers layers \[2, 3\] only "
                       r"\(max_window_layers=2\); Qwen3MoeForCausalLM's covers every layer "
                       r"or none\); no HF target fits it"):
        target_config("qwen3_moe", models.qwen3(use_sliding_window=True, sliding_window=6,
                                                max_window_layers=2), MoEConfig())
    # every other layer cannot be a Mixtral
    moe = moeify.convert(models.llama(), MoEConfig(num_experts=4, top_k=2, dropless=True)).model
    with pytest.raises(moeify.MoEError, match="Mixtral makes every decoder layer sparse"):
        save_hf_moe(moe, tmp_path / "o", arch="mixtral")
    # a capacity cannot be written: HF's classes are dropless
    moe = moeify.convert(models.llama(), MoEConfig(num_experts=4)).model
    with pytest.raises(moeify.MoEError, match="convert with MoEConfig.dropless=True"):
        save_hf_moe(moe, tmp_path / "o", arch="qwen2_moe")
    assert not (tmp_path / "o").exists()


def test_target_config_fills_defaults_and_refuses_explicit_conflicts():
    llama = models.llama()
    filled = target_config("mixtral", llama, MoEConfig(num_experts=4), explicit={"num_experts"})
    assert (filled.top_k, filled.every, filled.dropless, filled.z_loss_coef) == (2, 1, True, 0.0)
    assert not filled.uses_random_routing  # HF keeps every choice in training
    top4 = target_config("mixtral", llama, MoEConfig(num_experts=8, top_k=4),
                         explicit={"num_experts", "top_k"})
    assert (top4.top_k, top4.every, top4.dropless) == (4, 1, True)
    assert filled.jitter_eps == MoEConfig().jitter_eps  # mapped to router_jitter_noise
    with pytest.raises(moeify.MoEError, match="auxiliary loss alone"):
        target_config("mixtral", llama, MoEConfig(top_k=1), explicit={"top_k"})
    with pytest.raises(moeify.MoEError, match="conflicting: MoEConfig.every=2$"):
        target_config("mixtral", llama, MoEConfig(every=2), explicit={"every"})
    with pytest.raises(moeify.MoEError, match=r"conflicting: MoEConfig.layers=\(1, 3\)$"):
        target_config("mixtral", llama, MoEConfig(layers=(1, 3)), explicit={"layers"})
    with pytest.raises(moeify.MoEError, match="conflicting: MoEConfig.capacity_factor$"):
        target_config("qwen2_moe", llama, MoEConfig(capacity_factor=1.5))
    q = target_config("qwen2_moe", llama, MoEConfig(top_k=2), explicit={"top_k"})
    assert (q.top_k, q.every, q.dropless, q.jitter_eps) == (2, 2, True, 0.0)
    q3 = target_config("qwen3_moe", models.qwen3(), MoEConfig(
        num_experts=16, top_k=4, granularity=4, seq_aux_loss_coef=0.01), explicit={
            "num_experts", "top_k", "granularity"})
    assert (q3.top_k, q3.granularity, q3.dropless, q3.jitter_eps, q3.z_loss_coef,
            q3.seq_aux_loss_coef) == (4, 4, True, 0.0, 0.0, 0.0)
    assert not q3.uses_random_routing
    # Qwen2-MoE always gates its shared expert: filled in, refused off
    shared = target_config("qwen2_moe", llama, MoEConfig(shared_experts=1),
                           explicit={"shared_experts"})
    assert (shared.shared_experts, shared.shared_gate) == (1, True)
    assert target_config("qwen2_moe", llama, MoEConfig(shared_experts=1)).shared_gate
    with pytest.raises(moeify.MoEError, match=r"requires MoEConfig.dropless=True, "
                       r"MoEConfig.shared_gate=True \(Qwen2-MoE gates .*; conflicting: "
                       "MoEConfig.shared_gate=False$"):
        target_config("qwen2_moe", llama, MoEConfig(shared_experts=1),
                      explicit={"shared_experts", "shared_gate"})
    assert target_config("qwen3_moe", models.qwen3(), MoEConfig(gate="raw")).gate == Gate.RAW


@pytest.mark.parametrize("arch, make", [("mixtral", models.llama), ("qwen2_moe", models.qwen2),
                                        ("qwen3_moe", models.qwen3),
                                        ("switch_transformers", models.t5)])
def test_every_target_refuses_sigmoid_scores_and_routed_scaling(arch, make):
    model = make()
    with pytest.raises(moeify.MoEError, match=r"^format='hf' is not possible: "
                       r"MoEConfig.scoring='sigmoid' has no HF counterpart: SwitchTransformers, "
                       r"Mixtral, Qwen2-MoE and Qwen3-MoE score the experts with a softmax"):
        target_config(arch, model, MoEConfig(scoring="sigmoid"))
    with pytest.raises(moeify.MoEError, match=r"MoEConfig.routed_scaling=2.5 has no HF "
                       r"counterpart: .* have no routed scaling factor; use "
                       r"MoEConfig.routed_scaling=1.0 or format='torch'$"):
        target_config(arch, model, MoEConfig(routed_scaling=2.5))
    if arch != "qwen2_moe":  # the only class with a shared expert
        with pytest.raises(moeify.MoEError, match=rf"^hf_arch='{arch}' has no shared expert, "
                           r"MoEConfig.shared_experts=1 asks for some: use "
                           r"hf_arch='qwen2_moe' \(from Llama/Mistral/Qwen2"):
            target_config(arch, model, MoEConfig(shared_experts=1))


def test_mixtral_refuses_the_raw_gate():
    with pytest.raises(moeify.MoEError, match=r"^hf_arch='mixtral' cannot take "
                       r"MoEConfig.gate='raw': Mixtral always renormalises .*; use "
                       r"hf_arch='qwen2_moe' or hf_arch='qwen3_moe'"):
        target_config("mixtral", models.llama(), MoEConfig(top_k=2, gate="raw"))


def test_converted_models_are_checked_again_when_written(tmp_path):
    """moeify.write on a model converted in memory: the same refusals, from the plan."""
    for config, arch, fragment in [
        (MoEConfig(num_experts=4, top_k=2, dropless=True, every=1, scoring="sigmoid"),
         "mixtral", "score the experts with a softmax"),
        (MoEConfig(num_experts=4, top_k=2, dropless=True, every=1, gate="raw"), "mixtral",
         "cannot take MoEConfig.gate='raw'"),
        (MoEConfig(num_experts=4, dropless=True, shared_experts=1), "qwen2_moe",
         "shared experts are ungated: convert with MoEConfig.shared_gate=True"),
    ]:
        moe = moeify.convert(models.llama(), config).model
        with pytest.raises(moeify.MoEError, match=re.escape(fragment)):
            save_hf_moe(moe, tmp_path / "o", arch=arch)
    assert not (tmp_path / "o").exists()


def test_bias_balancing_is_written_while_the_bias_is_zero_and_refused_once_it_moved(tmp_path):
    torch.manual_seed(0)
    moe = convert_for("qwen3_moe", randomize(models.qwen3()), top_k=2, bias_balancing=True)
    sharpen_routers(moe)
    export = save_hf_moe(moe, tmp_path / "zero", arch="qwen3_moe")
    assert any(note.startswith("bias_balancing not carried: Qwen3MoeForCausalLM has no "
                               "per-expert selection bias") for note in export.notes)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "zero").eval()
    ids, mask = padded_batch()
    with torch.no_grad():  # a bias of 0 selects as HF does
        diff = (moe(input_ids=ids, attention_mask=mask).logits
                - hf(input_ids=ids, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max() <= 1e-5
    path, layer = moeify.switch_layers(moe)[0]
    with torch.no_grad():
        layer.router.expert_bias[1] = 0.25
    with pytest.raises(moeify.MoEError, match=rf"the selection bias of {path} "
                       r"\(bias_balancing\) has moved from 0 \(largest \|b\| 0.25\): "
                       r"HF's class for hf_arch='qwen3_moe' has no place for it"):
        save_hf_moe(moe, tmp_path / "moved", arch="qwen3_moe")
    assert not (tmp_path / "moved").exists()


def test_switch_transformers_takes_bias_balancing_while_the_bias_is_zero(tmp_path):
    from moeify.hf.switch_transformers import save_hf_switch

    model = models.t5()
    moeify.convert(model, MoEConfig(num_experts=4, bias_balancing=True), seq_len=8)
    save_hf_switch(model.eval(), tmp_path / "zero")  # the bias is no tensor of HF's layout
    hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        tmp_path / "zero").eval()
    ids = torch.randint(2, models.VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(input_ids=ids, decoder_input_ids=ids).logits
        theirs = hf(input_ids=ids, decoder_input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-5
    with torch.no_grad():
        moeify.switch_layers(model)[0][1].router.expert_bias[0] = -0.5
    with pytest.raises(moeify.MoEError, match="has moved from 0"):
        save_hf_switch(model, tmp_path / "moved")
    assert not (tmp_path / "moved").exists()


def _tensors(directory):
    from safetensors import safe_open

    out = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def test_cli_streams_what_convert_and_save_write(tmp_path, moeify_cli):
    torch.manual_seed(0)
    randomize(models.llama(tie_word_embeddings=True)).save_pretrained(tmp_path / "src")
    result = moeify_cli("convert", tmp_path / "src", "--experts", "4", "--noise", "0.5",
                        "--init", "copy", "--format", "hf", "--out", tmp_path / "cli", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["hf"]["arch"] == "mixtral" and data["config"]["top_k"] == 2  # filled in
    assert any("router_jitter_noise" in note for note in data["hf"]["notes"])
    dense = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "src")
    moe = convert_for("mixtral", dense)
    save_hf_moe(moe, tmp_path / "memory", arch="mixtral")
    a, b = _tensors(tmp_path / "cli"), _tensors(tmp_path / "memory")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "lm_head.weight" not in a  # tied, as save_pretrained writes it
    index = json.loads((tmp_path / "cli" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(a) and "parts" not in index["metadata"]


def test_cli_bfloat16_qwen2_moe_loads_and_runs(tmp_path, moeify_cli):
    torch.manual_seed(0)
    randomize(models.qwen2()).save_pretrained(tmp_path / "src")
    result = moeify_cli("convert", tmp_path / "src", "--experts", "4", "--top-k", "2", "--dtype",
                        "bfloat16", "--format", "hf", "--hf-arch", "qwen2_moe",
                        "--out", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert {t.dtype for t in _tensors(tmp_path / "hf").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.dtype == torch.bfloat16
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.isfinite(hf(input_ids=ids, attention_mask=mask).logits[mask.bool()]).all()


@pytest.mark.parametrize("args, fragments", [
    (["gpt2", "--hf-arch", "mixtral"],
     ["--hf-arch mixtral does not fit GPT2LMHeadModel", "no HF target fits it",
      "mixtral: Llama/Mistral", "qwen2_moe: Llama/Mistral/Qwen2", "--format torch"]),
    (["bert-base-uncased", "--hf-arch", "mixtral"],
     ["--hf-arch mixtral does not fit BertModel", "no HF target fits it"]),
    (["t5-small", "--hf-arch", "mixtral"], ["targets that fit it: switch_transformers"]),
    (["gpt2"], ["no --format hf target fits GPT2LMHeadModel"]),
    (["meta-llama/Llama-3.2-1B", "--hf-arch", "mixtral", "--top-k", "1"],
     ["cannot take --top-k 1", "renormalises", "a single expert's weight is always 1",
      "auxiliary loss alone"]),
    (["meta-llama/Llama-3.2-1B", "--every", "2"],
     ["--hf-arch mixtral requires --top-k >= 2, --every 1", "conflicting: --every 2"]),
    (["meta-llama/Llama-3.2-1B", "--hf-arch", "qwen2_moe", "--capacity", "1.25"],
     ["--hf-arch qwen2_moe requires --dropless", "conflicting: --capacity"]),
    (["meta-llama/Llama-3.2-1B", "--hf-arch", "qwen3_moe"],
     ["--hf-arch qwen3_moe does not fit LlamaForCausalLM", "q_norm, k_norm",
      "targets that fit it: mixtral, qwen2_moe"]),
    (["meta-llama/Llama-3.2-1B", "--scoring", "sigmoid"],
     ["--format hf is not possible: --scoring sigmoid has no HF counterpart",
      "use --scoring softmax or --format torch"]),
    (["t5-small", "--seq-len", "32", "--scoring", "sigmoid"],
     ["--scoring sigmoid has no HF counterpart"]),
    (["meta-llama/Llama-3.2-1B", "--hf-arch", "qwen2_moe", "--routed-scaling", "2.5"],
     ["--routed-scaling 2.5 has no HF counterpart", "use --routed-scaling 1.0"]),
    (["meta-llama/Llama-3.2-1B", "--shared-experts", "1"],
     ["--hf-arch mixtral has no shared expert, --shared-experts 1 asks for some",
      "use --hf-arch qwen2_moe"]),
    (["meta-llama/Llama-3.2-1B", "--top-k", "2", "--gate", "raw"],
     ["--hf-arch mixtral cannot take --gate raw",
      "use --hf-arch qwen2_moe or --hf-arch qwen3_moe"]),
])
def test_bad_input_is_one_clear_line(args, fragments, tmp_path, monkeypatch, moeify_main,
                                     one_line_error):
    monkeypatch.chdir(tmp_path)  # refusals before any work: in this process
    one_line_error(moeify_main("convert", *args[:1], "--random-init", "--format", "hf",
                               *args[1:], "--out", "x"), *fragments)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, fragments", [
    (["--hf-arch", "mixtral"], ["--hf-arch mixtral does not fit Qwen3ForCausalLM",
                                "targets that fit it: qwen3_moe"]),
    (["--shared-experts", "1"], ["--hf-arch qwen3_moe has no shared expert"]),
])
def test_qwen3_refusals_are_one_clear_line(args, fragments, qwen3_dir, tmp_path, monkeypatch,
                                           moeify_main, one_line_error):
    monkeypatch.chdir(tmp_path)
    one_line_error(moeify_main("convert", qwen3_dir, "--format", "hf", *args, "--out", "x"),
                   *fragments)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("make, arch, args", [
    (models.qwen3, "qwen3_moe", {"num_experts": 16, "top_k": 4, "granularity": 4}),
    (models.llama, "qwen2_moe", {"num_experts": 4, "top_k": 2, "shared_experts": 1}),
])
def test_cli_streams_fine_grained_and_shared_experts(make, arch, args, tmp_path, moeify_main):
    """The streamed write (Switch layers made one at a time from the dense weights) writes
    what convert + save write: fine-grained slices, shared experts and their gate."""
    torch.manual_seed(0)
    randomize(make()).save_pretrained(tmp_path / "src")
    options = [x for name, value in args.items()
               for x in (MoEConfig.__dataclass_fields__[name].metadata["cli"][0], str(value))]
    result = moeify_main("convert", tmp_path / "src", *options, "--noise", "0.5", "--format",
                         "hf", "--hf-arch", arch, "--out", tmp_path / "cli", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["hf"]["model_class"] == {"qwen3_moe": "Qwen3MoeForCausalLM",
                                         "qwen2_moe": "Qwen2MoeForCausalLM"}[arch]
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    moe = convert_for(arch, dense, **args)
    save_hf_moe(moe, tmp_path / "memory", arch=arch)
    a, b = _tensors(tmp_path / "cli"), _tensors(tmp_path / "memory")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".shared_expert.down_proj" in k for k in a) == bool(
        args.get("shared_experts"))


def test_hf_arch_without_format_hf_is_refused(tmp_path, moeify_cli, one_line_error):
    one_line_error(moeify_cli("convert", "t5-small", "--random-init", "--hf-arch", "mixtral",
                              "--out", "x", cwd=tmp_path), "add --format hf")
