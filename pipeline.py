"""The whole experiment: London baseline, the three model sequences, dev and test predictions.

    python pipeline.py [--recipe faithful|laptop] [--outdir DIR] [--jobs N] [-- extra run.py flags]

Runs the assignment's command sequences through src/run.py:
  0. the London baseline;
  1. vanilla without pretraining: finetune, then evaluate on dev and test;
  2. vanilla: pretrain, finetune, evaluate on dev and test;
  3. synthesizer: pretrain, finetune, evaluate on dev and test.
The sequences are independent: --jobs N runs up to N of them at once, each
step in its own process (default: all at once on a machine with a CUDA GPU,
one at a time otherwise). Each sequence's output goes to OUTDIR/logs/NAME.log
and one status line shows every sequence's step, progress and ETA.

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
under the assignment's file names, the laptop ones to laptop/.
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
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
STATUS_EVERY_S = 30   # how often the status line is printed when stdout is not a terminal
POLL_S = 0.5          # how often running processes are checked (and, on a terminal, the status redrawn)

# (sequence key, row label, assignment expectation, public reports): SPEC section 11.
ROWS = [('london', 'London baseline (always "London")', '—', '5.0%'),
        ('no-pretrain', 'vanilla, no pretraining', 'well below 10%', '0.2% – 2%'),
        ('vanilla', 'vanilla, pretrain + finetune', 'at least 10%', '20% – 25%'),
        ('synthesizer', 'synthesizer, pretrain + finetune', 'at least 5% (test)', '5% – 13% (dev)')]


class Step:
    """One process of a sequence: `args` of src/run.py (or None: the London baseline), writing `output`."""

    def __init__(self, name, short, output, args):
        self.name, self.short, self.output, self.args = name, short, output, args

    def command(self, recipe, extra):
        if self.args is None:
            return [sys.executable, 'london_baseline.py']
        command = [sys.executable, 'src/run.py'] + self.args + ['--recipe', recipe] + list(extra)
        if os.path.exists(self.output + '.ckpt'):  # an interrupted training step: continue it
            command.append('--resume')
        return command

    @property
    def function(self):
        return self.args[0] if self.args else None

    @property
    def metrics(self):
        return self.output + '.metrics.jsonl' if self.function in ('pretrain', 'finetune') else None


class Sequence:
    """Steps that depend on each other, run in order; its log is OUT/logs/LOG.log."""

    def __init__(self, key, log, steps):
        self.key, self.log, self.steps = key, log, steps


def sequences(out):
    """The four independent sequences, in the order a single job runs them."""
    p = lambda name: os.path.join(out, name)  # noqa: E731
    logs = os.path.join(out, 'logs')

    def evaluations(title, variant, params, prefix):
        return [Step(f'{title}: evaluate {split}', f'evaluate {split}', p(f'{prefix}.{split}.predictions'),
                     ['evaluate', variant, CORPUS, '--reading_params_path', params, '--eval_corpus_path', corpus,
                      '--outputs_path', p(f'{prefix}.{split}.predictions')])
                for split, corpus in (('dev', DEV), ('test', TEST))]

    result = [
        Sequence('london', os.path.join(logs, 'london.log'), [Step('London baseline', 'dev', None, None)]),
        Sequence('no-pretrain', os.path.join(logs, 'vanilla-nopretrain.log'), [
            Step('vanilla, no pretraining: finetune', 'finetune', p('vanilla.model.params'),
                 ['finetune', 'vanilla', CORPUS, '--writing_params_path', p('vanilla.model.params'),
                  '--finetune_corpus_path', TRAIN]),
            *evaluations('vanilla, no pretraining', 'vanilla', p('vanilla.model.params'), 'vanilla.nopretrain')]),
    ]
    for variant in ('vanilla', 'synthesizer'):
        result.append(Sequence(variant, os.path.join(logs, f'{variant}-pretrain.log'), [
            Step(f'{variant}: pretrain', 'pretrain', p(f'{variant}.pretrain.params'),
                 ['pretrain', variant, CORPUS, '--writing_params_path', p(f'{variant}.pretrain.params')]),
            Step(f'{variant}: finetune', 'finetune', p(f'{variant}.finetune.params'),
                 ['finetune', variant, CORPUS, '--reading_params_path', p(f'{variant}.pretrain.params'),
                  '--writing_params_path', p(f'{variant}.finetune.params'), '--finetune_corpus_path', TRAIN]),
            *evaluations(variant, variant, p(f'{variant}.finetune.params'), f'{variant}.pretrain')]))
    return result


def steps(out):
    """(name, output file, run.py arguments) for every model step, in order."""
    return [(s.name, s.output, s.args) for seq in sequences(out) for s in seq.steps if s.args is not None]


# ---- progress of a running step -------------------------------------------------------------------------------

def last_metrics(path, since, size=16384):
    """The last complete lines of a metrics JSONL file, if it was written since `since` (else [])."""
    try:
        stat = os.stat(path)
        if stat.st_mtime < since:
            return []  # a file left by an earlier run, not yet rewritten
        with open(path, 'rb') as f:
            start = max(0, stat.st_size - size)
            f.seek(start)
            lines = f.read().split(b'\n')
    except OSError:
        return []
    lines = lines[1 if start else 0:-1]  # a partial first line (after seeking), and the unfinished last one
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def settings_of(text, function):
    """The key=value settings of the line run.py prints first (`pretrain vanilla: recipe=... max_epochs=...`)."""
    for line in text.splitlines():
        if line.startswith(function + ' ') and '=' in line:
            return dict(re.findall(r'(\w+)=(\S+)', line))
    return None


def count_examples(path):
    """How many training examples a corpus gives: its lines (documents or question-place pairs)."""
    with open(os.path.join(ROOT, path), encoding='utf-8') as f:
        lines = f.read().split('\n')
    return len(lines) - (lines[-1] == '')


def total_steps(settings, n_examples):
    """Optimizer steps of a training run with these printed settings, or None when they do not say."""
    try:
        total = int(settings['max_epochs']) * math.ceil(n_examples / int(settings['batch_size']))
        if settings.get('max_steps', 'None') != 'None':
            total = min(total, int(settings['max_steps']))
        return total
    except (KeyError, ValueError, ZeroDivisionError):
        return None


def duration(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f'{seconds}s'
    if seconds < 3600:
        return f'{seconds // 60}m{seconds % 60:02d}s'
    return f'{seconds // 3600}h{seconds // 60 % 60:02d}m'


def progress(rows, total, elapsed):
    """`step 1200/5290 ETA 3m10s` from a running step's last metrics rows (time per step over the last ones)."""
    if not rows:
        return f'starting ({duration(elapsed)})'
    step = rows[-1]['step']
    if total is None:
        return f'step {step}'
    first, last = rows[0], rows[-1]
    if last['step'] > first['step']:
        per_step = (last['wall_s'] - first['wall_s']) / (last['step'] - first['step'])
    else:
        per_step = last['wall_s'] / max(1, last['step'])
    return f'step {step}/{total} ETA {duration(max(0, total - step) * per_step)}'


