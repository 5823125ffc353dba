"""Interruption and resume: what a training checkpoint holds, and everything that reads or writes one.

A training checkpoint is one dict saved with torch.save: a format tag, the
`info` that says which run it belongs to (see `run_info`), the model and
optimizer state dicts, and the fields of `TrainingState`, the run's counters
and random states. `save` builds it and `TrainingState.from_checkpoint` reads it back;
`check_belongs` refuses a checkpoint of another run. On a CPU, a run resumed
from one ends with exactly the parameters of an uninterrupted run.

Ctrl-C or SIGTERM inside `StopRequest` asks the trainer to save a checkpoint
after the current step and end with TrainingInterrupted. `open_metrics`
holds the metrics file's rule on resume: keep what the checkpoint's steps
wrote, drop what came after.
"""
import dataclasses
import hashlib
import json
import os
import random
import signal
import sys
import threading
import warnings
from typing import Optional

import numpy as np
import torch

import distributed
import utils

FORMAT = 'birthplace training checkpoint v1'


@dataclasses.dataclass
class TrainingState:
    """The run's counters and random states: with model and optimizer, all that a checkpoint saves."""
    epoch: int = 0                 # the epoch in progress, from 0
    batches_done: int = 0          # batches of that epoch already trained on
    step: int = 0                  # optimizer steps taken
    tokens: int = 0                # tokens the learning-rate schedule has counted
    elapsed: float = 0.0           # seconds of training up to the last checkpoint
    epoch_start_state: Optional[torch.Tensor] = None  # the data generator at the epoch's start: its shuffle
    epoch_start_rng: Optional[dict] = None  # global random states at the epoch's start (stratified batches)
    rng: Optional[dict] = None     # global random states when the checkpoint was saved

    @classmethod
    def from_checkpoint(cls, checkpoint, rank=0):
        """The state a checkpoint (a loaded dict) holds, with process `rank`'s random states.

        A checkpoint of several processes (torchrun) holds every rank's random
        states in `rank_states`; its `rng` and `epoch_start_rng` are rank 0's.
        """
        state = cls(**{f.name: checkpoint.get(f.name, f.default) for f in dataclasses.fields(cls)})
        if checkpoint.get('rank_states'):
            state.rng = checkpoint['rank_states'][rank]['rng']
            state.epoch_start_rng = checkpoint['rank_states'][rank]['epoch_start_rng']
        return state


