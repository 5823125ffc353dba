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
import math
import time
from collections import defaultdict, namedtuple

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import batching
import checkpoint
import distributed
import gpu_path
import metrics
import utils

PRECISIONS = ('fp32', 'bf16', 'auto', 'tf32')  # 'auto': bf16 on a GPU that supports it, else fp32; see autocast_dtype
WEIGHT_DECAY_ON = ('all', 'matrices')   # see decays
FIRST_STEP_LRS = ('full', 'scheduled')  # see Trainer.train


class TrainingDiverged(Exception):
    """Raised by Trainer.train() at the first non-finite loss or gradient norm (check_finite).

    The default step checks before it changes anything: the model and
    optimizer keep the previous step's values, and no training checkpoint is
    saved for the failed step, so the last one saved stays the last good one.
    The fixed-shape step's loss is checked when its metrics are flushed.
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



def check_finite(what, value, step, epoch, learning_rate):
    """TrainingDiverged unless `value`, the loss or gradient norm of `step`, is a finite number."""
    if not math.isfinite(value):
        raise TrainingDiverged(step, epoch, what, value, learning_rate)


def loss_sum(forward, x, y, amp_dtype):
    """The loss summed over the non-pad targets of (x, y), under autocast when amp_dtype is set."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return forward(x, y, loss_reduction='sum')[1]


Share = namedtuple('Share', 'total n_targets')  # a process's summed loss of a data-parallel step, the global count


class EagerStep:
    """The default training step: a batch given as trimmed pieces, forward and backward one piece at a time.

    Each piece's summed loss is divided by the count of the whole batch's
    targets, so the pieces' gradients add up to those of the batch's mean.
    With several processes the count is of the global batch, and each
    process's loss is multiplied by their number, which undoes DDP's
    averaging: the synchronised gradient is that of the global batch's mean,
    synchronised once, at the last piece's backward. A non-finite loss or
    gradient norm raises TrainingDiverged (`check`) before the update.
    """

    def __init__(self, model, forward, optimizer, grad_norm_clip, amp_dtype, device, check):
        self.model, self.forward, self.optimizer = model, forward, optimizer
        self.grad_norm_clip, self.amp_dtype, self.device, self.check = grad_norm_clip, amp_dtype, device, check
        self.n_targets = 1

    def count(self, pieces, batch_tokens):
        """The tokens the schedule counts for this batch; also counts its targets. Both of the global batch:
        with several processes, one all-reduce."""
        n_targets = sum(int((y != 0).sum()) for _, y in pieces)
        if distributed.active():
            n_targets, batch_tokens = (int(v) for v in distributed.all_sum([n_targets, batch_tokens], self.device))
        self.n_targets = max(1, n_targets)
        return batch_tokens

    def run(self, pieces):
        """One optimizer step; the batch's mean loss over non-pad targets (with several processes, a Share)."""
        self.model.zero_grad(set_to_none=True)
        divisor = self.n_targets / distributed.world_size() if distributed.active() else self.n_targets
        total = 0.0
        for i, (x, y) in enumerate(pieces):
            with distributed.no_sync(self.forward, skip=i < len(pieces) - 1):
                piece_loss = loss_sum(self.forward, x, y, self.amp_dtype)
                (piece_loss / divisor).backward()
            total += piece_loss.item()
        # a diverged run stops before its step: nan or inf would spread to every parameter
        self.check('loss', total / self.n_targets)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_norm_clip)
        self.check('gradient norm', float(norm))
        self.optimizer.step()
        return Share(total, self.n_targets) if distributed.active() else total / self.n_targets

    def resolve(self, shares):
        """The global mean losses of data-parallel steps: every process's totals summed in one all-reduce."""
        totals = distributed.all_sum([share.total for share in shares], self.device)
        return [total / share.n_targets for total, share in zip(totals, shares)]


def make_step(model, forward, optimizer, config, amp_dtype, dataset, device, check):
    """The training step that `train_step` names: EagerStep, or gpu_path.FixedShapeStep (fixed or graph)."""
    gpu_path.check_choices(config.data_path, config.train_step)
    if config.train_step == 'default':
        return EagerStep(model, forward, optimizer, config.grad_norm_clip, amp_dtype, device, check)
    graph = config.train_step == 'graph'
    gpu_path.use_tensor_lr(optimizer, device, capturable=graph and device.type == 'cuda')
    return gpu_path.FixedShapeStep(model, forward, optimizer, config.grad_norm_clip, amp_dtype, config.batch_size,
                                   gpu_path.width_of(dataset, model), device, graph)


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
        self.amp_dtype = autocast_dtype(config.precision, self.device)
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
        except TrainingDiverged:
            self.log.flush()  # every process stops at the same step (their gradients are one): its lines
            raise
        finally:
            self.log.close(flush=not distributed.active())  # another process may be gone: no collective

    def prepare(self):
        """The optimizer (a resumed run's, if any), the training step, the metrics log, the clocks; True when
        resuming."""
        config = self.config
        utils.check_choice('first_step_lr', config.first_step_lr, FIRST_STEP_LRS)
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
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.forward = distributed.wrap(self.forward, self.device)  # with several processes: DDP
        self.train_step = make_step(self.model, self.forward, self.optimizer, config, self.amp_dtype,
                                    self.train_dataset, self.device, self.check_step)
        if config.data_path == 'device' and self.device_epochs is None:
            self.device_epochs = gpu_path.DeviceEpochs(self.train_dataset, self.device)
        file = checkpoint.open_metrics(config.metrics_path, self.state.step if resuming else None)
        self.log = metrics.MetricsLog(file, self.train_step.resolve, lambda record: check_finite(
            'loss', record['loss'], record['step'], record['epoch'] - 1, record['lr']))
        self.start_time = time.time() - self.state.elapsed
        self.last_save = time.time()
        return resuming

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
        lr = config.learning_rate * lr_multiplier(self.state.tokens, config)
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
            rank_states = None
            if distributed.active():
                rank_states = distributed.gather({'rng': checkpoint.rng_state(),
                                                  'epoch_start_rng': self.state.epoch_start_rng})
            if distributed.is_main():
                checkpoint.save(config.checkpoint_path, self.model, self.optimizer, self.state,
                                config.checkpoint_info, rank_states=rank_states)
            distributed.barrier()  # no process ends (and has torchrun stop the others) before it is written
            self.last_save = time.time()
        if stop.signal_name:
            raise checkpoint.TrainingInterrupted(stop.signal_name, self.state.step, self.state.epoch,
                                                 config.checkpoint_path)

    def end_epoch(self):
        """As the original ends an epoch: the held-out loss (a metrics line), then the state dict to ckpt_path."""
        if self.test_dataset is not None:
            self.log.write(dict(step=self.state.step, epoch=self.state.epoch + 1, test_loss=self.evaluate_loss()))
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
            x, y = x.to(self.device), y.to(self.device)
            total += loss_sum(self.forward, x, y, self.amp_dtype).item()
            count += int((y != 0).sum())
        self.model.train()
        return total / max(1, count)