# ---- running the sequences ------------------------------------------------------------------------------------

class Runner:
    """Runs sequences, up to `jobs` at once, one process per step, and keeps a status line."""

    def __init__(self, seqs, jobs, recipe, extra, env):
        self.pending, self.jobs, self.recipe, self.extra, self.env = list(seqs), jobs, recipe, extra, env
        self.running = {}     # sequence key -> dict(seq, index, step, process, log, log_offset, start)
        self.state = {seq.key: 'waiting' for seq in seqs}
        self.order = [seq.key for seq in seqs]
        self.logs = {seq.key: seq.log for seq in seqs}
        self.failures = []    # one line per failed step
        self.commands = []    # (sequence key, shell command or None, step, skipped)
        self.ran = 0          # steps run (not skipped) in this invocation
        self.tty = sys.stdout.isatty()
        self.status_shown = False
        self.last_status = time.time()
        self.n_examples = {}

    def say(self, message):
        if self.status_shown:
            sys.stdout.write('\r\033[K')
            self.status_shown = False
        print(message, flush=True)

    def shell(self, command):
        threads = self.env.get('OMP_NUM_THREADS')
        return (f'OMP_NUM_THREADS={shlex.quote(threads)} ' if threads else '') + shlex.join(command)

    def advance(self, seq, index):
        """Start the first step of `seq` from `index` on whose output is missing; skip the others."""
        for i in range(index, len(seq.steps)):
            step = seq.steps[i]
            if step.output is not None and os.path.exists(step.output):
                self.say(f'[skip] {step.name}: {step.output} exists')
                self.commands.append((seq.key, self.shell(step.command(self.recipe, self.extra)), step, True))
                continue
            command = step.command(self.recipe, self.extra)
            os.makedirs(os.path.dirname(seq.log), exist_ok=True)
            log = open(seq.log, 'a', encoding='utf-8')
            log.write(f'\n=== {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC  {step.name}\n'
                      f'$ {self.shell(command)}\n')
            log.flush()
            offset = log.tell()
            if step.output is not None:
                resuming = f', resuming from {step.output}.ckpt' if command[-1] == '--resume' else ''
                self.say(f'[run]  {step.name}{resuming} (log: {seq.log})')
            self.commands.append((seq.key, self.shell(command), step, False))
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=self.env)
            self.running[seq.key] = dict(seq=seq, index=i, step=step, process=process, log=log, log_offset=offset,
                                         start=time.time())
            self.state[seq.key] = 'running'
            return
        self.state[seq.key] = 'done'

    def finish(self, key, returncode):
        job = self.running.pop(key)
        job['log'].close()
        seq, step = job['seq'], job['step']
        if returncode != 0:
            self.state[key] = 'failed'
            self.failures.append(f'pipeline stopped: step "{step.name}" failed (exit status {returncode}); '
                                 f'log: {seq.log}' + last_line(seq.log, job['log_offset']))
            self.say(f'[fail] {step.name} (exit status {returncode}; log: {seq.log})')
            return
        if step.output is None:
            self.say(f'{step.name}: {last_line(seq.log, job["log_offset"], prefix="")}')
        else:
            self.ran += 1
            self.say(f'[done] {step.name} in {duration(time.time() - job["start"])}')
        self.advance(seq, job['index'] + 1)

    def describe(self, key):
        job = self.running.get(key)
        if job is None:
            return f'{key}: {self.state[key]}'
        step, elapsed = job['step'], time.time() - job['start']
        if step.metrics is None:
            return f'{key}: {step.short} ({duration(elapsed)})'
        if 'total' not in job:
            settings = settings_of(read_from(job['seq'].log, job['log_offset']), step.function)
            if settings is not None:
                corpus = CORPUS if step.function == 'pretrain' else TRAIN
                if corpus not in self.n_examples:
                    self.n_examples[corpus] = count_examples(corpus)
                job['total'] = total_steps(settings, self.n_examples[corpus])
        rows = last_metrics(step.metrics, job['start'] - 1)
        return f'{key}: {step.short} {progress(rows, job.get("total"), elapsed)}'

    def status_line(self, width=None):
        """Every sequence's state; for a terminal narrower than that, the running ones and a count of the rest."""
        line = ' | '.join(self.describe(key) for key in self.order)
        if width is not None and len(line) > width:
            others = [key for key in self.order if key not in self.running]
            line = ' | '.join([self.describe(key).replace(' step ', ' ') for key in self.order if key in self.running]
                              + ([f'+{len(others)} done or waiting'] if others else []))
        return line if width is None else line[:width]

    def status(self, force=False):
        if self.tty:
            line = self.status_line(shutil.get_terminal_size().columns - 1)
            sys.stdout.write('\r\033[K' + line)
            sys.stdout.flush()
            self.status_shown = True
        elif force or time.time() - self.last_status >= STATUS_EVERY_S:
            print(f'[status] {self.status_line()}', flush=True)
            self.last_status = time.time()

    def run(self):
        try:
            while self.pending or self.running:
                while self.pending and len(self.running) < self.jobs:
                    self.advance(self.pending.pop(0), 0)
                for key, job in list(self.running.items()):
                    returncode = job['process'].poll()
                    if returncode is not None:
                        self.finish(key, returncode)
                if self.running:
                    self.status()
                    time.sleep(POLL_S)
        except KeyboardInterrupt:
            self.stop()
            raise
        finally:
            if self.status_shown:
                sys.stdout.write('\r\033[K')
                sys.stdout.flush()

    def stop(self):
        """Ask every running step to stop (a training step saves a checkpoint first) and wait for it."""
        for job in self.running.values():
            if job['process'].poll() is None:
                job['process'].send_signal(signal.SIGTERM)
        for job in self.running.values():
            job['process'].wait()
            job['log'].close()


