"""The training loop: AdamW, gradient clipping and the token-based warmup + cosine schedule.

Batches come from batching.py; the run's counters and random states live in
one checkpoint.TrainingState, which a training checkpoint saves (with
`checkpoint_path` set: every `checkpoint_minutes` and on Ctrl-C) and
`resume` restores. Speed options keep the math: bf16 autocast, fused AdamW,
torch.compile, trimmed pieces of each batch.

Under torchrun with several processes (distributed.py) each process trains
on its share of every batch, in DistributedDataParallel, and the counts that
make the math that of one process (non-pad targets, schedule tokens, the
reported loss) are summed over processes; rank 0 alone writes.
"""
import json
import math
import time
from collections import defaultdict

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import batching
import checkpoint
import gpu_path
import distributed
import utils

PRECISIONS = ('fp32', 'bf16', 'auto', 'tf32')  # 'auto': bf16 on a GPU that supports it, else fp32; see autocast_dtype
WEIGHT_DECAY_ON = ('all', 'matrices')   # see decays
FIRST_STEP_LRS = ('full', 'scheduled')  # see Trainer.run_epoch


class TrainingDiverged(Exception):
    """Raised by Trainer.train() at the first non-finite loss or gradient norm, before that step changes anything.

    The model and optimizer keep the previous step's values, and no training
    checkpoint is saved for the failed step, so the last one saved stays the
    last good one.
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
    ckpt_path = None       # the model's state dict is saved here after every epoch
    num_workers = 0
    # additions; the defaults leave the original computation as it was
    max_steps = None       # stop after this many optimizer steps (None: run every epoch)
    precision = 'fp32'     # one of PRECISIONS: 'bf16' is autocast
    trim_padding = True    # drop trailing columns whose targets are all pad (exact: attention is causal)
    chunks = 1             # split each batch into this many length-sorted, trimmed pieces
    batching = 'random'    # one of batching.BATCHINGS
    weight_decay_on = 'all'  # one of WEIGHT_DECAY_ON
    first_step_lr = 'full'   # one of FIRST_STEP_LRS: 'full' is the original (see run_epoch)
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


def lr_multiplier(tokens, config):
    """Linear warmup over warmup_tokens, then a cosine floored at 0.1.

    progress is deliberately not clamped: past final_tokens the cosine rises
    again, as in the original (the default recipes run past it).
    """
    if tokens < config.warmup_tokens:
        return float(tokens) / float(max(1, config.warmup_tokens))
    progress = float(tokens - config.warmup_tokens) / float(max(1, config.final_tokens - config.warmup_tokens))
    return max(0.1, 0.5 * (1.0 + math.cos(math.pi * progress)))


def autocast_dtype(precision, device):
    """The autocast dtype for a precision setting, or None for plain fp32.

    'tf32' keeps fp32 tensors but lets a CUDA GPU multiply them in TF32, as
    PyTorch 1.7-1.11 did by default on Ampere GPUs (the original's era); it
    changes nothing on a CPU.
    """
    utils.check_choice('precision', precision, PRECISIONS)
    if precision == 'tf32' and device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if precision == 'bf16' or (precision == 'auto' and device.type == 'cuda' and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def decays(name, param, weight_decay_on):
    """Whether AdamW's weight decay applies to this parameter.

    'all' is the original grouping: every parameter except biases, so
    LayerNorm gains and the embeddings shrink too. 'matrices' decays only the
    weights that multiply activations (the Linear layers' and the
    Synthesizer's w2), as in minGPT: no biases, LayerNorm parameters or
    token and position embeddings.
    """
    utils.check_choice('weight_decay_on', weight_decay_on, WEIGHT_DECAY_ON)
    if weight_decay_on == 'all':
        return 'bias' not in name
    return param.dim() == 2 and not name.startswith('tok_emb')


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


class Trainer:

    def __init__(self, model, train_dataset, test_dataset, config, device=None):
        self.model = model
        self.train_dataset = train_dataset
        self.test_dataset = test_dataset  # None, or held-out data whose loss ends each epoch
        self.config = config
        self.device = utils.resolve_device(device)
        self.model.to(self.device)
        self.forward = self.model  # compiled by train() with config.compile
        self.amp_dtype = autocast_dtype(config.precision, self.device)
        self.optimizer = None
        self.callbacks = defaultdict(list)
        # The shuffling (and DataLoader worker seeds) come from a generator of
        # their own, whose state at each epoch start goes into checkpoints.
        self.data_generator = torch.Generator()
        self.data_generator.manual_seed(int(torch.randint(2 ** 62, (1,))))
        self.state = checkpoint.TrainingState(epoch_start_state=self.data_generator.get_state())
        self.saved_optimizer = None  # from resume(), until train() has loaded it
        self.metrics = None  # the metrics file, open during train()
        self.device_epochs = None  # gpu_path.DeviceEpochs, with data_path 'device'
        self.fixed_step = None     # gpu_path.FixedShapeStep, with train_step 'fixed' or 'graph'
        self.deferred = None       # gpu_path.DeferredMetrics: the lines whose loss is still on the device

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
        config = self.config
        resuming = self.prepare()  # optimizer, forward pass, metrics file and clocks
        try:
            with checkpoint.StopRequest(enabled=config.checkpoint_path is not None) as stop:
                for epoch in range(self.state.epoch if resuming else 0, config.max_epochs):
                    if self.max_steps_reached():
                        break
                    # this epoch's batches: freshly shuffled, or the rest of the resumed one
                    batches = self.epoch_batches(epoch, resuming)
                    resuming = False
                    # one optimizer step per batch; a checkpoint when it is due or Ctrl-C came
                    done = self.run_epoch(batches, stop)
                    # the original's epoch end: the held-out loss, the state dict to ckpt_path
                    self.end_epoch()
                    if done:
                        break
        finally:
            self.flush_metrics()
            if self.metrics:
                self.metrics.close()

    def prepare(self):
        """The optimizer (a resumed run's, if any), the metrics file and the clocks; True when resuming."""
        config = self.config
        self.optimizer = make_optimizer(self.model, config, self.device)
        resuming = self.saved_optimizer is not None
        if resuming:
            decay = [group['weight_decay'] for group in self.optimizer.param_groups]
            self.optimizer.load_state_dict(self.saved_optimizer)
            self.saved_optimizer = None
            # the saved groups hold the interrupted run's rate and decay: this run's settings apply
            # (the same values when they did not change, so an exact resume stays exact)
            lr = config.learning_rate * (lr_multiplier(self.state.tokens, config) if config.lr_decay else 1)
            for group, weight_decay in zip(self.optimizer.param_groups, decay):
                group.update(lr=lr, weight_decay=weight_decay)
        gpu_path.check_choices(config.data_path, config.train_step, config.compile)
        self.forward = distributed.wrap(self.model, self.device)  # with several processes: DDP, wrapped first
        if config.compile:
            self.forward = torch.compile(self.forward)
        self.prepare_gpu_path()
        self.metrics = checkpoint.open_metrics(config.metrics_path, self.state.step if resuming else None)
        self.start_time = time.time() - self.state.elapsed
        self.last_save = time.time()
        return resuming

    def prepare_gpu_path(self):
        """With data_path 'device' or train_step 'fixed'/'graph': the pieces of the GPU fast path (gpu_path.py)."""
        config = self.config
        gpu_path.check_choices(config.data_path, config.train_step)
        if config.data_path == 'device' and self.device_epochs is None:
            self.device_epochs = gpu_path.DeviceEpochs(self.train_dataset, self.device)
        if config.train_step == 'default':
            return
        graph = config.train_step == 'graph'
        gpu_path.use_tensor_lr(self.optimizer, self.device, capturable=graph and self.device.type == 'cuda')
        self.fixed_step = gpu_path.FixedShapeStep(self.model, self.forward, self.optimizer, config.grad_norm_clip,
                                                  self.amp_dtype, config.batch_size,
                                                  gpu_path.width_of(self.train_dataset, self.model), self.device, graph)
        self.deferred = gpu_path.DeferredMetrics(self.fixed_step)

    def epoch_batches(self, epoch, resuming):
        """The batches of `epoch` not yet trained on, each (pieces on the device, token count).

        A resumed epoch replays its shuffle, skips the batches it trained on,
        then takes the random states the checkpoint was saved with.
        """
        config = self.config
        checkpoint.enter_epoch(self.state, self.data_generator, epoch, resuming)
        # a fixed step runs each batch whole, padded back to one shape: no trimming or chunks
        trim = config.trim_padding and self.fixed_step is None
        chunks = config.chunks if self.fixed_step is None else 1
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

    def run_epoch(self, batches, stop):
        """Train on each of the epoch's batches; True once max_steps is reached."""
        config, state = self.config, self.state
        utils.check_choice('first_step_lr', config.first_step_lr, FIRST_STEP_LRS)
        scheduled_first_step = config.lr_decay and config.first_step_lr == 'scheduled'
        self.model.train(True)
        total = math.ceil(len(self.train_dataset) / config.batch_size)
        pbar = tqdm(batches, initial=state.batches_done, total=total, disable=not config.show_progress)
        for pieces, batch_tokens in pbar:
            step_start = time.time()
            # The original sets the learning rate after each step, so its first step runs at the
            # full rate before warmup starts; 'scheduled' sets it before, counting this batch.
            if scheduled_first_step:
                lr = self.update_lr(batch_tokens)
            # forward and backward over the batch's pieces, clip the gradient, AdamW step
            try:
                loss = self.train_step(pieces)
            except TrainingDiverged:
                pbar.close()
                raise
            if distributed.active():  # the schedule counts the tokens of the global batch
                batch_tokens = int(distributed.all_sum([batch_tokens], self.device)[0])
            state.step += 1
            state.batches_done += 1
            if not scheduled_first_step:
                lr = self.update_lr(batch_tokens)
            # report the step: progress bar, metrics line, callbacks (a loss on the device: at the epoch's end)
            if not torch.is_tensor(loss):
                pbar.set_description(f"epoch {state.epoch + 1} iter {state.batches_done - 1}: "
                                     f"train loss {loss:.5f}. lr {lr:e}")
            now = time.time()
            self.write_metrics(step=state.step, epoch=state.epoch + 1, tokens=state.tokens, loss=loss, lr=lr,
                               tokens_per_s=batch_tokens / max(now - step_start, 1e-9), wall_s=now - self.start_time)
            for callback in self.callbacks['on_batch_end']:
                callback(self)
            # stop at max_steps; otherwise save a checkpoint when due, and stop here on Ctrl-C
            if self.max_steps_reached():
                self.flush_metrics(pbar)
                return True
            self.save_checkpoint_if_due(stop)
            if stop.signal_name:
                pbar.close()
                raise checkpoint.TrainingInterrupted(stop.signal_name, state.step, state.epoch, config.checkpoint_path)
        self.flush_metrics(pbar)
        return False

    def train_step(self, pieces):
        """One optimizer step on a batch given as pieces; returns the batch's mean loss over non-pad targets.

        Each piece's summed loss is divided by the count of the whole batch's
        targets, so the pieces' gradients add up to those of the batch's mean.
        With train_step 'fixed' or 'graph' the batch is one piece and the
        loss comes back as a tensor on the device (gpu_path.FixedShapeStep).
        With several processes the count is of the global batch, and each
        process's loss is multiplied by their number, which undoes DDP's
        averaging: the synchronised gradient is that of the global batch's
        mean, synchronised once, at the last piece's backward.
        """
        if self.fixed_step is not None:
            (x, y), = pieces
            return self.fixed_step(x, y)
        self.model.zero_grad(set_to_none=True)
        n_targets = sum(int((y != 0).sum()) for _, y in pieces)
        if distributed.active():
            n_targets = int(distributed.all_sum([n_targets], self.device)[0])
        n_targets = max(1, n_targets)
        divisor = n_targets / distributed.world_size() if distributed.active() else n_targets
        total = 0.0
        for i, (x, y) in enumerate(pieces):
            with distributed.no_sync(self.forward, skip=i < len(pieces) - 1):
                loss_sum = self.loss_sum(x, y)
                (loss_sum / divisor).backward()
            total += loss_sum.item()
        # a diverged run stops before its step: nan or inf would spread to every parameter
        self.check_finite('loss', total / n_targets)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_norm_clip)
        self.check_finite('gradient norm', float(norm))
        self.optimizer.step()
        if distributed.active():
            total = distributed.all_sum([total], self.device)[0]
        return total / n_targets

    def check_finite(self, what, value):
        """TrainingDiverged unless `value`, this step's loss or gradient norm, is a finite number."""
        if not math.isfinite(value):
            lr = self.optimizer.param_groups[0]['lr']
            raise TrainingDiverged(self.state.step + 1, self.state.epoch, what, value, lr)

    def loss_sum(self, x, y):
        """The loss summed over the non-pad targets of (x, y), under autocast when `precision` asks for it."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return self.forward(x, y, loss_reduction='sum')[1]

    def update_lr(self, batch_tokens):
        """With lr_decay, count the batch's tokens and set the scheduled learning rate; returns the rate."""
        config = self.config
        if not config.lr_decay:
            return config.learning_rate
        self.state.tokens += batch_tokens
        lr = config.learning_rate * lr_multiplier(self.state.tokens, config)
        gpu_path.set_lr(self.optimizer, lr)  # in place where the rate is a tensor (train_step 'fixed'/'graph')
        return lr

    def write_metrics(self, **record):
        if self.deferred is not None and torch.is_tensor(record.get('loss')):
            self.deferred.add(record)
        elif self.metrics:
            self.metrics.write(json.dumps(record) + '\n')

    def flush_metrics(self, pbar=None):
        """Write the held lines whose loss was on the device (one host sync); show the last loss on the bar.

        A step whose loss or gradient norm was not finite is reported here:
        the fixed step skipped its update and every later one, so the model
        is that of the step before it, and no params or checkpoint follow.
        """
        if self.deferred is None:
            return
        flushed = []
        last, diverged = self.deferred.flush(flushed.append)
        for record in flushed:
            self.write_metrics(**record)
        if diverged is not None:
            if pbar is not None:
                pbar.close()
            record, what, value = diverged
            raise TrainingDiverged(record['step'], record['epoch'] - 1, what, value, record['lr'])
        if pbar is not None and last is not None:
            pbar.set_description(f"epoch {last['epoch']} iter {self.state.batches_done - 1}: "
                                 f"train loss {last['loss']:.5f}. lr {last['lr']:e}")

    def max_steps_reached(self):
        return self.config.max_steps is not None and self.state.step >= self.config.max_steps

    def save_checkpoint_if_due(self, stop):
        """Save the training checkpoint when checkpoint_minutes have passed, or a stop was asked for."""
        config = self.config
        if config.checkpoint_path is None:
            return
        due = stop.signal_name or time.time() - self.last_save >= config.checkpoint_minutes * 60
        # with several processes, all save (and stop) at the same step; rank 0 writes every rank's random states
        if distributed.agree_stop(stop, due, self.device):
            self.state.elapsed = time.time() - self.start_time
            self.flush_metrics()  # the metrics file holds every step up to the checkpoint's
            rank_states = None
            if distributed.active():
                rank_states = distributed.gather({'rng': checkpoint.rng_state(),
                                                  'epoch_start_rng': self.state.epoch_start_rng})
            if distributed.is_main():
                checkpoint.save(config.checkpoint_path, self.model, self.optimizer, self.state,
                                config.checkpoint_info, rank_states=rank_states)
            distributed.barrier()  # no process ends (and has torchrun stop the others) before it is written
            self.last_save = time.time()

    def end_epoch(self):
        """As the original ends an epoch: the held-out loss (a metrics line), then the state dict to ckpt_path."""
        if self.test_dataset is not None:
            self.write_metrics(step=self.state.step, epoch=self.state.epoch + 1, test_loss=self.evaluate_loss())
        if self.config.ckpt_path is not None:
            with utils.atomic_write(self.config.ckpt_path) as temporary:
                torch.save(self.model.state_dict(), temporary)

    @torch.no_grad()
    def evaluate_loss(self):
        """Mean loss over test_dataset's non-pad targets, in eval mode (no dropout).

        Its DataLoader seeds itself from a generator of its own, so the
        training run's random states are left as they were.
        """
        self.model.eval()
        loader = DataLoader(self.test_dataset, batch_size=self.config.batch_size, generator=torch.Generator())
        total, count = 0.0, 0
        for x, y in loader:
            total += self.loss_sum(x.to(self.device), y.to(self.device)).item()
            count += int((y != 0).sum())
        self.model.train()
        return total / max(1, count)
