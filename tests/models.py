"""Tiny models of every family moeify converts, built from configs in code (offline)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn

VOCAB = 64


def t5(gated: bool = False, layers: int = 4, **config) -> tf.T5ForConditionalGeneration:
    """``config``: more `T5Config` fields (``dropout_rate=0.2``)."""
    config = tf.T5Config(
        vocab_size=VOCAB, d_model=16, d_ff=40, num_layers=layers, num_decoder_layers=layers,
        num_heads=2, d_kv=8, feed_forward_proj="gated-gelu" if gated else "relu",
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **config,
    )
    return tf.T5ForConditionalGeneration(config)


def bert(layers: int = 4, **config) -> tf.BertModel:
    return tf.BertModel(tf.BertConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=40, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=64, **config,
    ))


def gpt2(layers: int = 4, **config) -> tf.GPT2LMHeadModel:
    return tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=layers, n_head=2, n_positions=64,
        bos_token_id=1, eos_token_id=1, pad_token_id=0, **config,
    ))


def llama(layers: int = 4, **config) -> tf.LlamaForCausalLM:
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=40, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=1, pad_token_id=0, **config,
    ))


def mistral(layers: int = 4, **config) -> tf.MistralForCausalLM:
    """Grouped-query attention and a sliding window shorter than the tests' sequences."""
    config = {"sliding_window": 6, **config}
    return tf.MistralForCausalLM(tf.MistralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=40, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=1, pad_token_id=0, **config,
    ))


def qwen2(layers: int = 4, **config) -> tf.Qwen2ForCausalLM:
    """q/k/v projections with biases (Qwen2's attention)."""
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=40, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=1, pad_token_id=0, **config,
    ))


def qwen3(layers: int = 4, **config) -> tf.Qwen3ForCausalLM:
    """Per-head q/k RMS norms (Qwen3's attention), grouped-query attention and a
    ``head_dim`` other than hidden_size / heads. d_ff 48: its quarters (granularity 4)
    are 48 bytes wide in float32, as transformers' grouped expert matmul needs."""
    return tf.Qwen3ForCausalLM(tf.Qwen3Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=12, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=1, pad_token_id=0, **config,
    ))


def torch_encoder(norm_first: bool, layers: int = 4) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        16, 2, 40, dropout=0.1, batch_first=True, norm_first=norm_first
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * d, d)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class DropoutFFN(nn.Module):
    """A hand-written FFN with its dropout between the projections (a module, or the
    functional form with ``functional=True``), inside a small residual model."""

    def __init__(self, d: int = 16, f: int = 40, p: float = 0.15,
                 functional: bool = False) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, f), nn.Linear(f, d)
        self.p, self.functional = p, functional
        self.dropout = nn.Dropout(p)

    def forward(self, x):
        h = F.relu(self.up(x))
        if self.functional:
            h = F.dropout(h, self.p, self.training)
        else:
            h = self.dropout(h)
        return self.down(h)


class DropoutFFNModel(nn.Module):
    """Residual blocks of `DropoutFFN` (no other dropout): ``[B, T, d] -> [B, T, d]``."""

    def __init__(self, layers: int = 2, d: int = 16, p: float = 0.15,
                 functional: bool = False) -> None:
        super().__init__()
        self.ffn = nn.ModuleList(DropoutFFN(d, p=p, functional=functional)
                                 for _ in range(layers))

    def forward(self, x):
        for ffn in self.ffn:
            x = x + ffn(x)
        return x


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.heads = heads

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """A nanoGPT-style decoder, traceable by torch.fx as one graph."""

    def __init__(self, vocab: int = VOCAB, d: int = 16, heads: int = 2, layers: int = 4,
                 block_size: int = 32) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block_size, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.2 / math.sqrt(p.shape[-1]))

    def forward(self, idx):
        B, T = idx.size()
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every weight of ``model`` away from its init (biases and norms included), in place,
    so a tensor written to the wrong place changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.3 * noise)
    return model
