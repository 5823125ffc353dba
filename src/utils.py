"""Seeding, sampling and the birthplace accuracy metric.

`sample` is the simple reference decoder: one batch, the whole context re-run
for every new token. `greedy_decode` is the fast one used by evaluation:
prompts of equal length decoded together with a key/value cache, giving the
same tokens as `sample` (tests hold them equal).
"""
import random
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import KVCache


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def top_k_logits(logits, k):
    v, ix = torch.topk(logits, k)
    out = logits.clone()
    out[out < v[:, [-1]]] = -float('Inf')
    return out


@torch.no_grad()
def sample(model, x, steps, temperature=1.0, sample=False, top_k=None):
    """Append `steps` tokens to each row of x (B, T), feeding back each prediction.

    The context is cropped to the model's block size; greedy unless sample=True.
    """
    block_size = model.get_block_size()
    model.eval()
    for k in range(steps):
        x_cond = x if x.size(1) <= block_size else x[:, -block_size:]
        logits, _ = model(x_cond)
        logits = logits[:, -1, :] / temperature
        if top_k is not None:
            logits = top_k_logits(logits, top_k)
        probs = F.softmax(logits, dim=-1)
        if sample:
            ix = torch.multinomial(probs, num_samples=1)
        else:
            _, ix = torch.topk(probs, k=1, dim=-1)
        x = torch.cat((x, ix), dim=1)
    return x


@torch.no_grad()
def greedy_decode(model, prompts, steps, device='cpu', batch_size=512, show_progress=False):
    """Greedy continuations of `steps` tokens for each prompt (a list of token-id lists).

    Prompts of the same length go through the model together, so every token
    keeps its absolute position; a key/value cache means each step runs only
    the newest token. Returns the continuations (lists of ids) in input order.
    Prompt plus continuation must fit in the block size.
    """
    model.eval()
    by_length = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    outputs = [None] * len(prompts)
    pbar = tqdm(total=len(prompts), disable=not show_progress, desc='decoding')
    for length in sorted(by_length):
        indices = by_length[length]
        for b in range(0, len(indices), batch_size):
            group = indices[b:b + batch_size]
            x = torch.tensor([prompts[i] for i in group], dtype=torch.long, device=device)
            cache = KVCache(len(model.blocks))
            generated = []
            for _ in range(steps):
                logits, _ = model(x, cache=cache)
                x = logits[:, -1, :].argmax(dim=-1, keepdim=True)
                generated.append(x)
            generated = torch.cat(generated, dim=1).tolist()
            for i, continuation in zip(group, generated):
                outputs[i] = continuation
            pbar.update(len(group))
    pbar.close()
    return outputs


def evaluate_places(filepath, predicted_places):
    """(total, correct) as floats: predictions compared exactly with field 2 of each TSV line.

    A file whose lines have no second field has no gold places: that is
    reported and (0, 0) returned.
    """
    with open(filepath, encoding='utf-8') as fin:
        lines = [x.strip().split('\t') for x in fin]
    if len(lines) == 0 or len(lines[0]) == 1:
        print('No gold birth places provided; returning (0,0)')
        return (0, 0)
    true_places = [x[1] for x in lines]
    total = len(true_places)
    if total != len(predicted_places):
        raise ValueError(f'{filepath} has {total} lines but there are {len(predicted_places)} predictions')
    correct = len(list(filter(lambda x: x[0] == x[1], zip(true_places, predicted_places))))
    return (float(total), float(correct))