def read_from(path, offset, size=65536):
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            f.seek(offset)
            return f.read(size)
    except OSError:
        return ''


def last_line(path, offset, prefix='; it ends: '):
    """The last non-empty line a step wrote to its log (a progress bar's last state if nothing follows it)."""
    text = read_from(path, offset, size=1 << 24)
    lines = [line.strip() for line in re.split(r'[\r\n]', text) if line.strip()]
    return prefix + lines[-1][:500] if lines else ''


# ---- results --------------------------------------------------------------------------------------------------

def dev_score(predictions):
    """(correct, total) of predictions on the dev set."""
    total, correct = utils.evaluate_places(os.path.join(ROOT, DEV), predictions)
    return int(correct), int(total)


def dev_accuracy(predictions):
    correct, total = dev_score(predictions)
    return f'{correct / total * 100:.1f}% ({correct}/{total})'


def read_predictions(path):
    with open(path, encoding='utf-8') as f:
        return [line.rstrip('\n') for line in f]


def read_metrics(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def final_loss(rows):
    """Mean loss over the steps of the last epoch in a metrics file, said with the epoch and step count."""
    if not rows:
        return '—'
    epoch = rows[-1]['epoch']
    losses = [r['loss'] for r in rows if r['epoch'] == epoch]
    return f'{statistics.fmean(losses):.4f} (mean of epoch {epoch}, {len(losses)} steps)'


def step_time(rows):
    """Median wall time between consecutive optimizer steps, in ms (None for fewer than 2 steps)."""
    gaps = [b['wall_s'] - a['wall_s'] for a, b in zip(rows, rows[1:]) if b['step'] == a['step'] + 1]
    return statistics.median(gaps) * 1000 if gaps else None


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cpu = f'CPU {cpu}, {os.cpu_count()} cores'
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f'GPU {", ".join(gpus)}; {cpu}'
    return f'no GPU; {cpu}'


def result_rows(out):
    """For each row of ROWS: (label, dev accuracy, test predictions, final pretraining loss, time per step)."""
    with open(os.path.join(ROOT, DEV), encoding='utf-8') as f:
        n_dev = sum(1 for _ in f)
    rows = [(ROWS[0], dev_accuracy(['London'] * n_dev), '—', '—', '—')]
    for row, prefix, pretrain, finetune in (
            (ROWS[1], 'vanilla.nopretrain', None, 'vanilla.model.params'),
            (ROWS[2], 'vanilla.pretrain', 'vanilla.pretrain.params', 'vanilla.finetune.params'),
            (ROWS[3], 'synthesizer.pretrain', 'synthesizer.pretrain.params', 'synthesizer.finetune.params')):
        dev = dev_accuracy(read_predictions(os.path.join(out, f'{prefix}.dev.predictions')))
        n_test = len(read_predictions(os.path.join(out, f'{prefix}.test.predictions')))
        pretrain_rows = read_metrics(os.path.join(out, pretrain + '.metrics.jsonl')) if pretrain else []
        times = []
        for name, params in (('pretrain', pretrain), ('finetune', finetune)):
            ms = step_time(read_metrics(os.path.join(out, params + '.metrics.jsonl'))) if params else None
            if ms is not None:
                times.append(f'{name} {ms:.1f} ms')
        rows.append((row, dev, str(n_test), final_loss(pretrain_rows) if pretrain else '— (no pretraining)',
                     ', '.join(times) or '—'))
    return rows


def write_results(path, out, recipe, jobs, runner, pipeline_command):
    rows = result_rows(out)
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f'# Results: {recipe} recipe', '',
             f'- date: {now:%Y-%m-%d %H:%M} UTC',
             f'- machine: {machine()}',
             f'- torch {torch.__version__}, Python {platform.python_version()}',
             f'- pipeline: `{pipeline_command}` ({jobs} sequence{"s" if jobs > 1 else ""} at a time)', '',
             '| run | dev accuracy | test predictions | pretraining loss at the end | wall time per step '
             '| the assignment expects | public reports (dev) |',
             '|---|---|---|---|---|---|---|']
    for (_, label, expects, public), dev, n_test, loss, times in rows:
        lines.append(f'| {label} | {dev} | {n_test} | {loss} | {times} | {expects} | {public} |')
    lines += ['',
              'Pretraining loss at the end: the mean training loss over the steps of the last epoch in '
              'PARAMS.metrics.jsonl. Wall time per step: the median time between consecutive optimizer steps in '
              'the metrics files (data loading included; runs that shared the machine share its time).', '',
              '## Commands', '',
              'Run from the repository root, grouped by sequence (with several jobs the sequences ran side by '
              'side); a step whose output already existed was skipped and is shown commented out. Each log also '
              'holds the commands of earlier, interrupted invocations.',
              '', '```']
    for key in runner.order:
        lines.append(f'# {key} (log: {runner.logs[key]})')
        for _, command, step, skipped in (c for c in runner.commands if c[0] == key):
            lines.append(f'# skipped ({step.output} existed): {command}' if skipped else command)
    lines += ['```', '']
    with utils.atomic_write(path) as temporary, open(temporary, 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines))
    return rows


