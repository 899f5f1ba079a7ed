"""The conversion passes, installed as ``moeify.passes``.

Each pass is a ``torch.fx.passes.infra`` ``PassBase`` over a `moeify.compiler.program.Program`
and says in its docstring what it requires, what it guarantees and whether it preserves
the computation. `moeify.plan` runs the analysis passes, `moeify.apply` the
transforming ones (`moeify.compiler.pipeline` assembles them)::

    analysis:   FindFFN -> SelectSites -> AnnotateSharding
    transform:  BuildSwitchLayers -> ReplaceModules -> FixCapacity -> RegisterAuxLossHook
                -> RegisterPaddingMask

A pass of your own is a `ProgramPass` subclass inserted into a pipeline's list
(``examples/custom_pass.py``). The records the passes hand each other (`FFNSite`,
`Rejection`, `ShardingPlan`, ...) live in `moeify.compiler.plan`.
"""

from moeify.passes._base import ProgramPass
from moeify.passes.annotate_sharding import AnnotateSharding
from moeify.passes.aux_loss_hook import RegisterAuxLossHook, clear_routing_records
from moeify.passes.build_layers import BuildSwitchLayers
from moeify.passes.find_ffn import FindFFN
from moeify.passes.fix_capacity import FixCapacity
from moeify.passes.match_ffn import find_ffn_sites
from moeify.passes.padding_mask import RegisterPaddingMask
from moeify.passes.replace_modules import Bypass, ReplaceModules
from moeify.passes.select import SelectSites, select_sites

__all__ = [
    "AnnotateSharding",
    "BuildSwitchLayers",
    "Bypass",
    "FindFFN",
    "FixCapacity",
    "ProgramPass",
    "RegisterAuxLossHook",
    "RegisterPaddingMask",
    "ReplaceModules",
    "SelectSites",
    "clear_routing_records",
    "find_ffn_sites",
    "select_sites",
]
