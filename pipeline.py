"""The whole experiment: London baseline, the three model sequences, dev and test predictions.

    python pipeline.py [--recipe faithful|faithful-2024|laptop] [--outdir DIR] [--jobs N] [-- extra run.py flags]
    python pipeline.py --variants vanilla,synthesizer --seeds 0,1,2 [--recipe ...] [--jobs N] [-- ...]

Runs the assignment's command sequences through src/run.py:
  0. the London baseline;
  1. vanilla without pretraining: finetune, then evaluate on dev and test;
  2. vanilla: pretrain, finetune, evaluate on dev and test;
  3. synthesizer: pretrain, finetune, evaluate on dev and test.
The sequences are independent: --jobs N runs up to N of them at once, each
step in its own process, the longest first (default: up to four on a machine
with a CUDA GPU, else one per CPU core, each with a share of the cores'
threads; on a CPU, once nothing waits, each core no running sequence uses
goes to one still running, from its next optimizer step: set
OMP_NUM_THREADS to fix every step's threads instead; docs/recipes.md has
the timings on a 2-core CPU). Each sequence's
output goes to OUTDIR/logs/NAME.log and one status line shows every
sequence's step, progress and ETA.

A step whose output file already exists is skipped, and an interrupted
training step (its OUTPUT.ckpt exists) is continued with --resume, so an
interrupted pipeline picks up where it stopped. A failing step stops its own
sequence; the others finish and the pipeline exits non-zero naming the step
and its log. At the end it prints a table of dev accuracies, writes
OUTDIR/results.md (accuracies, test predictions, final pretraining loss, time
per step, machine, torch version, date and every command) and, when
matplotlib is installed, the pretraining loss curves in pretrain_loss.png.

The recipe defaults to 'faithful' (the original settings) on a machine with a
CUDA GPU and to 'laptop' otherwise; the faithful outputs go to the repo root
under the assignment's file names, the others' to a folder named for the
recipe (laptop/, faithful-2024/).

A comparison (--variants and/or --seeds; defaults vanilla,synthesizer and 0)
runs, for each seed, the no-pretraining sequence and each variant's, every
step with --seed N, in OUTDIR/seedN/ (OUTDIR defaults to comparison/ under
the recipe's folder), and the London baseline once. Its results.md has one
row per variant: mean and range of dev accuracy over seeds, a Wilson 95%
interval on the pooled count, step time and the year's expectation, then a
paired test between every two rows (compare.py). pretrain_loss.png draws
each variant's mean over seeds in a band; attention.png every layer and head
of each variant's first seed on a dev question (attention_map.py).

This file says what runs (the sequences) and holds the command line;
src/scheduler.py runs them, src/report.py writes the results.
"""
import argparse
import os
import shlex
import signal
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, 'src'))
import compare  # noqa: E402
import recipes  # noqa: E402
import report  # noqa: E402
from scheduler import Runner, Sequence, Step  # noqa: E402

CORPUS = 'wiki.txt'
DEV = report.DEV
TEST = 'birth_test_inputs.tsv'
TRAIN = 'birth_places_train.tsv'


VARIANTS = ('vanilla', 'synthesizer')  # each one a pretrain-and-finetune sequence


def evaluations(out, title, variant, params, prefix):
    """The steps that evaluate `params` on dev and test, writing OUT/PREFIX.SPLIT.predictions."""
    return [Step(f'{title}: evaluate {split}', f'evaluate {split}', os.path.join(out, f'{prefix}.{split}.predictions'),
                 ['evaluate', variant, CORPUS, '--reading_params_path', params, '--eval_corpus_path', corpus,
                  '--outputs_path', os.path.join(out, f'{prefix}.{split}.predictions')])
            for split, corpus in (('dev', DEV), ('test', TEST))]


def no_pretraining(out):
    """Vanilla without pretraining: finetune from scratch, then evaluate."""
    params = os.path.join(out, 'vanilla.model.params')
    return Sequence('no-pretrain', os.path.join(out, 'logs', 'vanilla-nopretrain.log'), [
        Step('vanilla, no pretraining: finetune', 'finetune', params,
             ['finetune', 'vanilla', CORPUS, '--writing_params_path', params, '--finetune_corpus_path', TRAIN]),
        *evaluations(out, 'vanilla, no pretraining', 'vanilla', params, 'vanilla.nopretrain')])


