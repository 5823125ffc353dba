"""The whole experiment: London baseline, the three model sequences, dev and test predictions.

    python pipeline.py [--recipe faithful|laptop] [--outdir DIR] [-- extra run.py flags]

Runs the assignment's command sequences through src/run.py:
  1. vanilla without pretraining: finetune, then evaluate on dev and test;
  2. vanilla: pretrain, finetune, evaluate on dev and test;
  3. synthesizer: pretrain, finetune, evaluate on dev and test;
and ends with a table of dev accuracies and, when matplotlib is installed,
the pretraining loss curves in pretrain_loss.png. A step whose output file already
exists is skipped, so an interrupted pipeline picks up where it stopped.

The recipe defaults to 'faithful' (the original settings) on a machine with a
CUDA GPU and to 'laptop' otherwise; the faithful outputs go to the repo root
under the assignment's file names, the laptop ones to laptop/.
"""
import argparse
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, 'src'))
import utils  # noqa: E402

CORPUS = 'wiki.txt'
DEV = 'birth_dev.tsv'
TEST = 'birth_test_inputs.tsv'
TRAIN = 'birth_places_train.tsv'


def steps(out):
    """(name, output file, run.py arguments) for every step, in order."""
    p = lambda name: os.path.join(out, name)  # noqa: E731
    result = [
        ('vanilla, no pretraining: finetune', p('vanilla.model.params'),
         ['finetune', 'vanilla', CORPUS, '--writing_params_path', p('vanilla.model.params'),
          '--finetune_corpus_path', TRAIN]),
    ]
    for split, corpus in (('dev', DEV), ('test', TEST)):
        result.append((f'vanilla, no pretraining: evaluate {split}', p(f'vanilla.nopretrain.{split}.predictions'),
                       ['evaluate', 'vanilla', CORPUS, '--reading_params_path', p('vanilla.model.params'),
                        '--eval_corpus_path', corpus, '--outputs_path', p(f'vanilla.nopretrain.{split}.predictions')]))
    for variant in ('vanilla', 'synthesizer'):
        result += [
            (f'{variant}: pretrain', p(f'{variant}.pretrain.params'),
             ['pretrain', variant, CORPUS, '--writing_params_path', p(f'{variant}.pretrain.params')]),
            (f'{variant}: finetune', p(f'{variant}.finetune.params'),
             ['finetune', variant, CORPUS, '--reading_params_path', p(f'{variant}.pretrain.params'),
              '--writing_params_path', p(f'{variant}.finetune.params'), '--finetune_corpus_path', TRAIN]),
        ]
        for split, corpus in (('dev', DEV), ('test', TEST)):
            result.append((f'{variant}: evaluate {split}', p(f'{variant}.pretrain.{split}.predictions'),
                           ['evaluate', variant, CORPUS, '--reading_params_path', p(f'{variant}.finetune.params'),
                            '--eval_corpus_path', corpus,
                            '--outputs_path', p(f'{variant}.pretrain.{split}.predictions')]))
    return result


def dev_accuracy(predictions):
    total, correct = utils.evaluate_places(os.path.join(ROOT, DEV), predictions)
    return f'{correct / total * 100:.1f}% ({int(correct)}/{int(total)})'


def read_predictions(path):
    with open(path, encoding='utf-8') as f:
        return [line.rstrip('\n') for line in f]


def main():
    has_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--recipe', choices=['faithful', 'laptop'], default='faithful' if has_gpu else 'laptop')
    parser.add_argument('--outdir', help="where params and predictions go (default: '.' for faithful, "
                                         "'laptop' for laptop)")
    parser.add_argument('extra', nargs='*', help='further src/run.py flags for every step (after --)')
    args = parser.parse_args()
    out = args.outdir or ('.' if args.recipe == 'faithful' else 'laptop')
    os.chdir(ROOT)
    os.makedirs(out, exist_ok=True)
    print(f'Recipe: {args.recipe} ({"CUDA GPU found" if has_gpu else "no GPU found"}); outputs in {out}/')
    if args.recipe == 'laptop':
        print('For the original settings run: python pipeline.py --recipe faithful')

    subprocess.run([sys.executable, 'london_baseline.py'], check=True)
    for name, output, run_args in steps(out):
        if os.path.exists(output):
            print(f'[skip] {name}: {output} exists')
            continue
        print(f'[run]  {name}', flush=True)
        start = time.time()
        command = [sys.executable, 'src/run.py'] + run_args + ['--recipe', args.recipe] + args.extra
        if os.path.exists(output + '.ckpt'):  # an interrupted training step: continue it
            command.append('--resume')
        if subprocess.run(command).returncode != 0:
            sys.exit(f'pipeline stopped: step "{name}" failed (command: {" ".join(command)})')
        print(f'[done] {name} in {time.time() - start:.0f} s', flush=True)

    print(f'\n| run ({args.recipe} recipe) | dev accuracy |\n|---|---|')
    with open(DEV, encoding='utf-8') as f:
        n_dev = sum(1 for _ in f)
    print(f'| London baseline | {dev_accuracy(["London"] * n_dev)} |')
    for label, name in (('vanilla, no pretraining', 'vanilla.nopretrain.dev.predictions'),
                        ('vanilla, pretrain + finetune', 'vanilla.pretrain.dev.predictions'),
                        ('synthesizer, pretrain + finetune', 'synthesizer.pretrain.dev.predictions')):
        print(f'| {label} | {dev_accuracy(read_predictions(os.path.join(out, name)))} |')
    plot_pretraining(out)


def plot_pretraining(out):
    """Draw both variants' pretraining loss to OUT/pretrain_loss.png when matplotlib is installed."""
    metrics = [os.path.join(out, f'{variant}.pretrain.params.metrics.jsonl') for variant in ('vanilla', 'synthesizer')]
    metrics = [path for path in metrics if os.path.exists(path)]
    if not metrics:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print('\nFor loss curves: pip install matplotlib, then python plot_metrics.py ' + ' '.join(metrics)
              + f' --output {os.path.join(out, "pretrain_loss.png")}')
        return
    subprocess.run([sys.executable, 'plot_metrics.py', *metrics, '--output', os.path.join(out, 'pretrain_loss.png')])


if __name__ == '__main__':
    main()
