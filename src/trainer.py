"""The training loop: AdamW, gradient clipping and the token-based warmup + cosine schedule.

Speed options (all off or automatic in ways that keep the math): bf16
autocast, fused AdamW, torch.compile, and trimming of all-pad columns, which
with `chunks > 1` also sorts each batch by length and runs it as several
trimmed pieces whose summed loss equals the batch's mean loss. One option
changes which examples share a batch, so it is off by default:
`batching='stratified'` deals a whole epoch, sorted by length, into batches
of `chunks` pieces of similar length (less padding than sorting within a
batch, with the same mix of lengths in every batch).

Long runs survive interruption: with `checkpoint_path` set, the whole training
state (model, optimizer, epoch/step/token counters, every RNG and the data
order) is saved there every `checkpoint_minutes` and when Ctrl-C (or SIGTERM)
arrives, which then ends train() with TrainingInterrupted. A new Trainer given
`resume(load_training_checkpoint(path))` continues so that, on a CPU, the run
ends with exactly the parameters an uninterrupted one would have.
"""
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import utils

CHECKPOINT_FORMAT = 'birthplace training checkpoint v1'


class TrainerConfig:
    """Optimisation settings; every keyword becomes an attribute."""
    # the original's settings
    max_epochs = 10
    batch_size = 64
    learning_rate = 3e-4
    betas = (0.9, 0.95)
    grad_norm_clip = 1.0
    weight_decay = 0.1  # applied to every parameter except biases
    lr_decay = False
    warmup_tokens = 375e6  # these two numbers come from the GPT-3 paper
    final_tokens = 260e9   # (at what point we reach 10% of original LR)
    ckpt_path = None
    num_workers = 0
    # additions; the defaults leave the original computation as it was
    max_steps = None       # stop after this many optimizer steps (None: run every epoch)
    precision = 'fp32'     # 'fp32', 'bf16' (autocast) or 'auto' (bf16 on a GPU that supports it)
    trim_padding = True    # drop trailing columns whose targets are all pad (exact: attention is causal)
    chunks = 1             # split each batch into this many length-sorted, trimmed pieces
    batching = 'random'    # 'random' (the original) or 'stratified' (see stratified_batches)
    weight_decay_on = 'all'  # 'all' (the original: all but biases) or 'matrices' (see decays)
    fused_optimizer = 'auto'  # fused AdamW where the device supports it
    compile = False        # torch.compile the model
    metrics_path = None    # JSONL file with one line of metrics per optimizer step
    show_progress = True
    checkpoint_path = None    # training checkpoint (full state, for resume), saved periodically and on Ctrl-C
    checkpoint_minutes = 10   # minutes between training checkpoints (0: after every step)
    checkpoint_info = None    # dict stored in every training checkpoint (run.py: which run it belongs to)
    on_step = None            # called as on_step(trainer) after every optimizer step

    def __init__(self, **kwargs):
        for k, v in kwargs.items():
            setattr(self, k, v)


def lr_multiplier(tokens, config):
    """Linear warmup over warmup_tokens, then a cosine floored at 0.1.

    progress is deliberately not clamped: past final_tokens the cosine rises
    again, as in the original (the default recipes run past it).
    """
    if tokens < config.warmup_tokens:
        return float(tokens) / float(max(1, config.warmup_tokens))
    progress = float(tokens - config.warmup_tokens) / float(max(1, config.final_tokens - config.warmup_tokens))
    return max(0.1, 0.5 * (1.0 + math.cos(math.pi * progress)))


def resolve_device(device=None):
    if device:
        return torch.device(device)
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def autocast_dtype(precision, device):
    """The autocast dtype for a precision setting, or None for plain fp32."""
    if precision == 'fp32':
        return None
    if precision == 'bf16':
        return torch.bfloat16
    if precision == 'auto':
        if device.type == 'cuda' and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    raise ValueError(f"unknown precision {precision!r}: use 'fp32', 'bf16' or 'auto'")


