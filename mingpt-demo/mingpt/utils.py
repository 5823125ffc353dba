"""Seeding and autoregressive sampling."""
import random

import numpy as np
import torch
import torch.nn.functional as F


def set_seed(seed):
    """Seed Python, NumPy and PyTorch so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def top_k_logits(logits, k):
    """Keep the k largest logits of each row; the rest become -inf."""
    threshold = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float('-inf'))


@torch.no_grad()
def sample(model, x, steps, temperature=1.0, sample=False, top_k=None):
    """Extend each row of x (B, T) by `steps` tokens, one at a time.

    Each new token comes from the logits at the last position, with the context
    cropped to the model's block size: drawn at random when `sample` is true,
    otherwise the most likely one. Returns the (B, T + steps) tensor.
    """
    was_training = model.training
    model.eval()
    block_size = model.get_block_size()
    for _ in range(steps):
        context = x[:, -block_size:]
        logits, _ = model(context)
        logits = logits[:, -1, :] / temperature
        if top_k is not None:
            logits = top_k_logits(logits, top_k)
        if sample:
            next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
        else:
            next_token = logits.argmax(dim=-1, keepdim=True)
        x = torch.cat([x, next_token], dim=1)
    model.train(was_training)
    return x
