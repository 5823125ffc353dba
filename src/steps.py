"""The default training step (EagerStep), make_step, which picks it or gpu_path's fixed-shape step, and the
precision the steps compute in.

The trainer calls the step it is given once per batch: `count` (the tokens
the schedule counts), then `run` (the optimizer step; its loss a float, or
pending until `resolve` turns many into floats at once, metrics.MetricsLog).
"""
from collections import namedtuple

import torch

import distributed
import gpu_path
import utils

PRECISIONS = ('fp32', 'bf16', 'auto', 'tf32')  # 'auto': bf16 on a GPU that supports it, else fp32; see autocast_dtype


def autocast_dtype(precision, device):
    """The autocast dtype for a precision setting, or None for fp32 tensors ('fp32', and 'tf32': see allow_tf32)."""
    utils.check_choice('precision', precision, PRECISIONS)
    if precision == 'bf16' or (precision == 'auto' and device.type == 'cuda' and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def allow_tf32(precision, device):
    """With 'tf32' on a CUDA GPU, let this process multiply fp32 tensors in TF32, as PyTorch 1.7-1.11 did
    by default on Ampere GPUs (the original's era). Every other setting and device is left as it is."""
    if precision == 'tf32' and device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


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
    gpu_path.check_choices(config.data_path, config.train_step, config.compile)
    if config.train_step == 'default':
        return EagerStep(model, forward, optimizer, config.grad_norm_clip, amp_dtype, device, check)
    graph = config.train_step == 'graph'
    gpu_path.use_tensor_lr(optimizer, device, capturable=graph and device.type == 'cuda')
    return gpu_path.FixedShapeStep(model, forward, optimizer, config.grad_norm_clip, amp_dtype, config.batch_size,
                                   gpu_path.width_of(dataset, model), device, graph)