def pretrain_and_finetune(out, variant):
    """`variant`: pretrain, finetune from the pretrained params, then evaluate."""
    pretrained, finetuned = (os.path.join(out, f'{variant}.{stage}.params') for stage in ('pretrain', 'finetune'))
    return Sequence(variant, os.path.join(out, 'logs', f'{variant}-pretrain.log'), [
        Step(f'{variant}: pretrain', 'pretrain', pretrained,
             ['pretrain', variant, CORPUS, '--writing_params_path', pretrained]),
        Step(f'{variant}: finetune', 'finetune', finetuned,
             ['finetune', variant, CORPUS, '--reading_params_path', pretrained, '--writing_params_path', finetuned,
              '--finetune_corpus_path', TRAIN]),
        *evaluations(out, variant, variant, finetuned, f'{variant}.pretrain')])


def london(out):
    return Sequence('london', os.path.join(out, 'logs', 'london.log'), [Step('London baseline', 'dev', None, None)])


def sequences(out):
    """The independent sequences, in the order a single job runs them."""
    return [london(out), no_pretraining(out)] + [pretrain_and_finetune(out, variant) for variant in VARIANTS]


def comparison(out, variants, seeds):
    """London once; then for each seed, in OUT/seedN with --seed N on every step, no pretraining and each variant."""
    seqs = [london(out)]
    for seed in seeds:
        folder = os.path.join(out, f'seed{seed}')
        for seq in [no_pretraining(folder)] + [pretrain_and_finetune(folder, variant) for variant in variants]:
            seq.key += f'/seed{seed}'
            for step in seq.steps:
                step.name += f' (seed {seed})'
                step.args += ['--seed', str(seed)]
            seqs.append(seq)
    return seqs


def steps(out):
    """(name, output file, run.py arguments) for every model step, in order."""
    return [(s.name, s.output, s.args) for seq in sequences(out) for s in seq.steps if s.args is not None]


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit status 2), not the usage text."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message}; see --help\n')


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a whole number')
    if value < 1:
        raise argparse.ArgumentTypeError(f'{value} is not at least 1')
    return value


def variant_list(text):
    """'vanilla,synthesizer' -> ['vanilla', 'synthesizer'], each one a variant src/run.py accepts, none twice."""
    names = text.split(',')
    for name in names:
        if name not in recipes.VARIANTS:
            raise argparse.ArgumentTypeError(f'{name!r} is not a variant src/run.py accepts '
                                             f'({", ".join(recipes.VARIANTS)})')
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f'{text!r} names a variant twice')
    return names


def seed_list(text):
    """'0,1,2' -> [0, 1, 2]: whole numbers from 0, none twice."""
    try:
        seeds = [int(part) for part in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a comma-separated list of whole numbers')
    if min(seeds) < 0 or len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f'{text!r}: seeds are whole numbers from 0, each once')
    return seeds


def cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def interrupt(signum, frame):
    """SIGTERM: stop as Ctrl-C does (the running steps are asked to stop and save a checkpoint)."""
    raise KeyboardInterrupt


