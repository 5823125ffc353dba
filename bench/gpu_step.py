"""Faithful pretraining steps, today's GPU path against each speed-up, as ratios measured in one run.

    python bench/gpu_step.py [--variant vanilla] [--epochs 2] [--documents N] [--device cuda]

Each configuration trains the faithful model (4 layers, 8 heads, d=256,
block 128) with the pretraining recipe's batch 128 and schedule on wiki.txt,
through Trainer.train as run.py does, so the DataLoader workers' start at
every epoch, building the batches and the host syncs are all in the time.
One warm-up epoch (capture, compilation, worker start-up caches) is not
timed. Rows: today's faithful GPU path (4 workers, whole trimmed batches,
bf16 autocast on a GPU, fused AdamW), then the same with each of
--data_path device, --train_step fixed and --train_step graph added in turn.
On a CPU (no CUDA) it runs a small smoke version: --documents 128 by default.
"""
import argparse
import datetime
import os
import platform
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, os.path.join(ROOT, 'src'))
import dataset  # noqa: E402
import model  # noqa: E402
import recipes  # noqa: E402
import trainer  # noqa: E402
import utils  # noqa: E402

# name -> settings over the faithful pretraining recipe
CONFIGS = {
    "today's path (4 workers, trimmed whole batches)": dict(),
    '+ --data_path device (no workers)': dict(data_path='device', num_workers=0),
    '+ --train_step fixed (padded, 1 sync/epoch)': dict(data_path='device', num_workers=0, train_step='fixed'),
    '+ --train_step graph (CUDA graph)': dict(data_path='device', num_workers=0, train_step='graph'),
}


def time_config(corpus, variant, settings, epochs, device, compile_model):
    utils.set_seed(0)
    # the GPU recipe, also when smoke-testing
    model_settings, pretrain = recipes.settings('faithful', variant, 'pretrain', len(corpus), torch.device('cuda'))
    config = model.GPTConfig(corpus.vocab_size, recipes.BLOCK_SIZE, **recipes.VARIANTS[variant], **model_settings)
    gpt = model.GPT(config)
    train_settings = dict(pretrain, precision='auto', **settings)
    if device.type != 'cuda':
        train_settings['num_workers'] = min(train_settings['num_workers'], 2)
    cfg = trainer.TrainerConfig(show_progress=False, compile=compile_model,
                                **dict(train_settings, max_epochs=1 + epochs))
    t = trainer.Trainer(gpt, corpus, None, cfg, device=device)
    per_epoch = -(-len(corpus) // cfg.batch_size)
    marks = {}

    def mark(tr):  # the clock starts when the warm-up epoch's last step is done
        if tr.state.step == per_epoch:
            if device.type == 'cuda':
                torch.cuda.synchronize()
            marks['start'] = time.perf_counter()

    t.add_callback('on_batch_end', mark)
    t.train()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - marks['start']
    steps = t.state.step - per_epoch
    return elapsed / steps, steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--variant', choices=['vanilla', 'synthesizer'], default='vanilla')
    parser.add_argument('--epochs', type=int, default=2, help='timed epochs per configuration')
    parser.add_argument('--documents', type=int, help='use the first N documents of wiki.txt '
                                                      '(default: all 2,937 on a GPU, 128 on a CPU)')
    parser.add_argument('--device', help='default: CUDA when present')
    parser.add_argument('--compile', action='store_true', help='also a row with torch.compile on the last path')
    args = parser.parse_args()
    device = utils.resolve_device(args.device)
    with open(os.path.join(ROOT, 'wiki.txt'), encoding='utf-8') as f:
        lines = f.read().split('\n')[:-1]
    n = args.documents or (len(lines) if device.type == 'cuda' else 128)
    corpus = dataset.CharCorruptionDataset('\n'.join(lines[:n]) + '\n', recipes.BLOCK_SIZE)
    where = (torch.cuda.get_device_name() if device.type == 'cuda'
             else f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads')
    print(f'# faithful pretraining steps, {args.variant}, batch 128, {n} documents, {args.epochs} timed epochs; '
          f'torch {torch.__version__}; {where}; {datetime.date.today()}')
    configs = dict(CONFIGS)
    if args.compile:
        configs['--train_step fixed + --compile'] = dict(data_path='device', num_workers=0, train_step='fixed')
    reference = None
    for name, settings in configs.items():
        compile_model = name.endswith('--compile')
        seconds, steps = time_config(corpus, args.variant, settings, args.epochs, device, compile_model)
        reference = reference or seconds
        tokens = 128 * (recipes.BLOCK_SIZE - 1) / seconds
        full_run = seconds * 650 * -(-2937 // 128)
        print(f'{name:50s} {seconds * 1000:8.2f} ms/step {tokens:11.0f} tokens/s {reference / seconds:6.2f}x'
              f'   650 epochs: {full_run / 60:6.1f} min  ({steps} steps)', flush=True)


if __name__ == '__main__':
    main()
