"""A compact training loop: AdamW, gradient clipping, optional warmup + cosine learning rate."""
import math

import torch
from torch.utils.data import DataLoader


class TrainerConfig:
    """Training settings. Any keyword argument becomes an attribute."""
    max_iters = 500          # optimizer steps in total
    batch_size = 32
    learning_rate = 3e-3
    betas = (0.9, 0.95)
    weight_decay = 0.1       # applied to weight matrices only
    grad_norm_clip = 1.0
    warmup_iters = 0
    lr_decay = False         # cosine decay from learning_rate to 10% of it over max_iters
    print_every = 50         # 0 disables the progress lines
    num_workers = 0

    def __init__(self, **kwargs):
        for key, value in kwargs.items():
            setattr(self, key, value)


class Trainer:
    """Trains `model` on `dataset` (items are (x, y) pairs); the loss of every step goes to self.losses."""

    def __init__(self, model, dataset, config, device='cpu'):
        self.model = model.to(device)
        self.dataset = dataset
        self.config = config
        self.device = device
        self.losses = []

    def _optimizer(self):
        decay, no_decay = [], []
        for param in self.model.parameters():
            (decay if param.dim() >= 2 else no_decay).append(param)
        groups = [{'params': decay, 'weight_decay': self.config.weight_decay},
                  {'params': no_decay, 'weight_decay': 0.0}]
        return torch.optim.AdamW(groups, lr=self.config.learning_rate, betas=self.config.betas)

    def learning_rate(self, step):
        cfg = self.config
        if step < cfg.warmup_iters:
            return cfg.learning_rate * (step + 1) / cfg.warmup_iters
        if not cfg.lr_decay:
            return cfg.learning_rate
        progress = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
        return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    def train(self):
        cfg, model = self.config, self.model
        optimizer = self._optimizer()
        model.train()
        step = 0
        while step < cfg.max_iters:
            loader = DataLoader(self.dataset, batch_size=cfg.batch_size, shuffle=True,
                                num_workers=cfg.num_workers, drop_last=True)
            for x, y in loader:
                lr = self.learning_rate(step)
                for group in optimizer.param_groups:
                    group['lr'] = lr
                x, y = x.to(self.device), y.to(self.device)
                _, loss = model(x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_norm_clip)
                optimizer.step()
                self.losses.append(loss.item())
                step += 1
                if cfg.print_every and (step % cfg.print_every == 0 or step == cfg.max_iters):
                    print(f'step {step}/{cfg.max_iters}: loss {loss.item():.4f}, lr {lr:.2e}')
                if step >= cfg.max_iters:
                    break
        model.eval()
        return self.losses
