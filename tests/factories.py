"""``package.module:function`` factories for the CLI tests: small models that are not
transformers models (``moeify convert tests.factories:residual_ffns ...``)."""

from __future__ import annotations

import torch
from torch import nn


class FFN(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class ResidualFFNs(nn.Module):
    """Pre-norm residual FFN blocks, ``[B, T, d_model] -> [B, T, d_model]``; its
    ``d_model`` attribute is what `moeify verify` and `moeify.export_onnx` make inputs
    from. ``scale_buffer``: a non-persistent buffer (no checkpoint restores it)."""

    def __init__(self, d_model: int = 16, d_ff: int = 40, layers: int = 4,
                 scale_buffer: bool = False) -> None:
        super().__init__()
        self.d_model = d_model
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(layers))
        self.ffns = nn.ModuleList(FFN(d_model, d_ff) for _ in range(layers))
        self.scale_buffer = scale_buffer
        if scale_buffer:
            self.register_buffer("scale", torch.full((d_model,), 0.5), persistent=False)

    def forward(self, x):
        for norm, ffn in zip(self.norms, self.ffns):
            x = x + ffn(norm(x))
        return x * self.scale if self.scale_buffer else x


def residual_ffns() -> ResidualFFNs:
    return ResidualFFNs()


def residual_ffns_with_buffer() -> ResidualFFNs:
    return ResidualFFNs(scale_buffer=True)
