"""Causal self-attention modules: ordinary key-query-value attention and the dense Synthesizer.

Each module has a slow reference path that spells the equation out
(`fused=False`) and a fast path through PyTorch's fused
scaled_dot_product_attention (`fused=True`, the default); tests hold the two
equal. Both accept an optional per-layer cache dict for incremental decoding:
the module appends this call's keys/values to it, and the queries of this call
sit at absolute positions cache_len .. cache_len + T - 1.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _split_heads(t, n_head):
    B, T, C = t.size()
    return t.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, h, T, hs)


def _merge_heads(t):
    B, h, T, hs = t.size()
    return t.transpose(1, 2).contiguous().view(B, T, h * hs)


def _append_to_cache(cache, name, t):
    """Concatenate `t` (B, h, T, hs) after what the cache holds under `name`."""
    if cache is None:
        return t
    if name in cache:
        t = torch.cat([cache[name], t], dim=2)
    cache[name] = t
    return t


class CausalSelfAttention(nn.Module):
    """Multi-head masked self-attention: softmax(Q K^T / sqrt(d/h)) V per head, then a projection."""

    keep_weights = False  # True: take the reference path and keep its softmax (B, h, T, S) in self.weights

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.key = nn.Linear(config.n_embd, config.n_embd)
        self.query = nn.Linear(config.n_embd, config.n_embd)
        self.value = nn.Linear(config.n_embd, config.n_embd)
        self.attn_drop = nn.Dropout(config.attn_pdrop)
        self.resid_drop = nn.Dropout(config.resid_pdrop)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.register_buffer("mask", torch.tril(torch.ones(config.block_size, config.block_size))
                             .view(1, 1, config.block_size, config.block_size))
        self.n_head = config.n_head
        self.fused = getattr(config, 'fused_attention', True)

    def forward(self, x, cache=None):
        B, T, C = x.size()
        past = cache['k'].size(2) if cache and 'k' in cache else 0
        q = _split_heads(self.query(x), self.n_head)
        k = _append_to_cache(cache, 'k', _split_heads(self.key(x), self.n_head))
        v = _append_to_cache(cache, 'v', _split_heads(self.value(x), self.n_head))
        S = k.size(2)
        if self.fused and not self.keep_weights:
            dropout_p = self.attn_drop.p if self.training else 0.0
            if past == 0:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            elif T == 1:  # the newest position sees every cached one
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            else:
                visible = self.mask[:, :, past:S, :S].bool()
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout_p)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.mask[:, :, past:S, :S] == 0, float('-inf'))
            att = F.softmax(att, dim=-1)
            if self.keep_weights:
                self.weights = att.detach()
            y = self.attn_drop(att) @ v
        return self.resid_drop(self.proj(_merge_heads(y)))


class SynthesizerAttention(nn.Module):
    """Dense Synthesizer (Tay et al., 2020): attention weights synthesised from each query alone.

    Per head i: softmax(ReLU(X A_i + b_1) B_i + b_2) (X V_i), causally masked.
    `w1` holds every head's A_i and b_1; `w2` is B_i (shared by all heads) and
    `b2` its bias, one column / entry per key position, so a sequence can be at
    most block_size - 1 long.
    """

    keep_weights = False  # True: take the reference path and keep its softmax (B, h, T, S) in self.weights

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.w1 = nn.Linear(config.n_embd, config.n_embd)
        self.w2 = nn.Parameter(torch.zeros(config.n_embd // config.n_head, config.block_size - 1))
        self.b2 = nn.Parameter(torch.zeros(config.block_size - 1))
        self.value = nn.Linear(config.n_embd, config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_drop = nn.Dropout(config.attn_pdrop)
        self.resid_drop = nn.Dropout(config.resid_pdrop)
        self.register_buffer("mask", torch.tril(torch.ones(config.block_size, config.block_size))
                             .view(1, 1, config.block_size, config.block_size))
        self.n_head = config.n_head
        self.block_size = config.block_size
        self.fused = getattr(config, 'fused_attention', True)
        nn.init.uniform_(self.w2, -0.001, 0.001)

    def forward(self, x, cache=None):
        B, T, C = x.size()
        past = cache['v'].size(2) if cache and 'v' in cache else 0
        S = past + T
        if S > self.block_size - 1:
            raise ValueError(f'SynthesizerAttention supports sequences of at most block_size - 1 = '
                             f'{self.block_size - 1} positions, got {S}')
        a = _split_heads(F.relu(self.w1(x)), self.n_head)                       # (B, h, T, hs)
        v = _append_to_cache(cache, 'v', _split_heads(self.value(x), self.n_head))  # (B, h, S, hs)
        visible = self.mask[:, :, past:S, :S] != 0
        if self.fused and not self.keep_weights:
            # The scores a @ w2 + b2 are "queries times keys" with keys = w2^T,
            # scale 1 and an additive mask holding b2 and the causal -inf.
            keys = self.w2[:, :S].t().to(a.dtype).expand(B, self.n_head, S, -1)
            bias = self.b2[:S].to(a.dtype)
            if T > 1:  # a single newest query sees every position: nothing to mask
                bias = bias.masked_fill(~visible, float('-inf'))
            dropout_p = self.attn_drop.p if self.training else 0.0
            y = F.scaled_dot_product_attention(a, keys, v, attn_mask=bias, dropout_p=dropout_p, scale=1.0)
        else:
            att = a @ self.w2[:, :S] + self.b2[:S]
            att = att.masked_fill(~visible, float('-inf'))
            att = F.softmax(att, dim=-1)
            if self.keep_weights:
                self.weights = att.detach()
            y = self.attn_drop(att) @ v
        return self.resid_drop(self.proj(_merge_heads(y)))
