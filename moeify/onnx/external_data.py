"""Where an ONNX graph keeps its weights: inside the file, or beside it as external data
(protobuf cannot serialize a message past 2 GiB). One rule for every writer: the single
graph exporter, the generation graphs, the optimizer and the quantizer."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

# heavier graphs keep their weights outside (a margin under protobuf's 2 GiB limit)
EXTERNAL_DATA_BYTES = 2**31 - 2**26


def graph_bytes(program) -> int:
    """Bytes of the constant initializers of an exported ``program`` (an ONNX IR model)."""
    return sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
               if v.const_value is not None)


def external_data_name(program, path: Path, external_data: bool | None) -> str | None:
    """The external data file for the graph ``program`` saved at ``path``
    (``<name>.data``), or None: when ``external_data`` says so, by default when the graph
    is over the 2 GB protobuf can hold."""
    large = graph_bytes(program) > EXTERNAL_DATA_BYTES if external_data is None else external_data
    return f"{path.name}.data" if large else None


def has_external_data(model_path: str | os.PathLike) -> bool:
    """Whether the graph file keeps weights in external data (read without them)."""
    header = onnx.load(str(model_path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
