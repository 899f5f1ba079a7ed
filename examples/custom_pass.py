"""Write a conversion pass of your own and insert it into moeify's pipeline.

The pass below freezes every weight that did not come out of the conversion (a
common upcycling recipe: train only the routers and experts at first). It runs
right after `ReplaceModules`, when the Switch layers are in the model.

    python examples/custom_pass.py
"""

from __future__ import annotations

import transformers

import moeify
from moeify.passes import ProgramPass, ReplaceModules
from moeify.compiler.pipeline import default_pipeline
from moeify.compiler.program import Program
from moeify.switch import SwitchFFN


class FreezeDenseWeights(ProgramPass):
    """Freeze every parameter outside the Switch layers.

    Requires: `ReplaceModules` has run (the model has Switch layers).
    Guarantees: only router and expert parameters have ``requires_grad=True``.
    Preserves the computation: yes.
    """

    def requires(self, program: Program) -> None:
        if not program.layers:
            raise self.fail("no Switch layers yet: insert this pass after ReplaceModules")

    def run(self, program: Program) -> bool:
        moe = {id(p) for m in program.model.modules() if isinstance(m, SwitchFFN)
               for p in m.parameters()}
        for p in program.model.parameters():
            p.requires_grad_(id(p) in moe)
        return True


def main() -> None:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4,
    ))
    config = moeify.MoEConfig(num_experts=4)
    pipeline = default_pipeline()
    position = next(i for i, p in enumerate(pipeline.passes) if isinstance(p, ReplaceModules))
    pipeline.passes.insert(position + 1, FreezeDenseWeights())
    print("pipeline:", " -> ".join(type(p).__name__ for p in pipeline.passes))

    moeify.convert(model, config, pipeline=pipeline)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable parameters: {trainable:,} of {total:,} (routers and experts only)")


if __name__ == "__main__":
    main()
