"""Short pretraining runs at equal steps: the perceiver's residual choices, and the variants side by side.

    OMP_NUM_THREADS=1 python bench/short_runs.py perceiver:query perceiver:none perceiver:up perceiver:down
    OMP_NUM_THREADS=1 python bench/short_runs.py vanilla rope perceiver --steps 300

Each run trains the laptop recipe's model (4 layers, 4 heads, width 128, no
dropout) on wiki.txt with the laptop recipe's pretraining settings, cut at
--steps, from the same seed: the same initial weights where the models share
them, the same batches. A `perceiver:R` run replaces the residual connections
of the perceiver's two cross-attention blocks (R below; `query` is what
src/model.py does). Printed per run: the mean training loss over the last 50
steps, the loss on 1,024 fixed span-corruption draws, and seconds per step.
"""
import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, 'src'))
import dataset  # noqa: E402
import model  # noqa: E402
import recipes  # noqa: E402
import trainer  # noqa: E402
import utils  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
BLOCK_SIZE = recipes.BLOCK_SIZE
LAPTOP_MODEL = recipes.LAPTOP['model']


def down_forward(residual):
    def forward(self, x_input):
        y = self.attn(x_input, self.ln1(self.C))
        y = self.C + y if residual else y
        return y + self.mlp(self.ln2(y))
    return forward


def up_forward(residual):
    def forward(self, y, x_input):
        x = self.attn(self.ln1(y), x_input)
        x = x_input + x if residual else x
        return x + self.mlp(self.ln2(x))
    return forward


# residual choice -> (residual around the down block's attention, around the up block's)
RESIDUALS = {'query': (True, True), 'none': (False, False), 'up': (False, True), 'down': (True, False)}


def build(name, vocab_size, bottleneck_dim, seed):
    variant, _, residual = name.partition(':')
    settings = {'vanilla': {}, 'rope': dict(rope=True),
                'perceiver': dict(perceiver=True, bottleneck_dim=bottleneck_dim)}[variant]
    utils.set_seed(seed)
    gpt = model.GPT(model.GPTConfig(vocab_size, BLOCK_SIZE, **LAPTOP_MODEL, **settings))
    if residual:
        down, up = RESIDUALS[residual]
        gpt.down_block.forward = types.MethodType(down_forward(down), gpt.down_block)
        gpt.up_block.forward = types.MethodType(up_forward(up), gpt.up_block)
    return gpt


@torch.no_grad()
def fixed_loss(gpt, examples):
    gpt.eval()
    x, y = (torch.stack(t) for t in zip(*examples))
    total = sum(gpt(x[i:i + 256], y[i:i + 256], loss_reduction='sum')[1].item() for i in range(0, len(x), 256))
    gpt.train()
    return total / int((y != 0).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', help="vanilla, rope, perceiver, or perceiver:R with R in "
                                                f"{', '.join(RESIDUALS)}")
    parser.add_argument('--steps', type=int, default=300)
    parser.add_argument('--bottleneck_dim', type=int, default=32)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    with open(os.path.join(ROOT, 'wiki.txt'), encoding='utf-8') as f:
        corpus = dataset.CharCorruptionDataset(f.read(), BLOCK_SIZE)
    random.seed(1234)
    examples = [corpus[i % len(corpus)] for i in range(1024)]
    n = len(corpus)
    settings = dict(max_epochs=230, max_steps=args.steps, batch_size=128, learning_rate=6e-3, lr_decay=True,
                    warmup_tokens=100 * 128 * (BLOCK_SIZE - 1), final_tokens=230 * n * (BLOCK_SIZE - 1),
                    first_step_lr='scheduled', chunks=4, num_workers=0, show_progress=False,
                    checkpoint_minutes=1e9)
    print(f'{platform.processor() or platform.machine()}, torch {torch.__version__}, '
          f'{torch.get_num_threads()} thread(s); {args.steps} steps, batch 128, bottleneck_dim {args.bottleneck_dim}, '
          f'seed {args.seed}', flush=True)
    for name in args.runs:
        gpt = build(name, corpus.vocab_size, args.bottleneck_dim, args.seed)
        with tempfile.TemporaryDirectory() as folder:
            metrics = os.path.join(folder, 'metrics.jsonl')
            config = trainer.TrainerConfig(metrics_path=metrics, checkpoint_path=os.path.join(folder, 'ckpt'),
                                           **settings)
            utils.set_seed(args.seed)  # the same batches for every run
            start = time.time()
            trainer.Trainer(gpt, corpus, None, config, device='cpu').train()
            seconds = time.time() - start
            with open(metrics) as f:
                losses = [json.loads(line)['loss'] for line in f]
        last = losses[-50:]
        print(f'{name:16s} train loss (last {len(last)} steps) {sum(last) / len(last):.4f}  '
              f'fixed-draw loss {fixed_loss(gpt, examples):.4f}  {seconds / len(losses):.3f} s/step  '
              f'loss at steps 100/200/{len(losses)}: '
              f'{" ".join(f"{losses[min(s, len(losses)) - 1]:.3f}" for s in (100, 200, len(losses)))}',
              flush=True)


if __name__ == '__main__':
    main()
