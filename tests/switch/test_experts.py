"""Experts: the per-segment matmul and its hand-written backward."""

import pytest
import torch

from _devices import DEVICES
from _op_recorder import record_ops
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [False, True])
def test_segment_linear_under_autocast_is_nn_linear_per_expert(bias, device):
    """Matmuls in bf16, gradients in float32, equal to nn.Linear per expert under the same
    autocast (on the CPU and on a GPU), and no full-size bf16 copy of the weights or of
    their gradient."""
    torch.manual_seed(0)
    E, i, o, counts = 4, 32, 48, [5, 0, 9, 2]
    w = torch.randn(E, i, o, device=device, requires_grad=True)
    b = torch.randn(E, o, device=device, requires_grad=True) if bias else None
    x = torch.randn(sum(counts), i, device=device, requires_grad=True)
    grad = torch.randn(sum(counts), o, device=device)

    def run():
        with torch.autocast(device, dtype=torch.bfloat16):
            y = segment_linear(x, w, b, counts)
        y.backward(grad)
        return y

    y, calls = record_ops(run)
    assert y.dtype == torch.bfloat16
    matmuls = [c for c in calls if c[0] in ("mm", "addmm", "bmm")]
    assert matmuls and all(set(dtypes) == {torch.bfloat16} for _, dtypes, _, _ in matmuls)
    assert not [c for c in calls if c[2] == (E, i, o) and c[3] == torch.bfloat16]
    assert w.grad.dtype == torch.float32 and (b is None or b.grad.dtype == torch.float32)

    linears = [torch.nn.Linear(i, o, bias=bias, device=device) for _ in range(E)]
    with torch.no_grad():
        for e, lin in enumerate(linears):
            lin.weight.copy_(w[e].T)
            if bias:
                lin.bias.copy_(b[e])
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
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


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize(("gated", "bias"), [(False, False), (False, True), (True, False),
                                             (True, True)])
def test_expert_ffn_is_each_experts_ffn_with_its_gradients(activation, gated, bias):
    """The fused per-expert FFN equals the FFN computed layer by layer, and its
    hand-written backward passes gradcheck (experts without rows included)."""
    from moeify.config import Activation
    from moeify.switch.experts import activation_fn, expert_ffn

    torch.manual_seed(1)
    E, d, f, counts = 4, 5, 7, [3, 0, 4, 2]
    make = lambda *shape: torch.randn(*shape, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x = make(sum(counts), d)
    w_in, w_out = make(E, d, f), make(E, f, d)
    w_gate = make(E, d, f) if gated else None
    b_in, b_out = (make(E, f), make(E, d)) if bias else (None, None)
    b_gate = make(E, f) if gated and bias else None
    act = activation_fn(activation)

    def reference(x, w_in, w_out, w_gate, b_in, b_out, b_gate):
        expert = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
        lin = lambda w, b: torch.einsum("ni,nio->no", x, w[expert]) + (  # noqa: E731
            0 if b is None else b[expert])
        a = lin(w_in, b_in)
        h = act(a) if w_gate is None else act(lin(w_gate, b_gate)) * a
        return torch.einsum("nf,nfo->no", h, w_out[expert]) + (0 if b_out is None else b_out[expert])

    def fused(x, w_in, w_out, w_gate, b_in, b_out, b_gate):
        return expert_ffn(x, counts, Activation(activation), w_in, b_in, w_out, b_out,
                          w_gate, b_gate)

    inputs = (x, w_in, w_out, w_gate, b_in, b_out, b_gate)
    torch.testing.assert_close(fused(*inputs), reference(*inputs))
    present = [t for t in inputs if t is not None]

    def only(*tensors):
        it = iter(tensors)
        return fused(*(next(it) if t is not None else None for t in inputs))

    assert torch.autograd.gradcheck(only, present)
    fused(*inputs).sum().backward()  # an expanded gradient; an expert without rows
    assert w_in.grad[1].abs().sum() == 0 and w_in.grad[0].abs().sum() > 0


def test_expert_ffn_under_autocast_is_nn_linear_per_expert():
    """bf16 matmuls, float32 gradients, equal to nn.Linear + activation + nn.Linear per
    expert under the same autocast; no full-size bf16 copy of a weight."""
    from moeify.config import Activation
    from moeify.switch.experts import expert_ffn

    torch.manual_seed(0)
    E, d, f, counts = 3, 16, 24, [5, 0, 9]
    w_in = torch.randn(E, d, f, requires_grad=True)
    w_out = torch.randn(E, f, d, requires_grad=True)
    x = torch.randn(sum(counts), d, requires_grad=True)
    grad = torch.randn(sum(counts), d)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = expert_ffn(x, counts, Activation.GELU, w_in, None, w_out, None)
        y.backward(grad)
        return y

    y, calls = record_ops(run)
    matmuls = [c for c in calls if c[0] in ("mm", "addmm", "bmm")]
    assert matmuls and all(set(dtypes) == {torch.bfloat16} for _, dtypes, _, _ in matmuls)
    assert not [c for c in calls if c[2] in ((E, d, f), (E, f, d)) and c[3] == torch.bfloat16]
    assert w_in.grad.dtype == torch.float32
    ups = [torch.nn.Linear(d, f, bias=False) for _ in range(E)]
    downs = [torch.nn.Linear(f, d, bias=False) for _ in range(E)]
    with torch.no_grad():
        for e in range(E):
            ups[e].weight.copy_(w_in[e].T)
            downs[e].weight.copy_(w_out[e].T)
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.cat([downs[e](torch.nn.functional.gelu(ups[e](part)))
                          for e, part in enumerate(x_ref.split(counts)) if counts[e]])
    want.backward(grad)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-2, atol=1e-2)
    for e in (0, 2):
        torch.testing.assert_close(w_in.grad[e], ups[e].weight.grad.T, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(w_out.grad[e], downs[e].weight.grad.T, rtol=1e-2, atol=1e-2)


def test_weight_gradient_memory_is_reused_only_when_nothing_else_holds_it():
    """Step after step (grads set to None) the expert gradient lands in the same memory;
    a gradient the user kept, or one accumulating, is never written over."""
    from moeify.config import Activation
    from moeify.switch.experts import expert_ffn

    torch.manual_seed(0)
    w_in = torch.randn(4, 8, 16, requires_grad=True)
    w_out = torch.randn(4, 16, 8, requires_grad=True)
    x, counts = torch.randn(10, 8), [3, 3, 2, 2]

    def step():
        expert_ffn(x, counts, Activation.RELU, w_in, None, w_out, None).sum().backward()

    step()
    first = w_in.grad.data_ptr()
    w_in.grad = w_out.grad = None
    step()
    assert w_in.grad.data_ptr() == first  # recycled
    kept = w_in.grad
    w_in.grad = None
    step()
    assert w_in.grad.data_ptr() != kept.data_ptr()  # the user's reference stays intact
    torch.testing.assert_close(w_in.grad, kept)
    step()  # accumulating into the existing .grad
    torch.testing.assert_close(w_in.grad, 2 * kept)
