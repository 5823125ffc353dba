"""How an epoch becomes batches, and a batch becomes the pieces the model runs.

Every batch comes as a list of (x, y) pieces whose summed losses, divided by
the batch's count of non-pad targets, give the batch's mean loss, so any
cutting leaves the math as it is:
- trimming drops trailing columns whose targets are all pad (exact, since
  attention is causal);
- with `chunks > 1` each batch is sorted by length and run as that many
  trimmed pieces (less padding, less memory);
- `batching='stratified'` changes which examples share a batch, so only
  the laptop recipe uses it: the whole epoch, sorted by length, is dealt into batches
  of `chunks` pieces of similar length.
`epoch_batches` builds one epoch's batches from its arguments alone. With
several processes (torchrun), every process draws the same order and takes
its `share` of each batch; see epoch_batches.
"""
import functools
import math
import random
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


def share(batch, rank, world_size):
    """Process `rank`'s contiguous part of a global batch: world_size parts whose sizes differ by at most one."""
    n = len(batch)
    return batch[n * rank // world_size:n * (rank + 1) // world_size]


def collate_share(examples):
    """A share's examples stacked into (x, y), or None for an empty share (a batch smaller than world_size)."""
    if not examples:
        return None
    return torch.utils.data.default_collate(examples)


def share_worker_init(worker_id, rank):
    """DataLoader worker init with several processes: as ignore_stop_signals, and a Python random stream
    of this rank's own (the workers of every rank get the same base seed, from the shared generator)."""
    ignore_stop_signals(worker_id)
    random.seed((rank << 64) + torch.initial_seed())


def epoch_batches(dataset, batch_size, generator, device, batching='random', chunks=1, trim=True,
                  num_workers=0, skip=0, rank=0, world_size=1):
    """One epoch of `dataset` from batch `skip` on: an iterator of (pieces on `device`, token count).

    The order is a permutation drawn from `generator`, which also seeds the
    DataLoader workers and deals stratified batches. The token count is the
    untrimmed batch's rows x width: the schedule counts pads, as the
    original's (y >= 0).sum() does. Stratified batching draws every example
    before this returns; random batching draws them as it is iterated.

    With world_size > 1 (random batching only) every process passes the same
    generator state, so all draw the same order, and each builds only its
    `share` of every batch of batch_size: the shares of one step together
    are the one-process batch. The token count is then this share's (a
    process sums them over processes). A share left empty by a batch smaller
    than world_size is one all-pad row, whose loss and gradient are zero.
    """
    utils.check_choice('batching', batching, BATCHINGS)
    if world_size > 1 and batching != 'random':
        raise ValueError(f'batching {batching!r} runs in one process only; use random batching with several')
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
    if world_size > 1:
        shares = [share(order[i:i + batch_size], rank, world_size)
                  for i in range(left_out * batch_size, len(order), batch_size)]
        loader = DataLoader(dataset, batch_sampler=shares, collate_fn=collate_share, num_workers=num_workers,
                            generator=generator, pin_memory=device.type == 'cuda',
                            worker_init_fn=functools.partial(share_worker_init, rank=rank) if num_workers else None)
    else:
        loader = DataLoader(dataset, sampler=order[left_out * batch_size:], batch_size=batch_size,
                            num_workers=num_workers, generator=generator, pin_memory=device.type == 'cuda',
                            worker_init_fn=ignore_stop_signals if num_workers > 0 else None)
    batches = iter(loader)
    for _ in range(skip - left_out):
        next(batches)
    return (pieces_of(batch, device, chunks, trim) for batch in batches)


def pieces_of(batch, device, chunks, trim):
    """(the pieces of a loaded (x, y) batch on `device`, its token count); an empty share is one all-pad row."""
    if batch is None:
        pad = torch.zeros(1, 1, dtype=torch.long, device=device)
        return [(pad, pad)], 0
    x, y = batch
    return split_batch(x.to(device), y.to(device), chunks, trim), y.numel()
