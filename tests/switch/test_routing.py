"""Hand-sized routing cases with literal expected dispatch."""

import math

import pytest
import torch

from moeify.config import Gate, Scoring
from moeify.switch.dispatch import Sizes, slot_tokens
from moeify.switch.routing import expert_capacity, route, top_experts


def logits_choosing(choices, num_experts):
    """Logits whose ranking puts the listed experts first, in order, for each token."""
    rows = []
    for ranked in choices:
        row = [0.0] * num_experts
        for rank, e in enumerate(ranked):
            row[e] = 4.0 - rank
        rows.append(row)
    return torch.tensor([rows])  # [1, T, E]


@pytest.mark.parametrize(
    ("tokens", "experts", "factor", "k", "minimum", "expected"),
    [
        # Every expected value is worked out by hand: C = min(T, max(min, ceil(cf*k*T/E))).
        (512, 8, 1.25, 1, 4, 80),  # 1.25 * 512 / 8 = 80 exactly
        (10, 4, 1.0, 1, 1, 3),  # 2.5 -> 3: ceil, not floor (2) or round-half-even (2)
        (7, 3, 1.3, 1, 1, 4),  # 3.03 -> 4
        (2048, 64, 1.25, 1, 4, 40),  # Switch-Base: 1.25 * 32 = 40
        # float error: 1.1 * 100 / 10 evaluates to 11.000000000000002, whose ceil is 12
        (100, 10, 1.1, 1, 1, 11),
        (50, 5, 1.1, 1, 1, 11),  # 1.1 * 50 / 5: the same 11.000000000000002
        (20, 2, 1.1, 1, 1, 11),
        # top-2 doubles the slots
        (10, 4, 1.0, 2, 1, 5),  # 2 * 2.5 = 5 (top-1 would give 3)
        (100, 7, 2.0, 2, 4, 58),  # 2 * 2 * 100 / 7 = 57.14 -> 58
        (64, 8, 1.25, 2, 4, 20),  # 2 * 10 = 20
        # the min_capacity floor
        (16, 8, 0.5, 1, 4, 4),  # 1 -> 4
        (64, 8, 1.0, 1, 9, 9),  # 8 -> 9
        (64, 8, 1.0, 1, 8, 8),  # 8: the floor is reached, not exceeded
        # never more than the group holds (the tokens_per_group cap), even over min_capacity
        (4, 2, 4.0, 1, 1, 4),  # 8 -> 4
        (1, 2, 1.0, 1, 4, 1),  # 0.5 -> 1, floor 4 -> cap 1
        (10, 2, 1.0, 2, 1, 10),  # top-2 at factor 1 over 2 experts: 10 -> 10
        (6, 4, 1.0, 2, 16, 6),  # floor 16 -> cap 6
    ],
)
def test_expert_capacity(tokens, experts, factor, k, minimum, expected):
    got = expert_capacity(
        tokens, num_experts=experts, capacity_factor=factor, top_k=k, min_capacity=minimum
    )
    assert got == expected


def test_expert_capacity_lives_in_the_config_and_is_re_exported():
    import moeify.config
    import moeify.switch

    assert moeify.switch.expert_capacity is moeify.config.expert_capacity is expert_capacity


def test_the_float_rounding_case_is_real():
    # The premise of the (100, 10, 1.1) and (50, 5, 1.1) cases above: computed in the
    # formula's order, the even share lands just above 11, so an unguarded ceil gives 12.
    assert math.ceil(1.1 * 1 * 100 / 10) == 12 and math.ceil(1.1 * 1 * 50 / 5) == 12


def test_top1_earlier_tokens_claim_slots_and_overflow_is_dropped():
    # Six tokens, three experts, two slots each. Tokens 0, 1, 2, 5 want expert 0.
    logits = logits_choosing([[0], [0], [0], [1], [2], [0]], 3)
    r = route(logits, num_experts=3, top_k=1, expert_capacity=2, gate=Gate.SOFTMAX)
    assert r.expert_index[0, :, 0].tolist() == [0, 0, 0, 1, 2, 0]
    assert r.position[0, :, 0].tolist() == [0, 1, 2, 0, 0, 3]
    assert r.kept[0, :, 0].tolist() == [True, True, False, True, True, False]
    top_prob = torch.softmax(logits, -1).amax(-1)[0]
    expected = top_prob * torch.tensor([1.0, 1, 0, 1, 1, 0])
    torch.testing.assert_close(r.combine_weights[0, :, 0], expected)
    # Slots: expert 0 <- tokens 0, 1; expert 1 <- token 3, empty; expert 2 <- token 4, empty.
    sizes = Sizes(num_experts=3, expert_capacity=2, tokens_per_group=6, top_k=1)
    assert slot_tokens(r, sizes)[:, 0].tolist() == [[0, 1], [3, 6], [4, 6]]


