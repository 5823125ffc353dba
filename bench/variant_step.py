"""Training-step time of each variant against vanilla at equal settings, as a ratio, in one process.

    OMP_NUM_THREADS=1 python bench/variant_step.py [--variants rope perceiver synthesizer] [--bottleneck_dims 32 64]
        [--repeats 8] [--batch_size 64]

Each model (laptop width: 4 layers, 4 heads, d=128, no dropout; block 128)
takes forward, backward and an AdamW step on the same full-length batch
(127 positions, so no padding is trimmed), and the models take turns, step
by step, so that a load from other processes falls on all of them alike.
Printed: the median seconds per step of each model and its ratio to vanilla's.
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, 'src'))
import model  # noqa: E402
import recipes  # noqa: E402

BLOCK_SIZE, VOCAB = recipes.BLOCK_SIZE, 256
LAPTOP_MODEL = recipes.LAPTOP['model']


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--variants', nargs='+', default=['rope', 'perceiver'],
                        choices=['rope', 'perceiver', 'synthesizer'], help='timed against vanilla')
    parser.add_argument('--bottleneck_dims', type=int, nargs='+', default=[32, 64], help="the perceiver's m")
    parser.add_argument('--repeats', type=int, default=8)
    parser.add_argument('--batch_size', type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    configs = {'vanilla': {}}
    for variant in args.variants:
        if variant == 'perceiver':
            configs.update({f'perceiver m={m}': dict(perceiver=True, bottleneck_dim=m) for m in args.bottleneck_dims})
        else:
            configs[variant] = {variant: True}
    models = {name: model.GPT(model.GPTConfig(VOCAB, BLOCK_SIZE, **LAPTOP_MODEL, **settings))
              for name, settings in configs.items()}
    optimizers = {name: torch.optim.AdamW(gpt.parameters(), lr=1e-4) for name, gpt in models.items()}
    x = torch.randint(2, VOCAB, (args.batch_size, BLOCK_SIZE - 1))
    y = torch.randint(2, VOCAB, (args.batch_size, BLOCK_SIZE - 1))
    times = {name: [] for name in models}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, gpt in models.items():
            start = time.perf_counter()
            _, loss = gpt(x, y)
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if repeat:
                times[name].append(time.perf_counter() - start)
    print(f'{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} '
          f'thread(s); batch {args.batch_size} x {BLOCK_SIZE - 1}, {args.repeats} timed steps each, interleaved')
    base = statistics.median(times['vanilla'])
    for name, values in times.items():
        median = statistics.median(values)
        print(f'{name:16s} {median:.3f} s/step (min {min(values):.3f})  {median / base:.2f}x vanilla')


if __name__ == '__main__':
    main()
