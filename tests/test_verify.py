"""`moeify.verify`'s checks on in-memory models (the CLI's `verify` is in test_cli_convert)."""

from __future__ import annotations

import copy

import torch

import moeify
from moeify import MoEConfig
from moeify.verify import check_dense_identity
from tests import models

SEQ = 8


def test_dense_identity_leaves_the_callers_bf16_model_as_it_was():
    torch.manual_seed(0)
    dense = models.t5(layers=2).to(torch.bfloat16).float().eval()  # weights exact in bf16
    moe = copy.deepcopy(dense)
    moeify.convert(moe, MoEConfig(num_experts=4), seq_len=SEQ)
    moe.to(torch.bfloat16).train()
    moe.decoder.eval()  # modes that differ between modules must come back too
    ids = torch.randint(2, models.VOCAB, (2, SEQ))
    logits = moe(input_ids=ids, decoder_input_ids=ids).logits  # a training step's state:
    (logits.float().square().mean() + moeify.aux_loss(moe)).backward()  # grads, routing
    tensors = {n: (t, t.dtype, t.device, t.detach().clone())
               for n, t in moe.state_dict(keep_vars=True).items()}
    grads = {n: (p.grad, None if p.grad is None else p.grad.clone())
             for n, p in moe.named_parameters()}
    modes = {n: m.training for n, m in moe.named_modules()}
    routing = [layer.last_routing for _, layer in moeify.switch_layers(moe)]
    assert {t.dtype for n, (t, *_) in tensors.items() if ".router." not in n} == {torch.bfloat16}
    assert sum(g is not None for g, _ in grads.values()) > 10
    assert all(r is not None for r in routing)
    assert True in modes.values() and False in modes.values()

    check = check_dense_identity(moe, dense, SEQ)
    # Passing to 1e-5 means the check ran the model in float32: bf16 arithmetic is far off.
    assert check.status == "pass", check.detail

    after = moe.state_dict(keep_vars=True)
    assert after.keys() == tensors.keys()
    for name, (tensor, dtype, device, value) in tensors.items():
        now = after[name]
        assert now is tensor and now.dtype == dtype and now.device == device, name
        assert torch.equal(now.detach(), value), name
    for name, p in moe.named_parameters():
        grad, value = grads[name]
        assert p.grad is grad and (grad is None or torch.equal(grad, value)), name
    assert all(p.grad.dtype == p.dtype for p in moe.parameters() if p.grad is not None)
    assert {n: m.training for n, m in moe.named_modules()} == modes
    now_routing = [layer.last_routing for _, layer in moeify.switch_layers(moe)]
    assert len(now_routing) == len(routing) and all(a is b for a, b in zip(now_routing, routing))
    assert moe(input_ids=ids, decoder_input_ids=ids).logits.dtype == torch.bfloat16