def decays(name, param, weight_decay_on):
    """Whether AdamW's weight decay applies to this parameter.

    'all' is the original grouping: every parameter except biases, so
    LayerNorm gains and the embeddings shrink too. 'matrices' decays only the
    weights that multiply activations (the Linear layers' and the
    Synthesizer's w2), as in minGPT: no biases, LayerNorm parameters or
    token and position embeddings.
    """
    if weight_decay_on == 'all':
        return 'bias' not in name
    if weight_decay_on == 'matrices':
        return param.dim() == 2 and not name.startswith('tok_emb')
    raise ValueError(f"unknown weight_decay_on {weight_decay_on!r}: use 'all' or 'matrices'")


def make_optimizer(model, config, device):
    """AdamW, weight decay on the parameters that `decays` picks."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if decays(name, param, config.weight_decay_on) else no_decay).append(param)
    groups = [{'params': decay, 'weight_decay': config.weight_decay},
              {'params': no_decay, 'weight_decay': 0.0}]
    fused = config.fused_optimizer
    if fused == 'auto':
        fused = device.type in ('cuda', 'cpu')
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas, fused=bool(fused))


def target_lengths(y):
    """Per row of y: 1 + the index of its last non-pad target (1 for a row of pads only)."""
    return (y != 0).int().cumsum(1).argmax(1) + 1


def split_batch(x, y, chunks, trim):
    """Pieces of the batch (x, y) whose losses, summed, give the whole batch's.

    Trimming keeps the columns up to the last non-pad target: with causal
    attention, earlier outputs never depend on the dropped columns.
    """
    if not trim:
        return [(x, y)]
    lengths = target_lengths(y)
    if chunks <= 1:
        n = int(lengths.max())
        return [(x[:, :n], y[:, :n])]
    order = torch.argsort(lengths)
    pieces = []
    for part in torch.chunk(order, chunks):
        n = int(lengths[part].max())
        pieces.append((x[part, :n], y[part, :n]))
    return pieces


def stratified_batches(examples, batch_size, chunks, generator):
    """The epoch's (x, y) examples dealt into batches, each a list of trimmed pieces.

    The examples are sorted by length (last non-pad target) and cut into
    `chunks` strata of equal size; each stratum is cut into as many pieces as
    the epoch has batches, and every batch gets one piece of every stratum
    (which one is random, but larger pieces go to smaller batches). Each
    batch so holds short and long examples in the proportions of the whole
    epoch, while each piece is trimmed to a length close to that of its own
    examples. Every example is used once; batch sizes differ by at most one.
    """
    n_batches = math.ceil(len(examples) / batch_size)
    lengths = target_lengths(torch.stack([y for _, y in examples])).tolist()
    by_length = sorted(range(len(examples)), key=lengths.__getitem__)
    batches, sizes = [[] for _ in range(n_batches)], [0] * n_batches
    for stratum in np.array_split(np.array(by_length), chunks):
        # the larger pieces (array_split puts them first) go to the smaller batches, ties at random
        tie_break = torch.randperm(n_batches, generator=generator).tolist()
        destinations = sorted(range(n_batches), key=lambda b: (sizes[b], tie_break[b]))
        for piece, b in zip(np.array_split(stratum, n_batches), destinations):
            sizes[b] += len(piece)
            if len(piece):
                n = max(lengths[i] for i in piece)
                batches[b].append((torch.stack([examples[i][0][:n] for i in piece]),
                                   torch.stack([examples[i][1][:n] for i in piece])))
    return [batch for batch in batches if batch]  # a batch_size below chunks can leave one empty


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
        print(f'\n{self.signal_name}: stopping after this step to save a checkpoint{again}',
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler or signal.SIG_DFL)
        self.previous = {}


def ignore_stop_signals(worker_id):
    """DataLoader worker init: leave Ctrl-C and SIGTERM to the main process, which stops cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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


def load_training_checkpoint(path):
    """The training state a Trainer saved at `path`, loaded with weights_only=True.

    Raises ValueError when the file loads but is not a training checkpoint.
    """
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        state = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(state, dict) or state.get('format') != CHECKPOINT_FORMAT:
        raise ValueError(f'{path} is not a training checkpoint')
    return state


