"""The conversion passes, installed as ``moeify.passes``.

Each pass is a ``torch.fx.passes.infra`` ``PassBase`` over a `moeify.program.Program`
and says in its docstring what it requires, what it guarantees and whether it preserves
the computation. `default_pipeline` composes them in order::

    FindFFN -> SelectSites -> UpcycleExperts -> InsertRouter -> FixCapacity
            -> AttachAuxLosses -> AnnotateSharding

A pass of your own is a `ProgramPass` subclass inserted into the manager's list
(``examples/custom_pass.py``).
"""

from moeify.passes._base import ProgramPass
from moeify.passes.annotate_sharding import AnnotateSharding, ParamSharding, ShardingPlan
from moeify.passes.aux_losses import AttachAuxLosses, clear_routing_records
from moeify.passes.find import FindFFN
from moeify.passes.find_ffn import FFNAnalysis, FFNSite, Rejection, find_ffn_sites
from moeify.passes.fix_capacity import FixCapacity
from moeify.passes.insert_router import Bypass, InsertRouter
from moeify.passes.select import SelectSites, select_sites
from moeify.passes.upcycle import UpcycleExperts, dense_weights
from moeify.pipeline import default_pipeline

__all__ = [
    "AnnotateSharding",
    "AttachAuxLosses",
    "Bypass",
    "FFNAnalysis",
    "FFNSite",
    "FindFFN",
    "FixCapacity",
    "InsertRouter",
    "ParamSharding",
    "ProgramPass",
    "Rejection",
    "SelectSites",
    "ShardingPlan",
    "UpcycleExperts",
    "clear_routing_records",
    "default_pipeline",
    "dense_weights",
    "find_ffn_sites",
    "select_sites",
]
