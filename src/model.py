"""A small GPT: token and position embeddings, pre-norm Transformer blocks, a vocabulary head.

The submodule names are the parameter-file layout (`tok_emb`, `pos_emb`,
`blocks.N.attn.key`, `blocks.N.mlp.0`, ...): keep them. The later years'
variants keep their starter code's names too: RoPE (2024) has no `pos_emb`
and a `blocks.N.attn.rope_cache` buffer; the perceiver (2023) adds
`down_block` (with the basis `down_block.C`) before its blocks and
`up_block` after them.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import attention


class GPTConfig:
    """Model hyperparameters; every keyword becomes an attribute.

    `synthesizer=True` picks SynthesizerAttention instead of CausalSelfAttention;
    `rope=True` drops the position embedding and rotates queries and keys instead;
    `perceiver=True` runs the middle blocks on `bottleneck_dim` positions;
    `fused_attention=False` picks the attention modules' slow reference path.
    """
    embd_pdrop = 0.1
    resid_pdrop = 0.1
    attn_pdrop = 0.1
    synthesizer = False
    rope = False
    perceiver = False
    bottleneck_dim = None
    fused_attention = True

    def __init__(self, vocab_size, block_size, **kwargs):
        self.vocab_size = vocab_size
        self.block_size = block_size
        for k, v in kwargs.items():
            setattr(self, k, v)


def mlp(config):
    """The feed-forward part of every block: d -> 4d -> GELU -> d, then dropout."""
    return nn.Sequential(
        nn.Linear(config.n_embd, 4 * config.n_embd),
        nn.GELU(),
        nn.Linear(4 * config.n_embd, config.n_embd),
        nn.Dropout(config.resid_pdrop),
    )


class Block(nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)
        attention_class = attention.SynthesizerAttention if config.synthesizer else attention.CausalSelfAttention
        self.attn = attention_class(config)
        self.mlp = mlp(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln1(x), cache)
        x = x + self.mlp(self.ln2(x))
        return x


class CrossBlock(nn.Module):
    """What both perceiver projection blocks hold: ln1, ln2, a cross-attention and an MLP."""

    def __init__(self, config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.attn = attention.CausalCrossAttention(config)
        self.mlp = mlp(config)


class DownProjectBlock(CrossBlock):
    """The perceiver's first block: from the input's length l down to m = bottleneck_dim positions.

    The learned basis C (1, m, d) cross-attends, as queries after ln1, to the
    input; then y + mlp(ln2(y)). C is the residual stream: y = C + attn(...).
    """

    def __init__(self, config):
        super().__init__(config)
        self.C = nn.Parameter(torch.empty(1, config.bottleneck_dim, config.n_embd))
        nn.init.xavier_uniform_(self.C)

    def forward(self, x_input):
        y = self.C + self.attn(x_input, self.ln1(self.C))
        return y + self.mlp(self.ln2(y))


class UpProjectBlock(CrossBlock):
    """The perceiver's last block: from m positions back up to the input's l.

    The input positions cross-attend, as queries, to the bottleneck y (keys and
    values, after ln1); then x + mlp(ln2(x)). The input is the residual
    stream: x = x_input + attn(...).
    """

    def forward(self, y, x_input):
        x = x_input + self.attn(self.ln1(y), x_input)
        return x + self.mlp(self.ln2(x))


class KVCache:
    """Per-layer keys/values of the positions decoded so far, for incremental greedy decoding.

    The perceiver has no per-position keys to keep: its cache holds the
    tokens so far (`tokens`), and each call runs them all again.
    """

    def __init__(self, n_layer):
        self.layers = [{} for _ in range(n_layer)]
        self.length = 0
        self.tokens = None


class GPT(nn.Module):
    """The language model; forward(idx, targets) returns (logits, loss), loss ignoring pad (id 0)."""

    def __init__(self, config):
        super().__init__()
        check_variant(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        if not config.rope:
            self.pos_emb = nn.Parameter(torch.zeros(1, config.block_size, config.n_embd))
        self.drop = nn.Dropout(config.embd_pdrop)
        self.perceiver = config.perceiver
        if config.perceiver:
            self.down_block = DownProjectBlock(config)
            bottleneck = copy.copy(config)  # the middle blocks' masks are m x m
            bottleneck.block_size = config.bottleneck_dim
            self.blocks = nn.Sequential(*[Block(bottleneck) for _ in range(config.n_layer - 2)])
            self.up_block = UpProjectBlock(config)
        else:
            self.blocks = nn.Sequential(*[Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.block_size = config.block_size
        self.apply(self._init_weights)

    def get_block_size(self):
        return self.block_size

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)

    def forward(self, idx, targets=None, cache=None, loss_reduction='mean'):
        """Logits for every position of idx (B, T) and, given targets, the cross-entropy loss.

        With a KVCache, idx continues the sequence the cache holds. With
        loss_reduction='sum' the loss is summed over non-pad targets instead of
        averaged (used to split a batch into chunks with the same total).
        """
        b, t = idx.size()
        start = cache.length if cache is not None else 0
        if start + t > self.block_size:
            raise ValueError(f'cannot forward a sequence of length {start + t}: '
                             f'the block size is only {self.block_size}')
        if self.perceiver:
            x = self._perceive(idx, cache)
        else:
            x = self._embed(idx, start)
            for i, block in enumerate(self.blocks):
                x = block(x, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.length += t
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=0, reduction=loss_reduction)
        return logits, loss

    def _embed(self, idx, start):
        """The token embeddings of idx, plus the learned position embeddings of start .. (none under RoPE)."""
        x = self.tok_emb(idx)
        if hasattr(self, 'pos_emb'):
            x = x + self.pos_emb[:, start:start + idx.size(1), :]
        return self.drop(x)

    def _perceive(self, idx, cache):
        """The perceiver's states for idx: down to bottleneck_dim positions, the blocks there, back up.

        With a cache, idx follows the tokens the cache holds: all of them run
        again, and the states of idx's positions are returned.
        """
        t = idx.size(1)
        if cache is not None:
            idx = idx if cache.tokens is None else torch.cat([cache.tokens, idx], dim=1)
            cache.tokens = idx
        x_input = self._embed(idx, 0)
        x = self.up_block(self.blocks(self.down_block(x_input)), x_input)
        return x[:, -t:]


def check_variant(config):
    """ValueError unless the config's variant settings describe a model that exists."""
    if config.perceiver:
        if config.synthesizer or config.rope:
            raise ValueError('the perceiver uses ordinary attention with learned positions: '
                             'it combines with neither synthesizer nor rope')
        m = config.bottleneck_dim
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= config.block_size:
            raise ValueError(f'bottleneck_dim must be a whole number from 1 to the block size '
                             f'{config.block_size}, got {m}')
        if config.n_layer < 2:
            raise ValueError(f'n_layer must be at least 2 for the perceiver (a down and an up block), '
                             f'got {config.n_layer}')
    if config.rope and config.synthesizer:
        raise ValueError('rope rotates queries and keys, which the synthesizer does not have')
