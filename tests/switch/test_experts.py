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


def _record_ops(fn):
    """Run fn under a dispatch mode; (op name, input dtypes, output shape, dtype) per call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if isinstance(out, torch.Tensor):
                calls.append((func.overloadpacket.__name__, [t.dtype for t in tensors],
                              tuple(out.shape), out.dtype))
            return out

    with Record():
        result = fn()
    return result, calls


@pytest.mark.parametrize("bias", [False, True])
def test_segment_linear_under_autocast_is_nn_linear_per_expert(bias):
    """Matmuls in bf16, gradients in float32, equal to nn.Linear per expert under the same
    autocast, and no full-size bf16 copy of the weights or of their gradient."""
    torch.manual_seed(0)
    E, i, o, counts = 4, 32, 48, [5, 0, 9, 2]
    w = torch.randn(E, i, o, requires_grad=True)
    b = torch.randn(E, o, requires_grad=True) if bias else None
    x = torch.randn(sum(counts), i, requires_grad=True)
    grad = torch.randn(sum(counts), o)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = segment_linear(x, w, b, counts)
        y.backward(grad)
        return y

    y, calls = _record_ops(run)
    assert y.dtype == torch.bfloat16
    matmuls = [c for c in calls if c[0] in ("mm", "addmm", "bmm")]
    assert matmuls and all(set(dtypes) == {torch.bfloat16} for _, dtypes, _, _ in matmuls)
    assert not [c for c in calls if c[2] == (E, i, o) and c[3] == torch.bfloat16]
    assert w.grad.dtype == torch.float32 and (b is None or b.grad.dtype == torch.float32)

    linears = [torch.nn.Linear(i, o, bias=bias) for _ in range(E)]
    with torch.no_grad():
        for e, lin in enumerate(linears):
            lin.weight.copy_(w[e].T)
            if bias:
                lin.bias.copy_(b[e])
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.cat([lin(part) for lin, part in zip(linears, x_ref.split(counts))])
    want.backward(grad)
    assert want.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    for e, lin in enumerate(linears):
        torch.testing.assert_close(w.grad[e], lin.weight.grad.T, rtol=0, atol=0)
        if bias:
            torch.testing.assert_close(b.grad[e], lin.bias.grad, rtol=0, atol=0)
    assert w.grad[1].abs().sum() == 0  # expert without rows
