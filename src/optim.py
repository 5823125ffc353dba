"""AdamW with its weight-decay groups, and the token-based warmup + cosine schedule of its learning rate."""
import math

import torch

import utils

WEIGHT_DECAY_ON = ('all', 'matrices')   # see decays


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
