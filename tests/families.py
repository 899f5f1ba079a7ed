"""Every model family moeify converts, as test cases: a tiny model of it, inputs for it,
and what the analysis should find (sites, FFN kind, the tracer that finds them)."""

from __future__ import annotations

import torch

from tests import models

SEQ = 12


def ids(batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    """Random token ids ``[batch, seq]`` (no pad or eos token), reproducible by seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, models.VOCAB, (batch, seq), generator=generator)


def embeds(batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    """Random input embeddings ``[batch, seq, 16]`` for the models that take no ids."""
    return torch.randn(batch, seq, 16, generator=torch.Generator().manual_seed(2))


def t5_inputs():
    return {"input_ids": ids(), "decoder_input_ids": ids(seed=1)}


def first_output(out):
    """A model's main output: the tensor itself, the logits, or the last hidden state."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    return out.last_hidden_state


FAMILIES = {
    # name: (builder, inputs, expected sites, expected kind, found_by)
    "t5": (lambda: models.t5(), t5_inputs, 8, "16->40->16 relu", "fx.symbolic_trace"),
    "t5-v1.1": (lambda: models.t5(gated=True), t5_inputs, 8, "16->40->16 gated gelu_tanh",
                "fx.symbolic_trace"),
    "bert": (lambda: models.bert(), lambda: {"input_ids": ids()}, 4, "16->40->16 gelu",
             "torch.export"),
    "gpt2": (lambda: models.gpt2(), lambda: {"input_ids": ids()}, 4, "16->64->16 gelu_tanh",
             "fx.symbolic_trace"),
    "llama": (lambda: models.llama(), lambda: {"input_ids": ids()}, 4, "16->40->16 gated silu",
              "fx.symbolic_trace"),
    "nanogpt": (lambda: models.NanoGPT(), lambda: (ids(),), 4, "16->64->16 gelu",
                "fx.symbolic_trace of the whole model"),
    "torch-encoder": (lambda: models.torch_encoder(norm_first=False), lambda: (embeds(),), 4,
                      "16->40->16 relu", "torch.export"),
    "torch-encoder-norm-first": (lambda: models.torch_encoder(norm_first=True),
                                 lambda: (embeds(),), 4, "16->40->16 relu", "torch.export"),
}
NEEDS_INPUTS = {"torch-encoder", "torch-encoder-norm-first"}  # no dummy_inputs of its own


def build(name):
    """The family's model (seed 0, eval mode) and its inputs."""
    torch.manual_seed(0)
    model = FAMILIES[name][0]().eval()
    inputs = FAMILIES[name][1]()
    return model, inputs


def run(model, inputs):
    """The model's main output for ``inputs`` (a tuple: positional, a dict: keywords)."""
    with torch.no_grad():
        return first_output(model(*inputs) if isinstance(inputs, tuple) else model(**inputs))