def test_top2_first_choices_fill_capacity_before_second_choices():
    # Four tokens, three experts, two slots each. First choices: 0, 0, 1, 1.
    logits = logits_choosing([[0, 1], [0, 2], [1, 0], [1, 2]], 3)
    r = route(logits, num_experts=3, top_k=2, expert_capacity=2, gate=Gate.SOFTMAX)
    assert r.expert_index[0].tolist() == [[0, 1], [0, 2], [1, 0], [1, 2]]
    # Expert 0 is full of first choices (tokens 0, 1), so token 2's second choice drops;
    # expert 1 likewise for token 0's second choice. Expert 2 takes tokens 1 and 3.
    assert r.kept[0].tolist() == [[True, False], [True, True], [True, False], [True, True]]
    assert r.position[0].tolist() == [[0, 2], [1, 0], [0, 2], [1, 1]]
    sizes = Sizes(num_experts=3, expert_capacity=2, tokens_per_group=4, top_k=2)
    assert slot_tokens(r, sizes)[:, 0].tolist() == [[0, 1], [2, 3], [1, 3]]
    # Softmax gate at top-2: the pair renormalized (GShard), dropped choices weigh 0.
    p = torch.softmax(logits, -1)[0]
    pair = p.gather(-1, r.expert_index[0])
    expected = pair / pair.sum(-1, keepdim=True) * r.kept[0]
    torch.testing.assert_close(r.combine_weights[0], expected)


def test_normalized_gate_weights_sum_to_one_over_kept_choices():
    logits = logits_choosing([[0, 1], [0, 2], [1, 0], [1, 2]], 3)
    r = route(logits, num_experts=3, top_k=2, expert_capacity=2, gate=Gate.NORMALIZED)
    assert r.combine_weights[0].sum(-1).tolist() == pytest.approx([1.0] * 4)
    assert r.combine_weights[0, 0, 1].item() == 0.0  # dropped second choice
    r1 = route(logits, num_experts=3, top_k=1, expert_capacity=1, gate=Gate.NORMALIZED)
    assert r1.combine_weights[0, :, 0].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_random_routing_drops_second_choice_by_uniform_sample():
    # p1 = p2 for token 0 (g2 = 0.5, always kept: 2 * 0.5 = 1 > u); token 1 has g2 ~ 0.
    logits = torch.tensor([[[2.0, 2.0, -9.0], [9.0, -9.0, -8.0]]])
    uniform = torch.tensor([[0.99, 0.01]])
    r = route(
        logits, num_experts=3, top_k=2, expert_capacity=2, gate=Gate.SOFTMAX,
        second_uniform=uniform,
    )
    assert r.kept[0].tolist() == [[True, True], [True, False]]
    # An unchosen second choice claims no slot: token 1's first choice is expert 0 and
    # keeps slot 1 after token 0; expert 2 stays empty.
    assert r.position[0, :, 0].tolist() == [0, 1]


def test_groups_route_independently():
    one = logits_choosing([[0], [0], [1]], 2)
    logits = torch.cat([one, one])  # two identical groups
    r = route(logits, num_experts=2, top_k=1, expert_capacity=1, gate=Gate.SOFTMAX)
    assert r.kept[:, :, 0].tolist() == [[True, False, True]] * 2
    sizes = Sizes(num_experts=2, expert_capacity=1, tokens_per_group=3, top_k=1)
    assert slot_tokens(r, sizes).tolist() == [[[0], [0]], [[2], [2]]]


def test_top_k_any_k_fills_slots_by_choice_rank_then_position():
    # Four tokens, four experts, k = 3, two slots each. Choices (best first):
    # t0: 0, 1, 2   t1: 0, 2, 3   t2: 1, 0, 3   t3: 0, 1, 2
    logits = logits_choosing([[0, 1, 2], [0, 2, 3], [1, 0, 3], [0, 1, 2]], 4)
    r = route(logits, num_experts=4, top_k=3, expert_capacity=2, gate=Gate.SOFTMAX)
    assert r.expert_index[0].tolist() == [[0, 1, 2], [0, 2, 3], [1, 0, 3], [0, 1, 2]]
    # Rank 1 first: expert 0 <- t0, t1 (t3's first choice drops), expert 1 <- t2. Rank 2:
    # expert 1 <- t0 (full now), expert 2 <- t1, expert 0 full (t2's drops), expert 1 full
    # (t3's drops). Rank 3: expert 2 <- t0 (full now), expert 3 <- t1, t2; t3's expert 2 drops.
    assert r.kept[0].tolist() == [[True, True, True], [True, True, True],
                                  [True, False, True], [False, False, False]]
    assert r.position[0][r.kept[0]].tolist() == [0, 1, 1, 1, 0, 0, 0, 1]
    # The softmax gate at k >= 2 renormalizes over the k chosen (dropped ones weigh 0).
    p = torch.softmax(logits, -1)[0]
    chosen = p.gather(-1, r.expert_index[0])
    torch.testing.assert_close(r.combine_weights[0],
                               chosen / chosen.sum(-1, keepdim=True) * r.kept[0])
    # the capacity grows with k: ceil(cf * k * T / E)
    assert expert_capacity(64, num_experts=128, capacity_factor=1.25, top_k=8) == 5


