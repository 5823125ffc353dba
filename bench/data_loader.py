"""Cost of producing span-corruption batches: DataLoader with 0 workers against 4.

    python bench/data_loader.py [--epochs 3]

Prints the seconds per epoch of batches (batch 128, wiki.txt, shuffled, as the
pretraining recipe draws them) for each worker count, beside one measured
training step of the default model, so the share of the data path in a step
can be read off.
"""
import argparse
import os
import sys
import time

import torch
from torch.utils.data import DataLoader

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, os.path.join(ROOT, 'src'))
import dataset  # noqa: E402
import model  # noqa: E402
import utils  # noqa: E402


def seconds_per_epoch(corpus, workers, epochs):
    start = time.perf_counter()
    batches = 0
    for _ in range(epochs):
        for _ in DataLoader(corpus, shuffle=True, batch_size=128, num_workers=workers):
            batches += 1
    return (time.perf_counter() - start) / epochs, batches // epochs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--epochs', type=int, default=3)
    args = parser.parse_args()
    with open(os.path.join(ROOT, 'wiki.txt'), encoding='utf-8') as f:
        corpus = dataset.CharCorruptionDataset(f.read(), 128)
    utils.set_seed(0)
    gpt = model.GPT(model.GPTConfig(corpus.vocab_size, 128, n_layer=4, n_head=8, n_embd=256))
    x, y = next(iter(DataLoader(corpus, shuffle=True, batch_size=128)))
    start = time.perf_counter()
    _, loss = gpt(x, y)
    loss.backward()
    step = time.perf_counter() - start
    print(f'# data path, batch 128, {os.cpu_count()} cpus, torch {torch.__version__}')
    print(f'one training step (forward + backward, default model): {step:.2f} s')
    for workers in (0, 4):
        per_epoch, n = seconds_per_epoch(corpus, workers, args.epochs)
        print(f'num_workers={workers}: {per_epoch:.3f} s per epoch of {n} batches '
              f'({per_epoch / n * 1000:.1f} ms per batch, {per_epoch / n / step * 100:.2f}% of a step)')


if __name__ == '__main__':
    main()
