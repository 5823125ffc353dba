"""Training-step throughput of the slow reference and each fast path, as ratios, in one process.

    python bench/train_step.py [--variant vanilla] [--model faithful] [--steps 6] [--batch_size 128]

Every configuration trains the recipe's model (faithful: 4 layers, 8 heads,
d=256; laptop: 4 layers, 4 heads, d=128, no dropout; block 128) on the same
span-corruption batches of wiki.txt; tokens/s counts batch_size * 127
positions per step, as the learning-rate schedule does.
"""
import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, 'src'))
import dataset  # noqa: E402
import model  # noqa: E402
import recipes  # noqa: E402
import trainer  # noqa: E402
import utils  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)

# name -> (fused attention, TrainerConfig settings)
CONFIGS = {
    'reference (manual attention, fp32)': (False, dict(trim_padding=False, fused_optimizer=False)),
    'fused attention + fused AdamW, fp32': (True, dict(trim_padding=False)),
    '+ trim padding, fp32': (True, dict()),
    '+ 4 length-sorted chunks, fp32': (True, dict(chunks=4)),
    'fused + trim, bf16 autocast': (True, dict(precision='bf16')),
    'fused + 4 chunks, bf16 autocast': (True, dict(precision='bf16', chunks=4)),
    'fused + 4 chunks, Muon, fp32': (True, dict(chunks=4, optimizer='muon')),
}


class FixedBatches(torch.utils.data.Dataset):
    """The same pre-drawn examples for every configuration."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def time_config(variant, model_settings, fused, settings, examples, vocab_size, steps, batch_size, device,
                compile_model):
    utils.set_seed(0)
    config = model.GPTConfig(vocab_size, 128, synthesizer=variant == 'synthesizer', fused_attention=fused,
                             **model_settings)
    gpt = model.GPT(config)
    warmup = 2
    train_config = trainer.TrainerConfig(max_epochs=1, max_steps=warmup, batch_size=batch_size, learning_rate=6e-3,
                                         show_progress=False, compile=compile_model, **settings)
    data = FixedBatches(examples[:batch_size * (warmup + steps)])
    t = trainer.Trainer(gpt, data, None, train_config, device=device)
    t.train()  # warm-up steps (and compilation)
    t.state.step = 0
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    t.config.max_steps = steps
    t.train()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return steps * batch_size * 127 / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--variant', choices=['vanilla', 'synthesizer'], default='vanilla')
    parser.add_argument('--model', choices=['faithful', 'laptop'], default='faithful', help="the recipe's model")
    parser.add_argument('--steps', type=int, default=6, help='timed steps per configuration')
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--device', help='default: CUDA when present')
    parser.add_argument('--only', nargs='*',
                        help='substrings of configuration names to run (the reference always runs)')
    parser.add_argument('--compile', action='store_true', help='also torch.compile the fast configurations')
    args = parser.parse_args()
    device = utils.resolve_device(args.device)
    with open(os.path.join(ROOT, 'wiki.txt'), encoding='utf-8') as f:
        corpus = dataset.CharCorruptionDataset(f.read(), 128)
    utils.set_seed(0)
    examples = [corpus[i % len(corpus)] for i in range(args.batch_size * (args.steps + 2))]
    cpu = platform.processor() or platform.machine()
    where = torch.cuda.get_device_name() if device.type == 'cuda' else f'{cpu}, {torch.get_num_threads()} threads'
    print(f'# training step, {args.variant} ({args.model} model), batch {args.batch_size} x 127, '
          f'{args.steps} timed steps; torch {torch.__version__}; {where}')
    reference = None
    for name, (fused, settings) in CONFIGS.items():
        if reference is not None and args.only and not any(s in name for s in args.only):
            continue
        compile_model = args.compile and reference is not None
        tps = time_config(args.variant, recipes.RECIPES[args.model]['model'], fused, settings, examples,
                          corpus.vocab_size, args.steps, args.batch_size, device, compile_model)
        reference = reference or tps
        print(f'{name + (" + compile" if compile_model else ""):45s} {tps:10.0f} tokens/s  {tps / reference:5.2f}x',
              flush=True)


if __name__ == '__main__':
    main()
