"""The pass runner: passes in order, a failing pass named without parsing error text."""

import pytest

import moeify
from moeify import MoEConfig
from moeify.passes import ProgramPass
from moeify.compiler.pipeline import PassError, Pipeline, default_pipeline
from moeify.compiler.program import Program
from tests import models


class Broken(ProgramPass):
    def run(self, program):
        raise KeyError("no such thing")


class Records(ProgramPass):
    def __init__(self, seen):
        self.seen = seen

    def run(self, program):
        self.seen.append(len(program.selected))
        return False


def test_the_failing_pass_is_named_and_the_cause_kept():
    with pytest.raises(PassError, match=r"pass Broken failed: KeyError: 'no such thing'") as info:
        Pipeline([Broken()])(Program(models.gpt2(), MoEConfig()))
    assert isinstance(info.value, moeify.MoEError) and isinstance(info.value.__cause__, KeyError)
    assert info.value.pass_name == "Broken"


def test_a_pass_of_ones_own_runs_where_it_is_inserted():
    seen = []
    pipeline = default_pipeline()
    pipeline.passes.insert(2, Records(seen))  # after FindFFN and SelectSites
    moeify.convert(models.gpt2(), MoEConfig(num_experts=4), pipeline=pipeline)
    assert seen == [2]
    assert "SelectSites -> Records -> AnnotateSharding" in repr(pipeline)


def test_a_dict_config_is_refused_before_any_pass():
    with pytest.raises(moeify.MoEError, match="config must be a moeify.MoEConfig, got dict"):
        moeify.convert(models.gpt2(), {"num_experts": 4})
