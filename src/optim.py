"""AdamW (or Muon) with its weight-decay groups, and the token-based warmup + cosine schedule of its learning rate."""
import math

import torch

import utils

WEIGHT_DECAY_ON = ('all', 'matrices')   # see decays
OPTIMIZERS = ('adamw', 'muon')          # see make_optimizer


def lr_multiplier(tokens, config):
    """Linear warmup over warmup_tokens, then a cosine floored at lr_floor (the original's 0.1).

    progress is deliberately not clamped: past final_tokens the cosine rises
    again, as in the original (the default recipes run past it).
    """
    if tokens < config.warmup_tokens:
        return float(tokens) / float(max(1, config.warmup_tokens))
    progress = float(tokens - config.warmup_tokens) / float(max(1, config.final_tokens - config.warmup_tokens))
    return max(config.lr_floor, 0.5 * (1.0 + math.cos(math.pi * progress)))


def scheduled_lr(tokens, config):
    """The learning rate after `tokens` tokens: config.learning_rate, times lr_multiplier with lr_decay."""
    return config.learning_rate * (lr_multiplier(tokens, config) if config.lr_decay else 1)


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


def orthogonalized(matrix, steps=5):
    """About U V^T for matrix = U S V^T: the matrix with every singular value moved towards 1.

    A quintic Newton-Schulz iteration (the coefficients of Jordan et al.'s
    Muon) on the matrix scaled to spectral norm at most 1: it maps each
    singular value x to a x + b x^3 + c x^5 repeatedly. In five steps a
    128 x 512 matrix whose singular values spread down to 1% of the largest
    ends with all of them in about [0.68, 1.21]; smaller ones stay smaller.
    Only matrix products, no SVD.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix / (matrix.norm() + 1e-7)  # the Frobenius norm bounds the spectral norm
    wide = x.size(0) <= x.size(1)
    if not wide:
        x = x.T  # the products below are then square in the smaller side
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


def is_hidden_matrix(name, param):
    """Whether Muon updates this parameter: a 2-D weight inside the network, not the token embedding or the head."""
    return param.dim() == 2 and name not in ('tok_emb.weight', 'head.weight')


class Muon(torch.optim.Optimizer):
    """Muon for the hidden matrices, AdamW for every other parameter, at one learning rate.

    A group with `muon=True` takes SGD momentum (Nesterov, `momentum`) whose
    update is orthogonalized and scaled by 0.2 sqrt(max(rows, cols)), which
    gives it about the root-mean-square size of an AdamW update, so the same
    learning rate and decoupled weight decay serve both kinds (the scaling of
    Liu et al., "Muon is scalable for LLM training"). Every other group is
    AdamW as torch.optim.AdamW computes it.
    """

    def __init__(self, groups, lr, betas, momentum=0.95, eps=1e-8):
        super().__init__(groups, dict(lr=lr, betas=betas, momentum=momentum, eps=eps, weight_decay=0.0, muon=False))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, weight_decay = group['lr'], group['weight_decay']
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                p.mul_(1 - lr * weight_decay)
                if group['muon']:
                    if not state:
                        state['momentum_buffer'] = torch.zeros_like(p)
                    buffer = state['momentum_buffer']
                    buffer.mul_(group['momentum']).add_(p.grad)
                    update = orthogonalized(p.grad.add(buffer, alpha=group['momentum']))
                    p.add_(update, alpha=-lr * 0.2 * max(p.shape) ** 0.5)
                    continue
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                beta1, beta2 = group['betas']
                state['step'] += 1
                state['exp_avg'].lerp_(p.grad, 1 - beta1)
                state['exp_avg_sq'].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denominator = (state['exp_avg_sq'] / (1 - beta2 ** state['step'])).sqrt_().add_(group['eps'])
                p.addcdiv_(state['exp_avg'], denominator, value=-lr / (1 - beta1 ** state['step']))


def make_optimizer(model, config, device):
    """AdamW (or with `config.optimizer == 'muon'`, Muon), weight decay on the parameters that `decays` picks."""
    utils.check_choice('optimizer', config.optimizer, OPTIMIZERS)
    if config.optimizer == 'muon':
        groups = {}
        for name, param in model.named_parameters():
            key = (is_hidden_matrix(name, param), decays(name, param, config.weight_decay_on))
            groups.setdefault(key, []).append(param)
        return Muon([{'params': params, 'muon': muon, 'weight_decay': config.weight_decay if decay else 0.0}
                     for (muon, decay), params in groups.items()], lr=config.learning_rate, betas=config.betas)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if decays(name, param, config.weight_decay_on) else no_decay).append(param)
    groups = [{'params': decay, 'weight_decay': config.weight_decay},
              {'params': no_decay, 'weight_decay': 0.0}]
    fused = config.fused_optimizer
    if fused == 'auto':
        fused = device.type in ('cuda', 'cpu')
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas, fused=bool(fused))


def restore(optimizer, saved, lr):
    """Load a checkpoint's optimizer state into `optimizer`, keeping its weight decay and setting `lr`.

    The saved groups hold the interrupted run's rate and decay: this run's
    settings apply (the same values when they did not change, so an exact
    resume stays exact).
    """
    decay = [group['weight_decay'] for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, weight_decay in zip(optimizer.param_groups, decay):
        group.update(lr=lr, weight_decay=weight_decay)
