"""Cross-checks against a peer: HF transformers' SwitchTransformers."""

import pytest
import torch
from transformers import SwitchTransformersConfig
from transformers.models.switch_transformers import modeling_switch_transformers as hf

from moeify import MoEConfig, SwitchFFN
from moeify.config import Gate
from moeify.switch import load_balancing_loss, route, router_z_loss

NO_NOISE = dict(jitter_eps=0.0, expert_dropout=0.0)


@pytest.mark.parametrize("seed", range(3))
def test_losses_equal_hf_loss_functions(seed):
    torch.manual_seed(seed)
    logits = torch.randn(4, 32, 8) * 3
    probs = torch.softmax(logits, -1)
    top1 = probs.argmax(-1)
    torch.testing.assert_close(
        load_balancing_loss(probs, top1, num_experts=8), hf.load_balancing_loss_func(probs, top1)
    )
    torch.testing.assert_close(router_z_loss(logits), hf.router_z_loss_func(logits))


def hf_config(d, f, experts, capacity):
    return SwitchTransformersConfig(
        d_model=d, d_ff=f, num_experts=experts, expert_capacity=capacity,
        router_jitter_noise=0.0, dropout_rate=0.0, dense_act_fn="relu", router_bias=False,
    )


def test_top1_routing_with_capacity_equals_hf_router():
    torch.manual_seed(0)
    E, d, T, C = 6, 16, 40, 5  # capacity 5 of an even share of 6.7: tokens drop
    router = hf.SwitchTransformersTop1Router(hf_config(d, 32, E, C)).eval()
    torch.nn.init.normal_(router.classifier.weight)
    x = torch.randn(3, T, d)
    hf_mask, hf_prob, hf_logits = router(x.clone())
    logits = x @ router.classifier.weight.T
    ours = route(logits, num_experts=E, top_k=1, expert_capacity=C, gate=Gate.SOFTMAX)
    torch.testing.assert_close(ours.router_logits, hf_logits)
    mask = torch.nn.functional.one_hot(ours.expert_index[..., 0], E) * ours.kept
    assert (mask.sum() < 3 * T).item()  # some tokens were dropped
    assert torch.equal(mask, hf_mask)
    torch.testing.assert_close(ours.combine_weights, hf_prob * hf_mask.sum(-1, keepdim=True))


def test_layer_equals_hf_sparse_mlp_with_same_weights_and_capacity():
    torch.manual_seed(1)
    E, d, f, T = 4, 16, 32, 24
    config = MoEConfig(num_experts=E, capacity_factor=0.8, eval_capacity_factor=0.8,
                       min_capacity=1, **NO_NOISE)
    ours = SwitchFFN(d, f, config, seq_len=T).eval()
    with torch.no_grad():
        ours.router.weight.normal_()
    C = ours.expert_capacity
    assert C == 5  # by hand: ceil(0.8 * 24 / 4) = ceil(4.8); HF takes C as given
    theirs = hf.SwitchTransformersSparseMLP(hf_config(d, f, E, C)).eval()
    with torch.no_grad():
        theirs.router.classifier.weight.copy_(ours.router.weight)
        for e in range(E):
            theirs.experts[f"expert_{e}"].wi.weight.copy_(ours.experts.w_in[e].T)
            theirs.experts[f"expert_{e}"].wo.weight.copy_(ours.experts.w_out[e].T)
        x = torch.randn(3, T, d)
        y = ours(x)
        assert ours.last_routing.dropped_fraction > 0
        torch.testing.assert_close(y, theirs(x.clone()), rtol=1e-5, atol=1e-6)
        hf_mask, _, _ = theirs.router(x.clone())  # [G, T, E] one-hot of kept tokens
    # The statistics the layer records agree with HF's router on the same input.
    record = ours.last_routing
    assert record.expert_capacity == C
    assert hf_mask.sum(1).max().item() == C  # an expert's slots fill up in some sequence
    assert record.tokens_per_expert.tolist() == hf_mask.sum((0, 1)).tolist()
    hf_dropped = 1 - hf_mask.sum().item() / (3 * T)
    assert record.dropped_fraction.item() == pytest.approx(hf_dropped, abs=1e-6)
