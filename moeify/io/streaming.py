"""The tensors of Switch layers, one layer in memory at a time: what the streamed writers write.

t5-base with 64 experts is ~15 GB of float32 weights: more than fits beside the dense
model on a 24 GB machine if built at once. A streamed write (`moeify.write`, formats
``torch`` and ``hf`` mixtral / qwen2_moe / qwen3_moe) applies the plan with the Switch
layers left on the meta device (each site's dense weights kept in the `Program`), then
writes tensor by tensor: non-expert weights straight from the model, each Switch layer's
tensors from `moeify.switch.upcycled_tensors` when the writer reaches them, dropped at the
next layer.
Plain copies are never materialized: the dense matrix is written E times.
`upcycled_tensors` is also what ``moeify.convert`` builds layers from, so the output is
the one ``convert`` + a save would write.

Peak memory: the dense model plus one Switch layer (less for plain copies).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from moeify.compiler.program import Program
from moeify.errors import MoEError
from moeify.switch import TensorSource, upcycled_tensors


class LayerTensors:
    """Each Switch layer's tensors by name (``experts.w_in``, ``router.expert_bias``, ...),
    one layer at a time: its parameters and persistent buffers, its state dict.

    A layer in memory gives its own; a layer on the meta device (a lazy apply) is
    made from its dense weights by `upcycled_tensors` when first asked, and dropped when
    another layer is asked for. ``program``: the `Program` of the lazy apply (None: every
    layer is in memory).
    """

    def __init__(self, model: nn.Module, program: Program | None = None) -> None:
        self.model, self.program = model, program
        self.paths = [] if program is None else [site.path for site in program.selected]
        self.current: tuple[str, dict[str, TensorSource]] | None = None

    def get(self, path: str) -> dict[str, TensorSource]:
        """The tensors of the Switch layer at ``path``, by name within the layer."""
        if self.current is not None and self.current[0] == path:
            return self.current[1]
        self.current = None  # free the previous layer first
        layer = self.model.get_submodule(path)
        if layer.router.weight.is_meta:
            if self.program is None or path not in self.program.dense:
                raise MoEError(f"Switch layer {path} has no weights (meta device)")
            site = next(s for s in self.program.selected if s.path == path)
            values = upcycled_tensors(self.program.dense[path], self.program.config,
                                      path=path, activation=site.activation)
        else:
            values = {n: TensorSource(t) for n, t in layer.state_dict().items()}
        self.current = (path, values)
        return values

    def fetch(self, name: str) -> Iterable[torch.Tensor]:
        """The chunks of the meta tensor ``name`` (a full model name: a parameter or a
        persistent buffer), in its dtype: the ``fetch`` of `moeify.io.checkpoint.save`."""
        path = next((p for p in self.paths if name.startswith(p + ".")), None)
        if path is None:
            raise MoEError(f"{name} is on the meta device but belongs to no converted site")
        key = name[len(path) + 1:]
        dtype = self.model.get_submodule(path).state_dict(keep_vars=True)[key].dtype
        return [chunk.to(dtype) for chunk in self.get(path)[key].chunks()]
