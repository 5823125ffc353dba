"""Padding per epoch of span-corruption pretraining under each way of forming batches.

    python bench/batching.py [--epochs 3] [--batch_size 128] [--chunks 4]

For whole shuffled epochs of wiki.txt it counts the positions the model runs
(rows x columns of every piece: the cost of the linear layers) and the
attention cells (rows x columns^2), as ratios against whole untrimmed
batches.
"""
import argparse
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, os.path.join(ROOT, 'src'))
import batching  # noqa: E402
import dataset  # noqa: E402
import utils  # noqa: E402


def epoch_batches(corpus, batch_size, chunks, how):
    """One shuffled epoch as lists of (x, y) pieces, formed `how`."""
    order = torch.randperm(len(corpus)).tolist()
    examples = [corpus[i] for i in order]
    if how == 'stratified':
        return batching.stratified_batches(examples, batch_size, chunks, torch.Generator().manual_seed(0))
    batches = []
    for start in range(0, len(examples), batch_size):
        x = torch.stack([e[0] for e in examples[start:start + batch_size]])
        y = torch.stack([e[1] for e in examples[start:start + batch_size]])
        if how == 'untrimmed':
            batches.append([(x, y)])
        else:
            batches.append(batching.split_batch(x, y, 1 if how == 'trimmed' else chunks, trim=True))
    return batches


def costs(batches):
    positions = sum(yp.numel() for pieces in batches for _, yp in pieces)
    cells = sum(yp.size(0) * yp.size(1) ** 2 for pieces in batches for _, yp in pieces)
    return positions, cells


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--chunks', type=int, default=4)
    args = parser.parse_args()
    with open(os.path.join(ROOT, 'wiki.txt'), encoding='utf-8') as f:
        corpus = dataset.CharCorruptionDataset(f.read(), 128)
    ways = ['untrimmed', 'trimmed', 'sorted chunks', 'stratified']
    print(f'# {args.epochs} epochs of {len(corpus)} passages, batch {args.batch_size}, {args.chunks} chunks')
    reference = None
    for how in ways:
        utils.set_seed(0)
        epochs = [epoch_batches(corpus, args.batch_size, args.chunks, how) for _ in range(args.epochs)]
        positions, cells = map(sum, zip(*(costs(batches) for batches in epochs)))
        reference = reference or (positions, cells)
        print(f'{how:14s} positions {positions / reference[0]:5.2f}x  attention cells '
              f'{cells / reference[1]:5.2f}x', flush=True)


if __name__ == '__main__':
    main()
