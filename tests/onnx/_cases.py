"""What the ONNX tests share: the sequence length and the dropping config the graphs are
exported with, the prompts generation is checked on, inputs and the PyTorch reference a
graph is compared with, and the expert shapes strict shape inference finds."""

from __future__ import annotations

import onnx
import torch

from moeify import MoEConfig
from tests import models

SEQ = 12
# eval capacity factor 1.0 with 4 experts: 3 slots for 12 tokens (and for a 10-token
# prompt), so tokens drop
DROPPING = MoEConfig(num_experts=4, eval_capacity_factor=1.0, min_capacity=1)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]]


def padded(prompts, left):
    """The prompts as generate() takes them: [batch, longest], padding on one side."""
    n = max(map(len, prompts))
    ids = torch.zeros(len(prompts), n, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        where = slice(n - len(prompt), n) if left else slice(0, len(prompt))
        ids[i, where], mask[i, where] = torch.tensor(prompt), 1
    return ids, mask


def random_inputs(names, batch, vocab=models.VOCAB, seed=0):
    """Random ``[batch, SEQ]`` token ids for each input name; an ``attention_mask`` masks
    the last 3 positions of the first sequence."""
    generator = torch.Generator().manual_seed(seed)
    values = {}
    for name in names:
        if name == "attention_mask":
            mask = torch.ones(batch, SEQ, dtype=torch.long)
            mask[0, SEQ - 3:] = 0
            values[name] = mask
        else:
            values[name] = torch.randint(2, vocab, (batch, SEQ), generator=generator)
    return values


def expert_shapes(model_proto, num_experts):
    """The inferred shapes (strict shape inference) of values whose leading axis is E."""
    inferred = onnx.shape_inference.infer_shapes(model_proto, strict_mode=True)
    shapes = set()
    for value in inferred.graph.value_info:
        dims = value.type.tensor_type.shape.dim
        assert value.type.tensor_type.HasField("shape"), f"no shape for {value.name}"
        shape = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims)
        if shape and shape[0] == num_experts:
            shapes.add(shape)
    return shapes


def reference(model, inputs):
    """The PyTorch model's logits (or last hidden state) for ``inputs``, without a cache."""
    with torch.no_grad():
        out = model(**inputs, **({} if "attention_mask" in inputs and "decoder_input_ids"
                                 not in inputs else {"use_cache": False}))
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state)