def build_parser(has_gpu):
    parser = ArgumentParser(prog='pipeline.py', description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--recipe', choices=list(recipes.RECIPES), default='faithful' if has_gpu else 'laptop')
    parser.add_argument('--outdir', help="where params and predictions go (default: '.' for faithful, the "
                                         "recipe's name for the others; a comparison in comparison/ under it)")
    parser.add_argument('--jobs', type=positive_int,
                        help='sequences run at once, each step in its own process (default: up to four on a '
                             'machine with a CUDA GPU, else one per CPU core)')
    parser.add_argument('--variants', type=variant_list,
                        help='compare these variants, comma-separated (default for a comparison: vanilla,synthesizer)')
    parser.add_argument('--seeds', type=seed_list, help='compare over these seeds, comma-separated (default: 0)')
    parser.add_argument('extra', nargs='*', help='further src/run.py flags for every step (after --)')
    return parser


def main():
    has_gpu = torch.cuda.is_available()
    parser = build_parser(has_gpu)
    args = parser.parse_args()
    pipeline_command = shlex.join([sys.executable, 'pipeline.py'] + sys.argv[1:])
    comparing = args.variants is not None or args.seeds is not None
    if comparing and any(flag == '--seed' or flag.startswith('--seed=') for flag in args.extra):
        parser.error('--seed among the run.py flags: with --seeds or --variants each sequence gets its own')
    variants, seeds = args.variants or list(VARIANTS), args.seeds or [0]
    out = args.outdir or ('.' if args.recipe == 'faithful' else args.recipe)
    if comparing and not args.outdir:
        out = os.path.join(out, 'comparison')
    os.chdir(ROOT)
    os.makedirs(out, exist_ok=True)
    seqs = comparison(out, variants, seeds) if comparing else sequences(out)
    jobs = min(args.jobs or (4 if has_gpu else cores()), len(seqs))
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    # DataLoader workers and intra-op threads share the cores; on a CPU alone, the runner sets each step's
    # threads and gives the cores that finished sequences leave to those still running
    share = jobs > 1 and 'OMP_NUM_THREADS' not in os.environ
    if share:
        env['OMP_NUM_THREADS'] = str(max(1, cores() // jobs))
    print(f'Recipe: {args.recipe} ({"CUDA GPU found" if has_gpu else "no GPU found"}); outputs in {out}/')
    if args.recipe == 'laptop':
        print('For the original settings run: python pipeline.py --recipe faithful')
    print(f'{jobs} sequence{"s" if jobs > 1 else ""} at a time; logs in {os.path.join(out, "logs")}/', flush=True)

    runner = Runner(seqs, jobs, args.recipe, args.extra, env, cores=cores() if share and not has_gpu else None)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        runner.run()
    except KeyboardInterrupt:
        print('pipeline interrupted; run the same command again to continue (an interrupted training step '
              'resumes from its checkpoint)', file=sys.stderr)
        sys.exit(130)
    if runner.failures:
        sys.exit('\n'.join(runner.failures))

    results = os.path.join(out, 'results.md')
    if comparing:
        finish_comparison(results, out, variants, seeds, args, jobs, runner, pipeline_command)
        return
    if runner.ran == 0 and os.path.exists(results):
        rows = report.result_rows(out)
        print(f'\nEvery step was already done: {results} left as it was (delete it to write it again)')
    else:
        rows = report.write_results(results, out, args.recipe, jobs, runner, pipeline_command)
        print(f'\nResults written to {results}')
    print(f'\n| run ({args.recipe} recipe) | dev accuracy |\n|---|---|')
    print(f'| London baseline | {rows[0][1]} |')
    for (_, label, _, _), dev, *_ in rows[1:]:
        print(f'| {label} | {dev} |')
    report.plot_pretraining(out)


def finish_comparison(results, out, variants, seeds, args, jobs, runner, pipeline_command):
    """results.md (left as it was when every step was done), the table on stdout, the curves, the attention maps."""
    if runner.ran == 0 and os.path.exists(results):
        table = compare.comparison(out, variants, seeds, args.recipe)
        print(f'\nEvery step was already done: {results} left as it was (delete it to write it again)')
    else:
        table = compare.write_results(results, out, variants, seeds, args.recipe, jobs, runner, pipeline_command)
        print(f'\nResults written to {results}')
    print('\n' + '\n'.join(table))
    curves = [path for variant in variants
              for path in compare.per_seed(out, seeds, f'{variant}.pretrain.params.metrics.jsonl')]
    report.plot(curves, os.path.join(out, 'pretrain_loss.png'))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return  # report.plot said how to get it
    params = [arg for variant in variants
              for arg in ('--model', variant, compare.per_seed(out, seeds[:1], f'{variant}.finetune.params')[0])]
    picture = subprocess.run([sys.executable, 'attention_map.py', *params, '--dev', '1',
                              '--output', os.path.join(out, 'attention.png'), '--', '--recipe', args.recipe,
                              *args.extra], capture_output=True, text=True)
    print((picture.stdout or picture.stderr).strip())


if __name__ == '__main__':
    main()
