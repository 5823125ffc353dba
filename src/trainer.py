"""The training loop: AdamW, gradient clipping and the token-based warmup + cosine schedule.

Speed options (all off or automatic in ways that keep the math): bf16
autocast, fused AdamW, torch.compile, and trimming of all-pad columns, which
with `chunks > 1` also sorts each batch by length and runs it as several
trimmed pieces whose summed loss equals the batch's mean loss.
"""
import json
import math
import os
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm


class TrainerConfig:
    """Optimisation settings; every keyword becomes an attribute."""
    # the original's settings
    max_epochs = 10
    batch_size = 64
    learning_rate = 3e-4
    betas = (0.9, 0.95)
    grad_norm_clip = 1.0
    weight_decay = 0.1  # only applied on matmul weights
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
    fused_optimizer = 'auto'  # fused AdamW where the device supports it
    compile = False        # torch.compile the model
    metrics_path = None    # JSONL file with one line of metrics per optimizer step
    show_progress = True

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


def make_optimizer(model, config, device):
    """AdamW with weight decay on every parameter except biases."""
    decay = [p for n, p in model.named_parameters() if 'bias' not in n]
    no_decay = [p for n, p in model.named_parameters() if 'bias' in n]
    groups = [{'params': decay, 'weight_decay': config.weight_decay},
              {'params': no_decay, 'weight_decay': 0.0}]
    fused = config.fused_optimizer
    if fused == 'auto':
        fused = device.type in ('cuda', 'cpu')
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas, fused=bool(fused))


def split_batch(x, y, chunks, trim):
    """Pieces of the batch (x, y) whose losses, summed, give the whole batch's.

    Trimming keeps the columns up to the last non-pad target: with causal
    attention, earlier outputs never depend on the dropped columns.
    """
    if not trim:
        return [(x, y)]
    lengths = (y != 0).int().cumsum(1).argmax(1) + 1   # 1 + index of the last non-pad target
    if chunks <= 1:
        n = int(lengths.max())
        return [(x[:, :n], y[:, :n])]
    order = torch.argsort(lengths)
    pieces = []
    for part in torch.chunk(order, chunks):
        n = int(lengths[part].max())
        pieces.append((x[part, :n], y[part, :n]))
    return pieces


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

    def save_checkpoint(self):
        if self.config.ckpt_path is not None:
            torch.save(self.model.state_dict(), self.config.ckpt_path)

    def train(self):
        model, config = self.model, self.config
        optimizer = make_optimizer(model, config, self.device)
        amp_dtype = autocast_dtype(config.precision, self.device)
        forward = torch.compile(model) if config.compile else model
        metrics = open(config.metrics_path, 'w') if config.metrics_path else None
        start_time = time.time()

        def run_batch(x, y):
            """Forward and backward over the batch's pieces; returns the batch's mean loss."""
            n_targets = max(1, int((y != 0).sum()))
            total = 0.0
            for xp, yp in split_batch(x, y, config.chunks, config.trim_padding):
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    _, loss_sum = forward(xp, yp, loss_reduction='sum')
                (loss_sum / n_targets).backward()
                total += loss_sum.item()
            return total / n_targets

        def run_epoch(epoch):
            model.train(True)
            loader = DataLoader(self.train_dataset, shuffle=True, batch_size=config.batch_size,
                                num_workers=config.num_workers, pin_memory=self.device.type == 'cuda')
            pbar = tqdm(enumerate(loader), total=len(loader), disable=not config.show_progress)
            for it, (x, y) in pbar:
                step_start = time.time()
                x, y = x.to(self.device), y.to(self.device)
                model.zero_grad(set_to_none=True)
                loss = run_batch(x, y)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_norm_clip)
                optimizer.step()
                self.step += 1
                batch_tokens = y.numel()  # (y >= 0).sum(): pads count
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
                if config.max_steps is not None and self.step >= config.max_steps:
                    return True
            return False

        try:
            for epoch in range(config.max_epochs):
                done = run_epoch(epoch)
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