# ---- the command line -----------------------------------------------------------------------------------------

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


def cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def interrupt(signum, frame):
    """SIGTERM: stop as Ctrl-C does (the running steps are asked to stop and save a checkpoint)."""
    raise KeyboardInterrupt


def main():
    has_gpu = torch.cuda.is_available()
    parser = ArgumentParser(prog='pipeline.py', description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--recipe', choices=['faithful', 'laptop'], default='faithful' if has_gpu else 'laptop')
    parser.add_argument('--outdir', help="where params and predictions go (default: '.' for faithful, "
                                         "'laptop' for laptop)")
    parser.add_argument('--jobs', type=positive_int,
                        help='sequences run at once, each step in its own process (default: all four on a '
                             'machine with a CUDA GPU, 1 otherwise)')
    parser.add_argument('extra', nargs='*', help='further src/run.py flags for every step (after --)')
    args = parser.parse_args()
    pipeline_command = shlex.join([sys.executable, 'pipeline.py'] + sys.argv[1:])
    out = args.outdir or ('.' if args.recipe == 'faithful' else 'laptop')
    os.chdir(ROOT)
    os.makedirs(out, exist_ok=True)
    seqs = sequences(out)
    jobs = min(args.jobs or (len(seqs) if has_gpu else 1), len(seqs))
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    if jobs > 1 and 'OMP_NUM_THREADS' not in os.environ:  # DataLoader workers and intra-op threads share the cores
        env['OMP_NUM_THREADS'] = str(max(1, cores() // jobs))
    print(f'Recipe: {args.recipe} ({"CUDA GPU found" if has_gpu else "no GPU found"}); outputs in {out}/')
    if args.recipe == 'laptop':
        print('For the original settings run: python pipeline.py --recipe faithful')
    print(f'{jobs} sequence{"s" if jobs > 1 else ""} at a time; logs in {os.path.join(out, "logs")}/', flush=True)

    runner = Runner(seqs, jobs, args.recipe, args.extra, env)
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
    if runner.ran == 0 and os.path.exists(results):
        rows = result_rows(out)
        print(f'\nEvery step was already done: {results} left as it was (delete it to write it again)')
    else:
        rows = write_results(results, out, args.recipe, jobs, runner, pipeline_command)
        print(f'\nResults written to {results}')
    print(f'\n| run ({args.recipe} recipe) | dev accuracy |\n|---|---|')
    print(f'| London baseline | {rows[0][1]} |')
    for (_, label, _, _), dev, *_ in rows[1:]:
        print(f'| {label} | {dev} |')
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
