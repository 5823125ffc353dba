"""How an epoch becomes batches, and a batch becomes the pieces the model runs.

Every batch comes as a list of (x, y) pieces whose summed losses, divided by
the batch's count of non-pad targets, give the batch's mean loss, so any
cutting leaves the math as it is:
- trimming drops trailing columns whose targets are all pad (exact, since
  attention is causal);
- with `chunks > 1` each batch is sorted by length and run as that many
  trimmed pieces (less padding, less memory);
- `batching='stratified'` changes which examples share a batch, so it is
  off by default: the whole epoch, sorted by length, is dealt into batches
  of `chunks` pieces of similar length.
`epoch_batches` builds one epoch's batches from its arguments alone.
"""
import math
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader

import utils

BATCHINGS = ('random', 'stratified')  # 'random' is the original: shuffled batches of batch_size


def target_lengths(y):
    """Per row of y: 1 + the index of its last non-pad target (1 for a row of pads only)."""
    return (y != 0).int().cumsum(1).argmax(1) + 1


def split_batch(x, y, chunks, trim):
    """Pieces of the batch (x, y) whose losses, summed, give the whole batch's.

    Trimming keeps the columns up to the last non-pad target: with causal
    attention, earlier outputs never depend on the dropped columns.
    """
    if not trim:
        return [(x, y)]
    lengths = target_lengths(y)
    if chunks <= 1:
        n = int(lengths.max())
        return [(x[:, :n], y[:, :n])]
    order = torch.argsort(lengths)
    pieces = []
    for part in torch.chunk(order, chunks):
        n = int(lengths[part].max())
        pieces.append((x[part, :n], y[part, :n]))
    return pieces


def stratified_batches(examples, batch_size, chunks, generator):
    """The epoch's (x, y) examples dealt into batches, each a list of trimmed pieces.

    The examples are sorted by length (last non-pad target) and cut into
    `chunks` strata of equal size; each stratum is cut into as many pieces as
    the epoch has batches, and every batch gets one piece of every stratum
    (which one is random, but larger pieces go to smaller batches). Each
    batch so holds short and long examples in the proportions of the whole
    epoch, while each piece is trimmed to a length close to that of its own
    examples. Every example is used once; batch sizes differ by at most one.
    """
    n_batches = math.ceil(len(examples) / batch_size)
    lengths = target_lengths(torch.stack([y for _, y in examples])).tolist()
    by_length = sorted(range(len(examples)), key=lengths.__getitem__)
    batches, sizes = [[] for _ in range(n_batches)], [0] * n_batches
    for stratum in np.array_split(np.array(by_length), chunks):
        # the larger pieces (array_split puts them first) go to the smaller batches, ties at random
        tie_break = torch.randperm(n_batches, generator=generator).tolist()
        destinations = sorted(range(n_batches), key=lambda b: (sizes[b], tie_break[b]))
        for piece, b in zip(np.array_split(stratum, n_batches), destinations):
            sizes[b] += len(piece)
            if len(piece):
                n = max(lengths[i] for i in piece)
                batches[b].append((torch.stack([examples[i][0][:n] for i in piece]),
                                   torch.stack([examples[i][1][:n] for i in piece])))
    return [batch for batch in batches if batch]  # a batch_size below chunks can leave one empty


def ignore_stop_signals(worker_id):
    """DataLoader worker init: leave Ctrl-C and SIGTERM to the main process, which stops cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def epoch_batches(dataset, batch_size, generator, device, batching='random', chunks=1, trim=True,
                  num_workers=0, skip=0):
    """One epoch of `dataset` from batch `skip` on: an iterator of (pieces on `device`, token count).

    The order is a permutation drawn from `generator`, which also seeds the
    DataLoader workers and deals stratified batches. The token count is the
    untrimmed batch's rows x width: the schedule counts pads, as the
    original's (y >= 0).sum() does. Stratified batching draws every example
    before this returns; random batching draws them as it is iterated.
    """
    utils.check_choice('batching', batching, BATCHINGS)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    if batching == 'stratified':
        examples = [dataset[i] for i in order]
        width = examples[0][1].size(0)
        batches = stratified_batches(examples, batch_size, chunks, generator)
        return (([(x.to(device), y.to(device)) for x, y in pieces], sum(y.size(0) for _, y in pieces) * width)
                for pieces in batches[skip:])
    # In one process the trained batches are just left out; DataLoader workers
    # draw their examples in sequence, so with them those batches are replayed.
    left_out = skip if num_workers == 0 else 0
    loader = DataLoader(dataset, sampler=order[left_out * batch_size:], batch_size=batch_size,
                        num_workers=num_workers, generator=generator, pin_memory=device.type == 'cuda',
                        worker_init_fn=ignore_stop_signals if num_workers > 0 else None)
    batches = iter(loader)
    for _ in range(skip - left_out):
        next(batches)
    return ((split_batch(x.to(device), y.to(device), chunks, trim), y.numel()) for x, y in batches)
