"""A small GPT: token and position embeddings, pre-norm Transformer blocks, a vocabulary head.

The submodule names are the parameter-file layout (`tok_emb`, `pos_emb`,
`blocks.N.attn.key`, `blocks.N.mlp.0`, ...): keep them.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import attention


class GPTConfig:
    """Model hyperparameters; every keyword becomes an attribute.

    `synthesizer=True` picks SynthesizerAttention instead of CausalSelfAttention;
    `fused_attention=False` picks the attention modules' slow reference path.
    """
    embd_pdrop = 0.1
    resid_pdrop = 0.1
    attn_pdrop = 0.1
    synthesizer = False
    fused_attention = True

    def __init__(self, vocab_size, block_size, **kwargs):
        self.vocab_size = vocab_size
        self.block_size = block_size
        for k, v in kwargs.items():
            setattr(self, k, v)


class Block(nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)
        attention_class = attention.SynthesizerAttention if config.synthesizer else attention.CausalSelfAttention
        self.attn = attention_class(config)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd),
            nn.GELU(),
            nn.Linear(4 * config.n_embd, config.n_embd),
            nn.Dropout(config.resid_pdrop),
        )

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln1(x), cache)
        x = x + self.mlp(self.ln2(x))
        return x


class KVCache:
    """Per-layer keys/values of the positions decoded so far, for incremental greedy decoding."""

    def __init__(self, n_layer):
        self.layers = [{} for _ in range(n_layer)]
        self.length = 0


class GPT(nn.Module):
    """The language model; forward(idx, targets) returns (logits, loss), loss ignoring pad (id 0)."""

    def __init__(self, config):
        super().__init__()
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, config.block_size, config.n_embd))
        self.drop = nn.Dropout(config.embd_pdrop)
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
        x = self.drop(self.tok_emb(idx) + self.pos_emb[:, start:start + t, :])
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
