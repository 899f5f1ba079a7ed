"""Dispatch and combine: the sorted path's gathers and their gradients."""

import torch

from moeify.config import Gate
from moeify.switch.dispatch import (
    Sizes,
    combine_padded,
    combine_sorted,
    dispatch_padded,
    dispatch_sorted,
    gather_rows,
    sort_by_expert,
)
from moeify.switch.routing import route


def test_gather_rows_gradient_is_the_scatter_it_replaces():
    torch.manual_seed(0)
    src = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([2, 0, 4, 2, 1])  # 4 = len(src): a zero row; row 2 read twice
    inverse = torch.tensor([[1, 5], [4, 5], [0, 3], [5, 5]])  # readers of each row, 5 = none
    out = gather_rows(src, index, inverse)
    torch.testing.assert_close(out[2], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(out[[0, 1, 3, 4]], src[[2, 0, 2, 1]])
    assert torch.autograd.gradcheck(lambda s: gather_rows(s, index, inverse), (src,))
    out.sum().backward()  # an expanded gradient
    torch.testing.assert_close(src.grad[:, 0], torch.tensor([1.0, 1, 2, 0], dtype=torch.float64))


def test_sorted_and_padded_paths_agree_with_gradients_for_any_top_k():
    torch.manual_seed(1)
    G, T, d, E, C = 3, 10, 4, 4, 3
    for k in (1, 2, 3, 4):
        logits = torch.randn(G, T, E)
        routing = route(logits, num_experts=E, top_k=k, expert_capacity=C, gate=Gate.SOFTMAX)
        assert not routing.kept.all()  # something drops
        sizes = Sizes(E, C, T, k)
        x = torch.randn(G, T, d, dtype=torch.float64, requires_grad=True)
        w = torch.randn(E, d, d, dtype=torch.float64)

        def padded(x):
            buffers = dispatch_padded(x, routing, sizes)  # [E, G, C, d]
            return combine_padded(torch.einsum("egcd,edf->egcf", buffers, w), routing, sizes)

        def sorted_(x):
            a = sort_by_expert(routing, sizes)
            rows = dispatch_sorted(x.flatten(0, 1), a, k)
            expert = torch.repeat_interleave(torch.arange(E), torch.tensor(a.counts))
            out = torch.einsum("nd,ndf->nf", rows, w[expert])
            return combine_sorted(out, routing, a, x.flatten(0, 1)).view(G, T, d)

        torch.testing.assert_close(sorted_(x), padded(x))
        g_sorted, = torch.autograd.grad(sorted_(x).square().sum(), x)
        g_padded, = torch.autograd.grad(padded(x).square().sum(), x)
        torch.testing.assert_close(g_sorted, g_padded)
        assert torch.autograd.gradcheck(sorted_, (x,))


def test_expert_block_is_the_one_experts_per_rank_rule():
    import pytest

    from moeify.compiler.plan import ShardingPlan
    from moeify.errors import MoEError
    from moeify.switch import expert_block

    assert [list(expert_block(8, r, 4)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert expert_block(4, 0, 1) == range(4)
    with pytest.raises(MoEError, match="layer.x has 6 experts, which do not divide over "
                                       "ep=4: use an ep size that divides num_experts"):
        expert_block(6, 0, 4, who="layer.x", over="ep=4", fix="an ep size")
    with pytest.raises(MoEError, match="rank 2 is not in a group of 2"):
        expert_block(4, 2, 2)
    plan = ShardingPlan(num_experts=8, params=())
    assert [plan.experts_of_rank(r, 2) for r in range(2)] == [expert_block(8, r, 2)
                                                              for r in range(2)]
