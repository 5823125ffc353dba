"""pipeline.py's scheduler: sequences of steps run as processes, up to N at once, and their status line."""
import datetime
import functools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import recipes
from step_progress import duration, last_line, last_metrics, progress, read_from, settings_of, total_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATUS_EVERY_S = 30   # how often the status line is printed when stdout is not a terminal
POLL_S = 0.5          # how often running processes are checked (and, on a terminal, the status redrawn)


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
    def corpus(self):
        """The file a training step trains on: the pretraining corpus, or the finetuning one."""
        if self.function == 'finetune':
            return self.args[self.args.index('--finetune_corpus_path') + 1]
        return self.args[2]

    @property
    def stage(self):
        """The recipe stage a training step runs (recipes.STAGES), or None."""
        return recipes.stage_of(self.function, self.args is not None and '--reading_params_path' in self.args)

    @property
    def metrics(self):
        return self.output + '.metrics.jsonl' if self.function in ('pretrain', 'finetune') else None


class Sequence:
    """Steps that depend on each other, run in order; its log is OUT/logs/LOG.log."""

    def __init__(self, key, log, steps):
        self.key, self.log, self.steps = key, log, steps


@functools.lru_cache(maxsize=None)
def count_examples(path):
    """How many training examples a corpus gives: its lines (documents or question-place pairs)."""
    with open(os.path.join(ROOT, path), encoding='utf-8') as f:
        lines = f.read().split('\n')
    return len(lines) - (lines[-1] == '')


def names_max_epochs(flag):
    """Whether run.py's parser reads `flag` as --max_epochs: the whole name or an abbreviation of it that no
    other option of run.py shares ('--max_' is also --max_steps's)."""
    return len(flag) >= len('--max_e') and '--max_epochs'.startswith(flag)


def epochs_given(extra):
    """The --max_epochs that flags passed to every step set (the last one given), or None."""
    epochs = None
    for i, flag in enumerate(extra):
        name, equals, value = flag.partition('=')
        if names_max_epochs(name):
            epochs = value if equals else (extra[i + 1] if i + 1 < len(extra) else None)
    try:
        return int(epochs)
    except (TypeError, ValueError):  # none given, or not a number: run.py says what is wrong
        return None


def training_examples(seq, recipe, extra=()):
    """How many examples the training steps of `seq` go through, by their epochs: its size, roughly.

    The epochs are the recipe's, or a --max_epochs in `extra`, the flags every step is given.
    """
    total, given = 0, epochs_given(extra)
    for step in seq.steps:
        if step.stage is None:
            continue
        epochs = given or recipes.stage_settings(recipe, step.args[1], step.stage)['max_epochs']
        try:
            total += epochs * count_examples(step.corpus)
        except OSError:  # a corpus that cannot be read counts as empty; its step's run.py says what is wrong
            pass
    return total


