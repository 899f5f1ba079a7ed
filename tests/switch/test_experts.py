"""Experts: the per-segment matmul and its hand-written backward."""

import pytest
import torch

from moeify.switch.experts import segment_linear


@pytest.mark.parametrize("bias", [False, True])
def test_segment_linear_matches_per_expert_matmuls(bias):
    torch.manual_seed(0)
    counts = [3, 0, 5, 1, 0]  # experts without rows get zero gradients
    x = torch.randn(sum(counts), 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 6, dtype=torch.float64, requires_grad=True) if bias else None
    y = segment_linear(x, w, b, counts)
    expert = torch.repeat_interleave(torch.arange(5), torch.tensor(counts))
    want = torch.einsum("ni,nio->no", x, w[expert]) + (b[expert] if bias else 0)
    torch.testing.assert_close(y, want)
    inputs = (x, w) + ((b,) if bias else ())
    assert torch.autograd.gradcheck(lambda *t: segment_linear(t[0], t[1], t[2] if bias else None,
                                                              counts), inputs)
    y.sum().backward()  # an expanded (zero-stride) gradient
    assert w.grad[1].abs().sum() == 0 and w.grad[0].abs().sum() > 0


def test_segment_linear_follows_autocast():
    x = torch.randn(4, 8)
    w = torch.randn(2, 8, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = segment_linear(x, w, None, [1, 3])
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32