def open_metrics(path, resumed_step=None):
    """The metrics file, opened line-buffered: rewritten for a fresh run.

    For a resumed run (resumed_step given), the lines after the checkpoint's
    step (written before a crash) are dropped and the rest is appended to.
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
                    step = json.loads(line)['step']
                except (ValueError, KeyError, TypeError):
                    break
                if step > resumed_step:
                    break
                kept.append(line.rstrip('\n') + '\n')
    with utils.atomic_write(path) as temporary, open(temporary, 'w') as f:
        f.writelines(kept)
    return open(path, 'a', buffering=1)


class Trainer:

    def __init__(self, model, train_dataset, test_dataset, config, device=None):
        self.model = model
        self.train_dataset = train_dataset
        self.test_dataset = test_dataset
        self.config = config
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.tokens = 0  # counter used for learning rate decay
        self.step = 0
        self.epoch = 0          # the epoch in progress, from 0
        self.batches_done = 0   # batches of that epoch already trained on
        self.elapsed = 0.0      # seconds of training up to the last training checkpoint
        self.optimizer = None
        # The shuffling (and DataLoader worker seeds) come from a generator of
        # their own, whose state at each epoch start goes into checkpoints.
        self.data_generator = torch.Generator()
        self.data_generator.manual_seed(int(torch.randint(2 ** 62, (1,))))
        self.epoch_start_state = self.data_generator.get_state()
        self.epoch_start_rng = None  # the random states an epoch of stratified batches was drawn from
        self.resume_state = None

    def save_checkpoint(self):
        """The original's per-epoch save of the state dict to config.ckpt_path."""
        if self.config.ckpt_path is not None:
            with utils.atomic_write(self.config.ckpt_path) as temporary:
                torch.save(self.model.state_dict(), temporary)

    def save_training_checkpoint(self, path):
        """Everything needed to continue the run exactly, written atomically to `path`."""
        state = {'format': CHECKPOINT_FORMAT, 'info': self.config.checkpoint_info,
                 'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                 'epoch': self.epoch, 'batches_done': self.batches_done,
                 'step': self.step, 'tokens': self.tokens, 'elapsed': self.elapsed,
                 'epoch_start_state': self.epoch_start_state, 'epoch_start_rng': self.epoch_start_rng,
                 'rng': rng_state()}
        with utils.atomic_write(path) as temporary:
            torch.save(state, temporary)

    def resume(self, checkpoint):
        """Take the model and counters from a training checkpoint; the next train() continues its run."""
        self.model.load_state_dict(checkpoint['model'])
        self.epoch, self.batches_done = checkpoint['epoch'], checkpoint['batches_done']
        self.step, self.tokens, self.elapsed = checkpoint['step'], checkpoint['tokens'], checkpoint['elapsed']
        self.resume_state = checkpoint

    def train(self):
        model, config = self.model, self.config
        optimizer = self.optimizer = make_optimizer(model, config, self.device)
        resume, self.resume_state = self.resume_state, None
        if resume is not None:
            optimizer.load_state_dict(resume['optimizer'])
        amp_dtype = autocast_dtype(config.precision, self.device)
        forward = torch.compile(model) if config.compile else model
        metrics = open_metrics(config.metrics_path, resume['step'] if resume is not None else None)
        start_time = time.time() - self.elapsed
        last_save = time.time()

        def run_batch(pieces):
            """Forward and backward over a batch's pieces; returns the batch's mean loss."""
            n_targets = max(1, sum(int((yp != 0).sum()) for _, yp in pieces))
            total = 0.0
            for xp, yp in pieces:
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    _, loss_sum = forward(xp, yp, loss_reduction='sum')
                (loss_sum / n_targets).backward()
                total += loss_sum.item()
            return total / n_targets

        def epoch_batches(skip, start_rng=None):
            """This epoch's shuffled batches from batch `skip` on, the generator at the epoch's start.

            Each batch comes as (its pieces on the device, its token count
            for the schedule). In one process the trained batches are just left out; DataLoader
            workers draw their examples in sequence, so they replay them.
            Stratified batching draws the whole epoch first, from the random
            states of the epoch's start (`start_rng` when resuming).
            """
            order = torch.randperm(len(self.train_dataset), generator=self.data_generator).tolist()
            if config.batching == 'stratified':
                if start_rng is not None:
                    set_rng_state(start_rng)
                self.epoch_start_rng = rng_state()
                examples = [self.train_dataset[i] for i in order]
                width = examples[0][1].size(0)  # untrimmed: the schedule counts pads
                batches = stratified_batches(examples, config.batch_size, config.chunks, self.data_generator)
                return (([(xp.to(self.device), yp.to(self.device)) for xp, yp in pieces],
                         sum(yp.size(0) for _, yp in pieces) * width) for pieces in batches[skip:])
            workers = config.num_workers
            left_out = skip if workers == 0 else 0
            loader = DataLoader(self.train_dataset, sampler=order[left_out * config.batch_size:],
                                batch_size=config.batch_size, num_workers=workers,
                                generator=self.data_generator, pin_memory=self.device.type == 'cuda',
                                worker_init_fn=ignore_stop_signals if workers > 0 else None)
            batches = iter(loader)
            for _ in range(skip - left_out):
                next(batches)
            return ((split_batch(x.to(self.device), y.to(self.device), config.chunks, config.trim_padding),
                     y.numel())  # (y >= 0).sum(): pads count
                    for x, y in batches)

        def run_epoch(epoch, stop, skip=0, rng=None, start_rng=None):
            """Train on one epoch's batches from batch `skip` on; True once max_steps is reached."""
            nonlocal last_save
            model.train(True)
            batches = epoch_batches(skip, start_rng)
            if rng is not None:
                set_rng_state(rng)
            n_batches = math.ceil(len(self.train_dataset) / config.batch_size)
            pbar = tqdm(batches, initial=skip, total=n_batches, disable=not config.show_progress)
            for it, (pieces, batch_tokens) in enumerate(pbar, start=skip):
                step_start = time.time()
                model.zero_grad(set_to_none=True)
                loss = run_batch(pieces)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_norm_clip)
                optimizer.step()
                self.step += 1
                self.batches_done = it + 1
                # The schedule is applied after the step, as in the original.
                if config.lr_decay:
                    self.tokens += batch_tokens
                    lr = config.learning_rate * lr_multiplier(self.tokens, config)
                    for param_group in optimizer.param_groups:
                        param_group['lr'] = lr
                else:
                    lr = config.learning_rate
                pbar.set_description(f"epoch {epoch + 1} iter {it}: train loss {loss:.5f}. lr {lr:e}")
                if metrics:
                    now = time.time()
                    metrics.write(json.dumps({
                        'step': self.step, 'epoch': epoch + 1, 'tokens': self.tokens, 'loss': loss, 'lr': lr,
                        'tokens_per_s': batch_tokens / max(now - step_start, 1e-9),
                        'wall_s': now - start_time}) + '\n')
                if config.on_step is not None:
                    config.on_step(self)
                if config.max_steps is not None and self.step >= config.max_steps:
                    return True
                if config.checkpoint_path is not None and (
                        stop.signal_name or time.time() - last_save >= config.checkpoint_minutes * 60):
                    self.elapsed = time.time() - start_time
                    self.save_training_checkpoint(config.checkpoint_path)
                    last_save = time.time()
                if stop.signal_name:
                    pbar.close()
                    raise TrainingInterrupted(stop.signal_name, self.step, epoch, config.checkpoint_path)
            return False

        try:
            with StopRequest(enabled=config.checkpoint_path is not None) as stop:
                first_epoch = self.epoch if resume is not None else 0
                for epoch in range(first_epoch, config.max_epochs):
                    if config.max_steps is not None and self.step >= config.max_steps:
                        break
                    resuming = resume is not None and epoch == first_epoch
                    if resuming:
                        self.data_generator.set_state(resume['epoch_start_state'])
                    self.epoch, self.epoch_start_state = epoch, self.data_generator.get_state()
                    if resuming:
                        done = run_epoch(epoch, stop, resume['batches_done'], resume['rng'],
                                         resume.get('epoch_start_rng'))
                    else:
                        self.batches_done = 0
                        done = run_epoch(epoch, stop)
                    if self.test_dataset is not None:
                        self.evaluate_loss(amp_dtype)
                    self.save_checkpoint()
                    if done:
                        break
        finally:
            if metrics:
                metrics.close()

    @torch.no_grad()
    def evaluate_loss(self, amp_dtype=None):
        """Mean loss over test_dataset (non-pad targets)."""
        self.model.eval()
        loader = DataLoader(self.test_dataset, batch_size=self.config.batch_size)
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                _, loss_sum = self.model(x, y, loss_reduction='sum')
            total += loss_sum.item()
            count += int((y != 0).sum())
        self.model.train()
        return total / max(1, count)
