"""The training loop (minGPT's Trainer): epochs of batches, one optimizer step each, metrics, checkpoints.

The step is chosen once (steps.make_step): the default eager one, or
gpu_path's fixed-shape one (optionally a CUDA graph). AdamW and its
schedule are in optim.py; batches come from batching.py (or gpu_path.py);
the run's counters and random states live in one checkpoint.TrainingState,
which a training checkpoint saves (with `checkpoint_path` set: every
`checkpoint_minutes` and on Ctrl-C) and `resume` restores. Under torchrun
(distributed.py) each process trains on its share of every batch, the step
makes the math that of one process, and rank 0 alone writes.
"""
import math
import time
from collections import defaultdict

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import batching
import checkpoint
import distributed
import gpu_path
import metrics
import optim
import steps
import utils

FIRST_STEP_LRS = ('full', 'scheduled')  # see Trainer.train


class TrainingDiverged(Exception):
    """Raised by Trainer.train() at the first non-finite loss or gradient norm (check_finite).

    Neither step kind lets that step change anything: the model and
    optimizer keep the previous step's values, and no training checkpoint is
    saved for the failed step, so the last one saved stays the last good one.
    The default step checks on the host before its update; the fixed-shape
    step skips the update on the device (and every later one) and is stopped
    when its metrics are flushed (gpu_path.FixedShapeStep).
    """

    def __init__(self, step, epoch, what, value, learning_rate):
        super().__init__(f'the {what} is {value} at step {step} (epoch {epoch + 1})')
        self.step, self.epoch, self.what, self.value, self.learning_rate = step, epoch, what, value, learning_rate


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
    lr_floor = 0.1         # the cosine stops falling at this fraction of the peak rate
    ckpt_path = None       # the model's state dict is saved here after every epoch
    num_workers = 0
    # additions; the defaults leave the original computation as it was
    max_steps = None       # stop after this many optimizer steps (None: run every epoch)
    precision = 'fp32'     # one of steps.PRECISIONS: 'bf16' is autocast
    trim_padding = True    # drop trailing columns whose targets are all pad (exact: attention is causal)
    chunks = 1             # split each batch into this many length-sorted, trimmed pieces
    batching = 'random'    # one of batching.BATCHINGS
    weight_decay_on = 'all'  # one of optim.WEIGHT_DECAY_ON
    optimizer = 'adamw'      # one of optim.OPTIMIZERS: 'muon' updates the hidden matrices with Muon
    first_step_lr = 'full'   # one of FIRST_STEP_LRS: 'full' is the original (see Trainer.train)
    fused_optimizer = 'auto'  # fused AdamW where the device supports it
    compile = False        # torch.compile the model
    data_path = 'loader'   # one of gpu_path.DATA_PATHS: 'device' builds each epoch on the device
    train_step = 'default'  # one of gpu_path.TRAIN_STEPS: 'fixed'/'graph' (CUDA graph): whole batches of one shape
    metrics_path = None    # JSONL file: a line per optimizer step, and per epoch with a test_dataset
    show_progress = True
    checkpoint_path = None    # training checkpoint (full state, for resume), saved periodically and on Ctrl-C
    checkpoint_minutes = 10   # minutes between training checkpoints (0: after every step)
    checkpoint_info = None    # dict stored in every training checkpoint (run.py: which run it belongs to)

    def __init__(self, **kwargs):
        for k, v in kwargs.items():
            setattr(self, k, v)


def check_finite(what, value, step, epoch, learning_rate):
    """TrainingDiverged unless `value`, the loss or gradient norm of `step`, is a finite number."""
    if not math.isfinite(value):
        raise TrainingDiverged(step, epoch, what, value, learning_rate)


@torch.no_grad()
def held_out_loss(trainer, dataset):
    """Mean loss over `dataset`'s non-pad targets, the trainer's model in eval mode (no dropout).

    Its DataLoader seeds itself from a generator of its own, so the
    training run's random states are left as they were.
    """
    trainer.model.eval()
    loader = DataLoader(dataset, batch_size=trainer.config.batch_size, generator=torch.Generator())
    total, count = 0.0, 0
    for x, y in loader:
        x, y = x.to(trainer.device), y.to(trainer.device)
        total += steps.loss_sum(trainer.forward, x, y, trainer.amp_dtype).item()
        count += int((y != 0).sum())
    trainer.model.train()
    return total / max(1, count)