def rng_state():
    """The Python, numpy and torch (CPU and CUDA) random states, in types weights_only loading accepts."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {'python': random.getstate(),
             'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'position': int(position),
                       'has_gauss': int(has_gauss), 'cached_gaussian': float(cached_gaussian)},
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what rng_state() returned (the CUDA states only where the same GPUs are present)."""
    random.setstate(state['python'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['position'],
                         n['has_gauss'], n['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    cuda = state.get('cuda')
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def enter_epoch(state, generator, epoch, resuming):
    """Record in `state` where `epoch` starts: the shuffling generator's state and the global random states.

    The epoch a checkpoint interrupted (`resuming`) replays its recorded
    ones instead, and keeps its count of batches already trained on.
    """
    if resuming:
        generator.set_state(state.epoch_start_state)
        if state.epoch_start_rng is not None:
            set_rng_state(state.epoch_start_rng)
    else:
        state.batches_done = 0
    state.epoch = epoch
    state.epoch_start_state, state.epoch_start_rng = generator.get_state(), rng_state()


def save(path, model, optimizer, state, info, rank_states=None):
    """Write the checkpoint to `path` atomically; the global random states are taken now.

    `rank_states`, from a run of several processes: a list with each rank's
    {'rng', 'epoch_start_rng'}, stored as is (rank 0's are also the usual fields).
    """
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    checkpoint = {'format': FORMAT, 'info': info, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                  **fields, 'rng': rng_state()}
    if rank_states:
        checkpoint['rank_states'] = rank_states
    with utils.atomic_write(path) as temporary:
        torch.save(checkpoint, temporary)


def is_checkpoint(loaded):
    """Whether something torch.load returned is a training checkpoint."""
    return isinstance(loaded, dict) and loaded.get('format') == FORMAT


def load(path):
    """The training checkpoint at `path`, loaded with weights_only=True; ValueError if it is something else."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    if not is_checkpoint(checkpoint):
        raise ValueError(f'{path} is not a training checkpoint')
    return checkpoint


def data_digest(*texts):
    """A fingerprint of the training data, to tell whether a checkpoint belongs to it."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode('utf-8'))
        digest.update(b'\0')
    return digest.hexdigest()


def run_info(function, variant, texts, model_settings, train_settings):
    """What a checkpoint stores to say which run it belongs to: compared by check_belongs."""
    return dict(function=function, variant=variant, data=data_digest(*texts),
                model=model_settings, train=train_settings)


def check_belongs(checkpoint, info):
    """The training settings that differ from the checkpoint's (allowed, e.g. more epochs, but worth a warning).

    Raises ValueError, its message to follow the checkpoint's path, when the
    checkpoint is not one of the run `info` describes (run_info): another
    function or variant, other data or another model.
    """
    if not is_checkpoint(checkpoint):
        raise ValueError('is not a training checkpoint of run.py; give another --checkpoint_path')
    saved = checkpoint.get('info') or {}
    run, saved_run = f"{info['function']} {info['variant']}", f"{saved.get('function')} {saved.get('variant')}"
    if run != saved_run:
        raise ValueError(f'belongs to a {saved_run} run, not {run}; use the matching command, '
                         f'or delete the checkpoint to start afresh')
    if saved.get('data') != info['data']:
        raise ValueError('was written for other training data: the corpus files changed since; '
                         'restore them, or delete the checkpoint to start afresh')
    saved_model = saved.get('model', {})
    changed = [f'{k} {saved_model.get(k)} -> {v}' for k, v in info['model'].items() if saved_model.get(k) != v]
    if changed or saved_model != info['model']:
        raise ValueError(f'holds a model of other settings ({", ".join(changed) or "different keys"}); '
                         f'resume with the --recipe and model flags of the interrupted run')
    old, new = saved.get('train', {}), info['train']
    return [f'{k} {old.get(k)} -> {new.get(k)}' for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def save_of_every_rank(path, model, optimizer, state, info):
    """`save` for a run of one or several processes: rank 0 writes, with every rank's random states.

    Every process calls it at the same step; none returns (and could have
    torchrun stop the others) before the checkpoint is written.
    """
    rank_states = None
    if distributed.active():
        rank_states = distributed.gather({'rng': rng_state(), 'epoch_start_rng': state.epoch_start_rng})
    if distributed.is_main():
        save(path, model, optimizer, state, info, rank_states=rank_states)
    distributed.barrier()


def open_metrics(path, resumed_step=None):
    """The metrics file, opened line-buffered: rewritten for a fresh run.

    For a resumed run (resumed_step given) the lines of the steps after the
    checkpoint's, written before the interruption, are dropped, and so is a
    held-out loss line of the checkpoint's own step (the resumed run ends
    that epoch again); the rest is appended to.
    """
    if path is None:
        return None
    if resumed_step is None:
        return open(path, 'w', buffering=1)
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                    step = record['step']
                except (ValueError, KeyError, TypeError):
                    break
                if step > resumed_step or (step == resumed_step and 'test_loss' in record):
                    break
                kept.append(line.rstrip('\n') + '\n')
    with utils.atomic_write(path) as temporary, open(temporary, 'w') as f:
        f.writelines(kept)
    return open(path, 'a', buffering=1)


class TrainingInterrupted(Exception):
    """Raised by Trainer.train() on Ctrl-C or SIGTERM, once the training checkpoint is saved."""

    def __init__(self, signal_name, step, epoch, path):
        super().__init__(f'{signal_name} at step {step} (epoch {epoch + 1}); checkpoint saved to {path}')
        self.signal_name = signal_name
        self.step = step
        self.epoch = epoch
        self.path = path


class StopRequest:
    """Inside `with`, the first Ctrl-C (or SIGTERM) only records itself in `signal_name`.

    The training loop looks at it after each step, so it can stop at a clean
    point and save a checkpoint. The first signal puts the previous handler
    back, so a second Ctrl-C interrupts at once.
    """

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.signal_name = None
        self.previous = {}

    def __enter__(self):
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) != signal.SIG_IGN:  # e.g. nohup: leave ignored signals ignored
                    self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self.previous[signum] or signal.SIG_DFL)
        again = ' (Ctrl-C again quits at once, without saving)' if signum == signal.SIGINT else ''
        if not distributed.is_main():
            return  # under torchrun, rank 0 speaks for every rank
        print(f'\n{self.signal_name}: stopping after this step to save a checkpoint{again}',
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler or signal.SIG_DFL)
        self.previous = {}
