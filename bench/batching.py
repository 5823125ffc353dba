"""Padding per epoch of span-corruption pretraining under each way of forming batches.

    python bench/batching.py [--epochs 3] [--batch_size 128] [--chunks 4] [--time_steps 0]

For whole shuffled epochs of wiki.txt it counts the positions the model runs
(rows x columns of every piece: the cost of the linear layers) and the
attention cells (rows x columns^2), as ratios against whole untrimmed
batches. With --time_steps N it also times N training steps of the laptop
model (width 128, 4 layers) on batches formed each way, in one process.
"""
import argparse
import os
import platform
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, os.path.join(ROOT, 'src'))
import dataset  # noqa: E402
import model  # noqa: E402
import trainer  # noqa: E402
import utils  # noqa: E402


def epoch_batches(corpus, batch_size, chunks, how):
    """One shuffled epoch as lists of (x, y) pieces, formed `how`."""
    order = torch.randperm(len(corpus)).tolist()
    examples = [corpus[i] for i in order]
    if how == 'stratified':
        return trainer.stratified_batches(examples, batch_size, chunks, torch.Generator().manual_seed(0))
    batches = []
    for start in range(0, len(examples), batch_size):
        x = torch.stack([e[0] for e in examples[start:start + batch_size]])
        y = torch.stack([e[1] for e in examples[start:start + batch_size]])
        if how == 'untrimmed':
            batches.append([(x, y)])
        else:
            batches.append(trainer.split_batch(x, y, 1 if how == 'trimmed' else chunks, trim=True))
    return batches


def costs(batches):
    positions = sum(yp.numel() for pieces in batches for _, yp in pieces)
    cells = sum(yp.size(0) * yp.size(1) ** 2 for pieces in batches for _, yp in pieces)
    return positions, cells


def seconds_per_step(corpus, batches, steps):
    """Forward, backward and AdamW step of the laptop model over the first `steps` batches."""
    utils.set_seed(0)
    gpt = model.GPT(model.GPTConfig(corpus.vocab_size, 128, n_layer=4, n_head=4, n_embd=128,
                                    embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0))
    optimizer = trainer.make_optimizer(gpt, trainer.TrainerConfig(learning_rate=6e-3), torch.device('cpu'))
    timed = batches[1:steps + 1]
    for i, pieces in enumerate(batches[:1] + timed):
        if i == 1:
            start = time.perf_counter()
        n_targets = sum(int((yp != 0).sum()) for _, yp in pieces)
        for xp, yp in pieces:
            _, loss_sum = gpt(xp, yp, loss_reduction='sum')
            (loss_sum / n_targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / len(timed)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--chunks', type=int, default=4)
    parser.add_argument('--time_steps', type=int, default=0, help='also time this many training steps per way')
    args = parser.parse_args()
    with open(os.path.join(ROOT, 'wiki.txt'), encoding='utf-8') as f:
        corpus = dataset.CharCorruptionDataset(f.read(), 128)
    ways = ['untrimmed', 'trimmed', 'sorted chunks', 'stratified']
    print(f'# {args.epochs} epochs of {len(corpus)} passages, batch {args.batch_size}, {args.chunks} chunks; '
          f'torch {torch.__version__}; {platform.processor() or platform.machine()}, '
          f'{torch.get_num_threads()} threads')
    reference = None
    for how in ways:
        utils.set_seed(0)
        epochs = [epoch_batches(corpus, args.batch_size, args.chunks, how) for _ in range(args.epochs)]
        positions, cells = map(sum, zip(*(costs(batches) for batches in epochs)))
        reference = reference or (positions, cells)
        line = (f'{how:14s} positions {positions / reference[0]:5.2f}x  attention cells '
                f'{cells / reference[1]:5.2f}x')
        if args.time_steps:
            line += f'  {seconds_per_step(corpus, epochs[0], args.time_steps):6.3f} s/step'
        print(line, flush=True)


if __name__ == '__main__':
    main()
