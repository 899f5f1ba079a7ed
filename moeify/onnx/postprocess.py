"""Quantize, then optimize, a graph that an export has staged (``--quantize``, ``--optimize``).

`export_onnx` and `export_generation` call `postprocess` on each graph while it is still
in their staging directory, so the destination receives the finished graph or nothing.
Quantization runs first: with ``--quantize-all`` the attention projections are then
quantized (optimizing first would fold them into float32 ``Attention`` nodes); for the
experts alone the order makes no difference (`moeify.onnx.quantize`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from moeify.errors import MoEError, Param

QUANTIZE = {"int4": 4, "int8": 8}


def check_postprocess_args(quantize: str | None, quantize_all: bool) -> None:
    """Refuse ``quantize`` / ``quantize_all`` values before any work."""
    param = Param("quantize")
    if quantize is not None and quantize not in QUANTIZE:
        raise MoEError("{quantize!r} is not one of {allowed}", quantize=param.given(quantize),
                       allowed=", ".join(QUANTIZE))
    if quantize_all and quantize is None:
        raise MoEError("{quantize_all} widens {quantize} to every linear weight: pass {int8} "
                       "(or int4) with it", quantize_all=Param("quantize_all"), quantize=param,
                       int8=param.given("int8"))


def postprocess(path: Path, *, optimize: bool, quantize: str | None, quantize_all: bool,
                model_type: str | None = None) -> dict[str, Any]:
    """Replace the staged graph at ``path`` by its quantized and/or optimized form;
    returns ``{"quantize": report, "optimize": report}`` for the steps that ran."""
    from moeify.onnx.optimize import optimize_graph
    from moeify.onnx.quantize import quantize_graph

    check_postprocess_args(quantize, quantize_all)
    reports: dict[str, Any] = {}
    if not (optimize or quantize):
        return reports
    steps = []
    if quantize is not None:
        steps.append(("quantize", lambda src, dst: quantize_graph(
            src, dst, bits=QUANTIZE[quantize], scope="all" if quantize_all else "experts")))
    if optimize:
        steps.append(("optimize", lambda src, dst: optimize_graph(src, dst,
                                                                  model_type=model_type)))
    for name, step in steps:
        work = path.parent / f".{path.stem}.{name}"
        work.mkdir()
        try:
            source = work / path.name
            for part in (path, path.with_name(f"{path.name}.data")):  # the graph, its data
                if part.exists():
                    shutil.move(part, work / part.name)
            reports[name] = step(source, path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return reports


def summary(reports: dict[str, Any]) -> str:
    """One line per step that ran, for the command's output."""
    lines = []
    if "quantize" in reports:
        q = reports["quantize"]
        experts = ("" if not q["expert_ratio"] else
                   f", expert weights {q['expert_bytes_before']:,} -> "
                   f"{q['expert_bytes_after']:,} bytes ({q['expert_ratio']:.3f}x)")
        lines.append(f"quantized int{q['bits']} ({q['scope']}, blocks of {q['block_size']}): "
                     f"{q['nodes_quantized']} MatMulNBits{experts}, all weights "
                     f"{q['weight_bytes_before']:,} -> {q['weight_bytes_after']:,} bytes "
                     f"({q['weight_ratio']:.3f}x)")
    if "optimize" in reports:
        o = reports["optimize"]
        fused = ", ".join(f"{op} {n}" for op, n in sorted(o["fusions"].items())) or "none"
        lines.append(f"optimized ({o['model_type']}): fusions {fused}; nodes "
                     f"{o['nodes_before']} -> {o['nodes_after']}")
    return "\n".join(lines)