class Trainer:
    """minGPT's trainer: `train` runs the epochs; a checkpoint's run goes on after `resume`."""

    def __init__(self, model, train_dataset, test_dataset, config, device=None):
        self.model = model
        self.train_dataset = train_dataset
        self.test_dataset = test_dataset  # None, or held-out data whose loss ends each epoch
        self.config = config
        self.device = utils.resolve_device(device)
        self.model.to(self.device)
        self.forward = self.model  # compiled by train() with config.compile
        self.amp_dtype = steps.autocast_dtype(config.precision, self.device)
        steps.allow_tf32(config.precision, self.device)
        self.optimizer = None
        self.callbacks = defaultdict(list)
        # The shuffling (and DataLoader worker seeds) come from a generator of
        # their own, whose state at each epoch start goes into checkpoints.
        self.data_generator = torch.Generator()
        self.data_generator.manual_seed(int(torch.randint(2 ** 62, (1,))))
        self.state = checkpoint.TrainingState(epoch_start_state=self.data_generator.get_state())
        self.saved_optimizer = None  # from resume(), until train() has loaded it
        self.train_step = None     # make_step's, chosen by train()
        self.log = None            # metrics.MetricsLog, open during train()
        self.device_epochs = None  # gpu_path.DeviceEpochs, with data_path 'device'

    def add_callback(self, onevent, callback):
        """Call callback(trainer) at `onevent`: 'on_batch_end' is after every optimizer step."""
        self.callbacks[onevent].append(callback)

    @property
    def step(self):
        return self.state.step

    @property
    def tokens(self):
        return self.state.tokens

    def resume(self, saved):
        """Continue the run of a training checkpoint (checkpoint.load): the next train() goes on from it."""
        self.model.load_state_dict(saved['model'])
        self.state = checkpoint.TrainingState.from_checkpoint(saved, distributed.rank())
        self.saved_optimizer = saved['optimizer']

    def train(self):
        """Train for max_epochs (or max_steps), going on from where resume() left the run."""
        config, state = self.config, self.state
        resuming = self.prepare()  # optimizer, training step, metrics log, clocks
        # The original sets the learning rate after each step, so its first step runs at the
        # full rate before warmup starts; 'scheduled' sets it before, counting this batch.
        scheduled_first_step = config.lr_decay and config.first_step_lr == 'scheduled'
        try:
            with checkpoint.StopRequest(enabled=config.checkpoint_path is not None) as stop:
                for epoch in range(state.epoch if resuming else 0, config.max_epochs):
                    if self.max_steps_reached():
                        break
                    batches = self.epoch_batches(epoch, resuming)  # shuffled, or the rest of the resumed epoch
                    resuming = False
                    self.model.train(True)
                    with tqdm(batches, initial=state.batches_done, disable=not config.show_progress,
                              total=math.ceil(len(self.train_dataset) / config.batch_size)) as bar:
                        for pieces, batch_tokens in bar:
                            started = time.time()
                            batch_tokens = self.train_step.count(pieces, batch_tokens)  # of the global batch
                            if scheduled_first_step:
                                lr = self.update_lr(batch_tokens)
                            loss = self.train_step.run(pieces)  # forward, backward, clipping, AdamW
                            state.step += 1
                            state.batches_done += 1
                            if not scheduled_first_step:
                                lr = self.update_lr(batch_tokens)
                            self.report(bar, loss, lr, batch_tokens, started)  # bar, metrics line, callbacks
                            if self.max_steps_reached():
                                break
                            self.checkpoint_if_due(stop)  # and on Ctrl-C, TrainingInterrupted after it
                        self.show(bar, self.log.flush())  # the losses still on the device, at last
                    self.end_epoch()  # the original's: the held-out loss, the state dict to ckpt_path
        finally:
            # the held lines; with several processes they need the others, which after an error may be gone
            # or elsewhere: a data-parallel run that stops on an error loses those since the last flush
            self.log.close(flush=not distributed.active())

    def prepare(self):
        """The optimizer (a resumed run's, if any), the training step, the metrics log, the clocks; True when
        resuming."""
        config = self.config
        utils.check_choice('first_step_lr', config.first_step_lr, FIRST_STEP_LRS)
        self.optimizer = optim.make_optimizer(self.model, config, self.device)
        resuming = self.saved_optimizer is not None
        if resuming:
            optim.restore(self.optimizer, self.saved_optimizer, optim.scheduled_lr(self.state.tokens, config))
            self.saved_optimizer = None
        self.forward = distributed.wrap(self.model, self.device)  # with several processes: DDP, wrapped first
        if config.compile:
            self.forward = torch.compile(self.forward)
        self.train_step = steps.make_step(self.model, self.forward, self.optimizer, config, self.amp_dtype,
                                          self.train_dataset, self.device, self.check_step)
        if config.data_path == 'device' and self.device_epochs is None:
            self.device_epochs = gpu_path.DeviceEpochs(self.train_dataset, self.device)
        file = checkpoint.open_metrics(config.metrics_path, self.state.step if resuming else None)
        self.log = metrics.MetricsLog(file, self.train_step.resolve, self.check_flushed)
        self.start_time = time.time() - self.state.elapsed
        self.last_save = time.time()
        return resuming

    def check_flushed(self, record, values):
        """check_finite for a step whose values came back at a flush: its loss, and the fixed step's gradient
        norm, with the learning rate the step ran at where it came back too (the record's is the next step's
        when the rate is set after each step)."""
        values = dict(values)
        lr = values.pop('learning rate', record['lr'])
        for what, value in values.items():
            check_finite(what, value, record['step'], record['epoch'] - 1, lr)

    def check_step(self, what, value):
        """check_finite for the step in progress."""
        check_finite(what, value, self.state.step + 1, self.state.epoch, self.optimizer.param_groups[0]['lr'])

    def epoch_batches(self, epoch, resuming):
        """The batches of `epoch` not yet trained on, each (pieces on the device, token count).

        A resumed epoch replays its shuffle, skips the batches it trained on,
        then takes the random states the checkpoint was saved with.
        """
        config = self.config
        checkpoint.enter_epoch(self.state, self.data_generator, epoch, resuming)
        # a fixed step runs each batch whole, padded back to one shape: no trimming or chunks
        fixed = config.train_step != 'default'
        trim, chunks = config.trim_padding and not fixed, 1 if fixed else config.chunks
        if self.device_epochs is not None and config.batching == 'random':
            batches = gpu_path.epoch_batches(self.device_epochs, len(self.train_dataset), config.batch_size,
                                             self.data_generator, chunks=chunks, trim=trim,
                                             skip=self.state.batches_done)
        else:
            batches = batching.epoch_batches(self.train_dataset, config.batch_size, self.data_generator, self.device,
                                             batching=config.batching, chunks=chunks, trim=trim,
                                             num_workers=config.num_workers, skip=self.state.batches_done,
                                             rank=distributed.rank(), world_size=distributed.world_size())
        if resuming:
            checkpoint.set_rng_state(self.state.rng)
        return batches

    def update_lr(self, batch_tokens):
        """With lr_decay, count the batch's tokens and set the scheduled learning rate; returns the rate."""
        config = self.config
        if not config.lr_decay:
            return config.learning_rate
        self.state.tokens += batch_tokens
        lr = optim.scheduled_lr(self.state.tokens, config)
        gpu_path.set_lr(self.optimizer, lr)  # in place where the rate is a tensor (train_step 'fixed'/'graph')
        return lr

    def report(self, bar, loss, lr, batch_tokens, started):
        """The step's metrics line (held while its loss is pending), its progress-bar line, the callbacks."""
        now, state = time.time(), self.state
        record = dict(step=state.step, epoch=state.epoch + 1, tokens=state.tokens, loss=loss, lr=lr,
                      tokens_per_s=batch_tokens / max(now - started, 1e-9), wall_s=now - self.start_time)
        self.log.write(record)
        if isinstance(loss, float):
            self.show(bar, record)
        for callback in self.callbacks['on_batch_end']:
            callback(self)

    def show(self, bar, record):
        if record is not None:
            bar.set_description(f"epoch {record['epoch']} iter {self.state.batches_done - 1}: "
                                f"train loss {record['loss']:.5f}. lr {record['lr']:e}")

    def max_steps_reached(self):
        return self.config.max_steps is not None and self.state.step >= self.config.max_steps

    def checkpoint_if_due(self, stop):
        """Save the training checkpoint when checkpoint_minutes have passed or a stop was asked for; then
        stop with TrainingInterrupted if it was."""
        config = self.config
        if config.checkpoint_path is None:
            return
        due = stop.signal_name or time.time() - self.last_save >= config.checkpoint_minutes * 60
        # with several processes, all save (and stop) at the same step; rank 0 writes every rank's random states
        if distributed.agree_stop(stop, due, self.device):
            self.state.elapsed = time.time() - self.start_time
            self.log.flush()  # the metrics file holds every step up to the checkpoint's
            checkpoint.save_of_every_rank(config.checkpoint_path, self.model, self.optimizer, self.state,
                                          config.checkpoint_info)
            self.last_save = time.time()
        if stop.signal_name:
            raise checkpoint.TrainingInterrupted(stop.signal_name, self.state.step, self.state.epoch,
                                                 config.checkpoint_path)

    def end_epoch(self):
        """As the original ends an epoch: the held-out loss (a metrics line), then the state dict to ckpt_path."""
        if self.test_dataset is not None:
            self.log.write(dict(step=self.state.step, epoch=self.state.epoch + 1,
                                test_loss=held_out_loss(self, self.test_dataset)))
        if self.config.ckpt_path is not None:
            with utils.atomic_write(self.config.ckpt_path) as temporary:
                torch.save(self.model.state_dict(), temporary)
