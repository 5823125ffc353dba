"""Causal self-attention modules: ordinary key-query-value attention and the dense Synthesizer.

Also, for the later years' variants: rotary position embeddings (RoPE, an
option of CausalSelfAttention, 2024) and CausalCrossAttention (the
perceiver's down- and up-projections, 2023).

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


def _key_query_value(module, config):
    """The layers and mask that key-query-value attention (self or cross) gives `module`, named as the original."""
    assert config.n_embd % config.n_head == 0
    module.key = nn.Linear(config.n_embd, config.n_embd)
    module.query = nn.Linear(config.n_embd, config.n_embd)
    module.value = nn.Linear(config.n_embd, config.n_embd)
    module.attn_drop = nn.Dropout(config.attn_pdrop)
    module.resid_drop = nn.Dropout(config.resid_pdrop)
    module.proj = nn.Linear(config.n_embd, config.n_embd)
    module.register_buffer("mask", torch.tril(torch.ones(config.block_size, config.block_size))
                           .view(1, 1, config.block_size, config.block_size))
    module.n_head = config.n_head
    module.fused = getattr(config, 'fused_attention', True)


class CausalSelfAttention(nn.Module):
    """Multi-head masked self-attention: softmax(Q K^T / sqrt(d/h)) V per head, then a projection."""

    keep_weights = False  # True: take the reference path and keep its softmax (B, h, T, S) in self.weights

    def __init__(self, config):
        super().__init__()
        _key_query_value(self, config)
        self.rope = getattr(config, 'rope', False)
        if self.rope:  # RoPE (2024): q and k rotated by position, no position embedding
            head_size = config.n_embd // config.n_head
            assert head_size % 2 == 0, 'RoPE rotates pairs of dimensions: n_embd / n_head must be even'
            self.register_buffer("rope_cache", precompute_rotary_emb(head_size, config.block_size))

    def _position(self, t, start):
        """t (B, h, T, hs) rotated for positions start .. start + T - 1 under RoPE, else t itself."""
        return apply_rotary_emb(t, self.rope_cache, start) if self.rope else t

    def forward(self, x, cache=None):
        B, T, C = x.size()
        past = cache['k'].size(2) if cache and 'k' in cache else 0
        q = self._position(_split_heads(self.query(x), self.n_head), past)
        k = _append_to_cache(cache, 'k', self._position(_split_heads(self.key(x), self.n_head), past))
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


def precompute_rotary_emb(dim, max_positions):
    """cos and sin of t * theta_i for every position t < max_positions: a (max_positions, dim/2, 2) tensor.

    theta_i = 10000^(-2(i-1)/dim) for i = 1 .. dim/2 (RoPE, Su et al., 2021);
    the angles are taken in float64 and stored in float32.
    """
    theta = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * theta
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rotary_emb(x, rope_cache, start=0):
    """x (..., T, hs) with each pair (x[2i], x[2i+1]) rotated by angle t * theta_i, t its position.

    The positions are start .. start + T - 1: the cache is truncated to the
    sequence (start > 0 when a key/value cache holds the earlier ones).
    """
    cos, sin = rope_cache[start:start + x.size(-2)].to(torch.float32).unbind(-1)  # (T, hs/2) each
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class CausalCrossAttention(nn.Module):
    """Multi-head masked cross-attention: queries from x_q (B, Tq, d), keys and values from x_kv (B, Tk, d).

    Query i sees key j when j <= i: the mask is tril(block_size)[:Tq, :Tk],
    so key 0 is always visible. Either input may have a batch of 1, which
    broadcasts against the other's (the perceiver's learned basis as queries).
    """

    def __init__(self, config):
        super().__init__()
        _key_query_value(self, config)

    def forward(self, x_kv, x_q):
        Tq, Tk = x_q.size(1), x_kv.size(1)
        q = _split_heads(self.query(x_q), self.n_head)    # (Bq, h, Tq, hs)
        k = _split_heads(self.key(x_kv), self.n_head)     # (Bk, h, Tk, hs)
        v = _split_heads(self.value(x_kv), self.n_head)
        B = max(q.size(0), k.size(0))
        q, k, v = q.expand(B, -1, -1, -1), k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        visible = self.mask[:, :, :Tq, :Tk] != 0
        if self.fused:
            dropout_p = self.attn_drop.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout_p)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(~visible, float('-inf'))
            att = self.attn_drop(F.softmax(att, dim=-1))
            y = att @ v
        return self.resid_drop(self.proj(_merge_heads(y)))