def test_top_experts_breaks_ties_to_the_lower_index_at_every_rank():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.4, 0.1, 0.4]])
    assert top_experts(probs, 3).tolist() == [[0, 1, 2], [1, 3, 0]]
    assert top_experts(probs, 1).tolist() == [[0], [1]]
    # random routing decides a second expert: top-2 only
    with pytest.raises(ValueError, match="top_k=2"):
        route(torch.randn(1, 2, 4), num_experts=4, top_k=3, expert_capacity=2,
              gate=Gate.SOFTMAX, second_uniform=torch.rand(1, 2))


def test_sigmoid_scores_select_and_weigh_the_experts():
    # One token, four experts: sigmoid scores s = sigmoid(logits), chosen by score.
    logits = torch.tensor([[[2.0, -1.0, 0.5, 1.0]]])
    s = [1 / (1 + math.exp(-v)) for v in (2.0, -1.0, 0.5, 1.0)]  # 0.881, 0.269, 0.622, 0.731
    r = route(logits, num_experts=4, top_k=2, expert_capacity=1, gate=Gate.SOFTMAX,
              scoring=Scoring.SIGMOID)
    assert r.expert_index[0, 0].tolist() == [0, 3]
    torch.testing.assert_close(r.router_probs[0, 0], torch.tensor(s))  # the scores, unsummed
    # softmax gate at k = 2: the two scores renormalized over the pair
    expected = torch.tensor([s[0], s[3]]) / (s[0] + s[3])
    torch.testing.assert_close(r.combine_weights[0, 0], expected)
    # top-1: the raw score (Switch's rule, with a sigmoid score)
    r1 = route(logits, num_experts=4, top_k=1, expert_capacity=1, gate=Gate.SOFTMAX,
               scoring=Scoring.SIGMOID)
    torch.testing.assert_close(r1.combine_weights[0, 0], torch.tensor([s[0]]))
    # normalized: over the kept choices (here both)
    rn = route(logits, num_experts=4, top_k=3, expert_capacity=1, gate=Gate.NORMALIZED,
               scoring=Scoring.SIGMOID)
    torch.testing.assert_close(rn.combine_weights[0, 0],
                               torch.tensor([s[0], s[3], s[2]]) / (s[0] + s[3] + s[2]))


@pytest.mark.parametrize("scoring", [Scoring.SOFTMAX, Scoring.SIGMOID])
def test_raw_gate_keeps_each_choices_own_score_at_any_k(scoring):
    logits = logits_choosing([[0, 1, 2], [2, 0, 1]], 4)
    r = route(logits, num_experts=4, top_k=3, expert_capacity=1, gate=Gate.RAW,
              scoring=scoring)
    scores = torch.softmax(logits, -1) if scoring == Scoring.SOFTMAX else torch.sigmoid(logits)
    # one slot per expert: the first choices (experts 0, 2) and token 0's second (expert 1)
    # are kept and weigh their own score, never renormalized; the dropped ones weigh 0
    expected = scores[0].gather(-1, r.expert_index[0]) * r.kept[0]
    torch.testing.assert_close(r.combine_weights[0], expected)
    assert r.kept[0].tolist() == [[True, True, False], [True, False, False]]


def test_routed_scaling_multiplies_every_combine_weight():
    logits = logits_choosing([[0, 1], [0, 2], [1, 0], [1, 2]], 3)
    base = route(logits, num_experts=3, top_k=2, expert_capacity=2, gate=Gate.SOFTMAX)
    scaled = route(logits, num_experts=3, top_k=2, expert_capacity=2, gate=Gate.SOFTMAX,
                   routed_scaling=2.5)
    torch.testing.assert_close(scaled.combine_weights, 2.5 * base.combine_weights)
    assert torch.equal(scaled.kept, base.kept)


def test_selection_bias_chooses_but_the_weights_keep_the_unbiased_scores():
    logits = torch.tensor([[[1.0, 0.0, -1.0], [1.0, 0.0, -1.0]]])
    s = torch.sigmoid(logits)
    # a bias pushing expert 0 below every other choice: the biased scores are negative
    bias = torch.tensor([-3.0, -0.5, -0.5])
    r = route(logits, num_experts=3, top_k=2, expert_capacity=2, gate=Gate.RAW,
              scoring=Scoring.SIGMOID, selection_bias=bias)
    # biased: [0.73-3, 0.5-0.5, 0.27-0.5] = [-2.27, 0, -0.23]: experts 1, then 2
    assert r.expert_index[0].tolist() == [[1, 2], [1, 2]]
    torch.testing.assert_close(r.combine_weights[0], s[0][:, [1, 2]])
    torch.testing.assert_close(r.router_probs, s)  # the record keeps the unbiased scores


def test_biased_selection_excludes_taken_experts_below_any_score_with_ties_low():
    # every biased score below -1: excluding with -1 would pick a taken expert again
    scores = torch.tensor([[-5.0, -5.0, -7.0, -5.0]])
    assert top_experts(scores, 3, excluded=float("-inf")).tolist() == [[0, 1, 3]]
    assert top_experts(scores, 3).tolist() == [[0, 0, 0]]  # why -inf is needed there
