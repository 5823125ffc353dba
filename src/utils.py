"""Seeding, the device, sampling, the birthplace accuracy metric, and file writing.

`sample` is the simple reference decoder: one batch, the whole context re-run
for every new token. `greedy_decode` is the fast one used by evaluation:
prompts of equal length decoded together with a key/value cache, giving the
same tokens as `sample` (tests hold them equal). `atomic_write` is how every
output file is written: complete, or not at all. `check_choice` is how the
trainer refuses a setting outside its fixed set of values.
"""
import os
import random
from collections import defaultdict
from contextlib import contextmanager

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


def resolve_device(device=None):
    """torch.device(device), or CUDA when present and the CPU otherwise."""
    if device:
        return torch.device(device)
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def check_choice(name, value, allowed):
    """ValueError naming the allowed values, unless `value` is one of them."""
    if value not in allowed:
        options = ', '.join(repr(a) for a in allowed[:-1]) + f' or {allowed[-1]!r}'
        raise ValueError(f'unknown {name} {value!r}: use {options}')


def denormals_flushed():
    """Whether float32 denormals are flushed to zero on this thread and on the intra-op threads in use.

    Both probes give 0 only when flushing is on: a product of a denormal, and
    a matrix product whose terms are denormals (their sums would be normal).
    Each is large enough to be split across the threads that run it, ATen's
    and the matrix library's, so one thread that does not flush leaves non-zeros.
    """
    tiny = torch.full((512, 512), 1e-20)
    return not (bool(torch.full((1 << 17,), 1e-39).mul_(1.5).any()) or bool((tiny @ tiny).any()))


@contextmanager
def flush_denormals():
    """Inside, the CPU flushes float32 denormals (magnitude below 1.2e-38) to zero; the state before is restored.

    Arithmetic on denormals is up to 100 times slower on x86 CPUs, and some
    weights (PyTorch's default initialisation of this model was seen to do it)
    make a forward pass produce them: evaluation then took 5 minutes instead
    of 5 seconds (bench/denormals.py). Flushing them changes nothing else: a
    denormal is below float32's precision beside any normal number it is
    added to (bench/denormals.py and tests compare predictions and params).

    The setting belongs to each thread. The matrix library's worker threads
    take it from the thread that starts them, at the first parallel matrix
    product, so it reaches them only when that product runs inside this block,
    as in a run.py process (denormals_flushed tells); otherwise it covers the
    calling thread and ATen's own threads. Also usable as a decorator. GPU
    arithmetic is not affected.
    """
    # a one-element probe: it runs on this thread only, so it starts no worker threads before the setting
    before = not bool(torch.full((1,), 1e-39).mul_(1.5).any())
    torch.set_flush_denormal(True)  # False, and nothing changes, on a CPU without the setting
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


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
    for _ in range(steps):
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


@flush_denormals()
@torch.inference_mode()
def greedy_decode(model, prompts, steps, device='cpu', batch_size=512, show_progress=False, stop_id=None):
    """Greedy continuations of `steps` tokens for each prompt (a list of token-id lists).

    Prompts of the same length go through the model together, so every token
    keeps its absolute position; a key/value cache means each step runs only
    the newest token. Returns the continuations (lists of ids) in input order.
    With stop_id, a group stops early once each of its continuations holds
    stop_id, so continuations may be shorter than `steps` but agree with the
    full ones up to their first stop_id. Prompt plus continuation must fit in
    the block size.
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
            stopped = torch.zeros(len(group), 1, dtype=torch.bool, device=device)
            for _ in range(steps):
                logits, _ = model(x, cache=cache)
                x = logits[:, -1, :].argmax(dim=-1, keepdim=True)
                generated.append(x)
                if stop_id is not None:
                    stopped |= x == stop_id
                    if bool(stopped.all()):
                        break
            generated = torch.cat(generated, dim=1).tolist()
            for i, continuation in zip(group, generated):
                outputs[i] = continuation
            pbar.update(len(group))
    pbar.close()
    return outputs


def read_gold_places(filepath):
    """Field 2 of every line of a TSV file, or None when its first line has no second field.

    Lines are stripped first (so CRLF endings and a missing final newline read
    the same); a line without a place in a file whose first line has one is a
    ValueError naming the line.
    """
    with open(filepath, encoding='utf-8-sig') as fin:
        lines = [x.strip().split('\t') for x in fin]
    if len(lines) == 0 or len(lines[0]) == 1:
        return None
    for number, fields in enumerate(lines, 1):
        if len(fields) < 2:
            raise ValueError(f'{filepath} line {number} has no place after a tab, though line 1 has one')
    return [x[1] for x in lines]


def evaluate_places(filepath, predicted_places):
    """(total, correct) as floats: predictions compared exactly with field 2 of each TSV line.

    A file whose lines have no second field has no gold places: that is
    reported and (0, 0) returned.
    """
    true_places = read_gold_places(filepath)
    if true_places is None:
        print('No gold birth places provided; returning (0,0)')
        return (0, 0)
    total = len(true_places)
    if total != len(predicted_places):
        raise ValueError(f'{filepath} has {total} lines but there are {len(predicted_places)} predictions')
    correct = len(list(filter(lambda x: x[0] == x[1], zip(true_places, predicted_places))))
    return (float(total), float(correct))


@contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path`; it is renamed onto `path` only if the block succeeds.

    On any failure, Ctrl-C included, the temporary file is removed and the file
    already at `path` stays as it was, so no reader ever sees half a file. The
    data is flushed to disk before the rename. A path that exists but is not a
    regular file (/dev/null, a pipe) is written in place.
    """
    target = os.path.realpath(path)
    if os.path.exists(target) and not os.path.isfile(target):
        yield path
        return
    folder, name = os.path.split(target)
    temporary = os.path.join(folder, f'.{name}.{os.getpid()}.tmp')
    try:
        yield temporary
        with open(temporary, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