class Runner:
    """Runs sequences, up to `jobs` at once, one process per step, and keeps a status line.

    One job runs the sequences in the order given. More than one start the
    longest first (by training_examples), so that the last to finish is not
    a long sequence that started late. Given `cores`, the runner sets each
    step's threads: cores // jobs to start with, and once no sequence waits,
    each core the running ones leave free goes to one of them, its training
    step taking it up from its next optimizer step (training.FollowThreads).
    """

    def __init__(self, seqs, jobs, recipe, extra, env, cores=None):
        self.jobs, self.recipe, self.extra, self.env, self.cores = jobs, recipe, extra, env, cores
        self.pending = list(seqs) if jobs == 1 else sorted(seqs, key=lambda seq: -training_examples(seq, recipe, extra))
        self.running = {}     # sequence key -> dict(seq, index, step, process, log, log_offset, start)
        self.state = {seq.key: 'waiting' for seq in seqs}
        self.order = [seq.key for seq in seqs]
        self.logs = {seq.key: seq.log for seq in seqs}
        self.failures = []    # one line per failed step
        self.commands = []    # (sequence key, shell command or a comment, step or None, skipped)
        self.ran = 0          # steps run (not skipped) in this invocation
        self.threads = {}     # with `cores`: sequence key -> the threads its steps run (or last ran) with
        self.threads_dir = None
        self.tty = sys.stdout.isatty()
        self.status_shown = False
        self.last_status = time.time()

    def say(self, message):
        if self.status_shown:
            sys.stdout.write('\r\033[K')
            self.status_shown = False
        print(message, flush=True)

    def shell(self, command, env=None):
        threads = (env or self.env).get('OMP_NUM_THREADS')
        return (f'OMP_NUM_THREADS={shlex.quote(threads)} ' if threads else '') + shlex.join(command)

    def advance(self, seq, index):
        """Start the first step of `seq` from `index` on whose output is missing; skip the others."""
        for i in range(index, len(seq.steps)):
            step = seq.steps[i]
            if step.output is not None and os.path.exists(step.output):
                self.say(f'[skip] {step.name}: {step.output} exists')
                self.commands.append((seq.key, self.shell(step.command(self.recipe, self.extra)), step, True))
                continue
            command, env = step.command(self.recipe, self.extra), self.step_env(seq)
            os.makedirs(os.path.dirname(seq.log), exist_ok=True)
            log = open(seq.log, 'a', encoding='utf-8')
            log.write(f'\n=== {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC  {step.name}\n'
                      f'$ {self.shell(command, env)}\n')
            log.flush()
            offset = log.tell()
            if step.output is not None:
                resuming = f', resuming from {step.output}.ckpt' if command[-1] == '--resume' else ''
                self.say(f'[run]  {step.name}{resuming} (log: {seq.log})')
            self.commands.append((seq.key, self.shell(command, env), step, False))
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env)
            self.running[seq.key] = dict(seq=seq, index=i, step=step, process=process, log=log, log_offset=offset,
                                         start=time.time())
            self.state[seq.key] = 'running'
            return
        self.state[seq.key] = 'done'

    def step_env(self, seq):
        """The environment of the step `seq` starts now: with `cores`, its threads, and the file that may raise them."""
        if self.cores is None:
            return self.env
        threads = self.threads.setdefault(seq.key, max(1, self.cores // self.jobs))
        return dict(self.env, OMP_NUM_THREADS=str(threads), PIPELINE_THREADS_FILE=self.write_threads(seq.key))

    def write_threads(self, key):
        """Write the threads of sequence `key` to its file (whole, by renaming), for training.FollowThreads."""
        if self.threads_dir is None:
            self.threads_dir = tempfile.mkdtemp(prefix='pipeline-threads-')
        path = os.path.join(self.threads_dir, key.replace('/', '_'))  # a comparison's keys are VARIANT/seedN
        with open(path + '.tmp', 'w', encoding='utf-8') as f:
            f.write(str(self.threads[key]))
        os.replace(path + '.tmp', path)
        return path

    def share_free_cores(self):
        """Once no sequence waits, each core the running steps leave free goes to the running sequence with the
        fewest threads. (Steps start with cores // jobs threads since runs side by side get through more
        steps than the same runs one after another with all the cores; a core left idle does nothing.)"""
        if self.cores is None or self.pending or not self.running:
            return
        given = []
        for _ in range(self.cores - sum(self.threads[key] for key in self.running)):
            key = min(self.running, key=lambda k: self.threads[k])
            self.threads[key] += 1
            given.append(key)
        for key in dict.fromkeys(given):
            self.write_threads(key)
            self.say(f'[cores] {key} now runs with {self.threads[key]} threads')
            job = self.running[key]
            if job['step'].metrics is not None:  # a training step takes them up as it goes
                rows = last_metrics(job['step'].metrics, job['start'] - 1)
                after = f' after step {rows[-1]["step"]} or so' if rows else ''
                self.commands.append((key, f'# the step above went on with {self.threads[key]} threads{after} '
                                           f'(its log names the step): a core another sequence left', None, False))

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
                job['total'] = total_steps(settings, count_examples(step.corpus))
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
                self.share_free_cores()
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
            if self.threads_dir is not None:
                shutil.rmtree(self.threads_dir, ignore_errors=True)

    def stop(self):
        """Ask every running step to stop (a training step saves a checkpoint first) and wait for it."""
        for job in self.running.values():
            if job['process'].poll() is None:
                job['process'].send_signal(signal.SIGTERM)
        for job in self.running.values():
            job['process'].wait()
            job['log'].close()
