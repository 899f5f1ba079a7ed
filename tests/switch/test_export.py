"""The layer traces (fx, export), compiles with fullgraph, and exports to ONNX with
static capacity dims that ONNX Runtime runs to the same numbers."""

import warnings

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeify import MoEConfig, SwitchFFN
from moeify.config import Gate
from moeify.switch import route
from moeify.switch.dispatch import Sizes, slot_destinations

E, D, F_, T = 4, 8, 16, 10


def make_layer(top_k=2, training=False):
    torch.manual_seed(0)
    config = MoEConfig(num_experts=E, top_k=top_k, capacity_factor=0.6, eval_capacity_factor=0.6,
                       min_capacity=1, jitter_eps=0.0, expert_dropout=0.0)
    layer = SwitchFFN(D, F_, config, seq_len=T, activation="silu", gated=True, bias=True)
    with torch.no_grad():
        layer.router.weight.normal_()
    return layer.train(training)


def test_symbolic_trace_gives_one_graph_that_computes_the_same():
    layer = make_layer().eval()
    x = torch.randn(3, T, D)
    gm = torch.fx.symbolic_trace(layer)
    targets = {str(n.target) for n in gm.graph.nodes}
    assert "index_select" in targets and "bmm" in "".join(targets)  # static path, no loop
    torch.testing.assert_close(gm(x), layer(x))


def test_torch_export_with_dynamic_batch():
    layer = make_layer().eval()
    x = torch.randn(3, T, D)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(layer, (x,), dynamic_shapes=({0: batch},), strict=False)
    for b in (1, 5):
        xb = torch.randn(b, T, D)
        torch.testing.assert_close(ep.module()(xb), layer(xb))


@pytest.mark.parametrize("top_k", [1, 2])
def test_compile_fullgraph_matches_eager_and_trains(top_k):
    layer = make_layer(top_k=top_k)
    x = torch.randn(2, T, D)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    layer.eval()
    torch.testing.assert_close(compiled(x), layer(x))
    layer.train()
    y = compiled(x)
    y.square().mean().backward()
    assert layer.router.weight.grad is not None and layer.experts.w_in.grad.abs().sum() > 0
    assert layer.last_routing is not None  # losses recorded under compile too


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, E), cap=st.integers(1, 4))
def test_scatter_destinations_are_distinct(seed, k, cap):
    torch.manual_seed(seed)
    logits = torch.randn(3, T, E)
    uniform = torch.rand(3, T) if k == 2 else None  # GShard's random second expert
    r = route(logits, num_experts=E, top_k=k, expert_capacity=cap, gate=Gate.SOFTMAX,
              second_uniform=uniform)
    dest = slot_destinations(r, Sizes(E, cap, T, k))
    for row in dest:
        assert len(set(row.tolist())) == row.numel()


def test_onnx_export_static_capacity_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    layer = make_layer().eval()
    C = layer.expert_capacity
    path = tmp_path / "switch.onnx"
    x = torch.randn(3, T, D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            layer, (x,), str(path), dynamo=True, verbose=False,
            input_names=["hidden_states"], output_names=["output"],
            dynamic_shapes={"hidden_states": {0: torch.export.Dim("batch")}},
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = [
        [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
        for v in inferred.graph.value_info
    ]
    # The slot table is [E, batch, C] and the expert buffer [E, C*batch, d]: the capacity
    # is a constant in the graph while the batch axis stays symbolic.
    assert [E, "batch", C] in shapes, shapes
    assert [E, f"{C}*batch", D] in shapes, shapes
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (3, 7):
        xb = torch.randn(batch, T, D)
        (got,) = session.run(None, {"hidden_states": xb.numpy()})
        want = layer(xb)
        assert layer.last_routing.dropped_fraction > 0  # drops are part of the check
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compile_fullgraph_with_inductor():
    layer = make_layer(top_k=1).eval()
    x = torch.randn(2, T, D)
    compiled = torch.compile(layer, fullgraph=True)  # default backend: inductor, C++ on CPU
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
