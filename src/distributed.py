"""Data-parallel training under torchrun: everything that knows there may be more than one process.

    torchrun --standalone --nproc_per_node N src/run.py pretrain ...

torchrun starts N copies of run.py and gives each the environment variables
RANK, WORLD_SIZE and LOCAL_RANK. With WORLD_SIZE above 1, `init` joins the
process group (NCCL on GPUs, gloo on CPUs) and `wrap` puts the model in
DistributedDataParallel, which sums the gradients of all processes during
backward. Without WORLD_SIZE (a plain `python src/run.py`), or with it 1,
every function here does nothing: one process trains exactly as before.

The rest are the few collectives the trainer needs: sums and maxima of a
handful of numbers, the random states of every process gathered to rank 0
for a checkpoint, and a barrier.
"""
import contextlib
import os
import signal
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def world_size():
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get('WORLD_SIZE', '1'))


def active():
    """Whether this run is one of several processes (torchrun with WORLD_SIZE > 1)."""
    return world_size() > 1


def rank():
    """This process's rank: 0 to world_size() - 1 (0 without torchrun)."""
    return int(os.environ.get('RANK', '0')) if active() else 0


def is_main():
    """Whether this process writes the outputs: rank 0, or the only process."""
    return rank() == 0


def rank_device(device):
    """The device this process runs on: with several processes on GPUs, cuda:LOCAL_RANK, made the current device.

    checks.check_device calls it before anything touches CUDA, so that each
    process opens a context on its own GPU only (touching `cuda` first would
    open one on GPU 0 in every process). With one process, or on a CPU,
    `device` itself.
    """
    if not active() or device.type != 'cuda':
        return device
    device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
    torch.cuda.set_device(device)
    return device


def init(device):
    """Join the process group when there are several processes; returns the device this process trains on.

    On a GPU each process takes the one of its LOCAL_RANK (NCCL; rank_device);
    on a CPU they share it (gloo).
    """
    if not active():
        return device
    device = rank_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    return device


def shutdown():
    """Leave the process group (nothing when none was joined), every rank together.

    The barrier first: a rank that tears down its gloo connections while
    another still uses them can abort at exit ("terminate called without an
    active exception"), which torchrun reports as a failed run.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(module, device):
    """`module` in DistributedDataParallel when the process group is up, else `module` itself.

    Without broadcast_buffers: the model's only buffers are the constant
    causal masks, and broadcasting them would be a collective in every
    forward, while processes may run different numbers of pieces per step
    (shares of unequal size cut into chunks), which would deadlock.
    """
    if not dist.is_initialized():
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == 'cuda' else None,
                                   broadcast_buffers=False)


def no_sync(module, skip):
    """A context in which DDP leaves the gradients unsynchronised (when `skip`); else nothing.

    The pieces of one batch but the last run inside it: their gradients
    accumulate locally and the last backward synchronises the sum once.
    """
    module = getattr(module, '_orig_mod', module)  # torch.compile's wrapper of the DDP module
    if skip and isinstance(module, DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


def _reduce(values, device, op):
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def all_sum(values, device):
    """Each of `values` (numbers) summed over the processes, as floats; the values themselves in one process."""
    if not dist.is_initialized():
        return list(values)
    return _reduce(values, device, dist.ReduceOp.SUM)


def agree_stop(stop, due, device):
    """Whether any process wants a checkpoint now (`due`); a signal any process got is recorded in `stop`.

    All processes call this after every step, so they save and stop at the
    same step even when a signal reached only one of them.
    """
    if not dist.is_initialized():
        return due
    mine = signal.Signals[stop.signal_name].value if stop.signal_name else 0
    signum, any_due = _reduce([mine, int(bool(due))], device, dist.ReduceOp.MAX)
    if signum and not stop.signal_name:
        stop.signal_name = signal.Signals(int(signum)).name
    return bool(any_due)


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None on the others; [obj] in one process."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def barrier():
    """Wait until every process gets here (nothing in one process)."""
    if dist.is_initialized():
        dist.barrier()


def let_main_exit_first(seconds=30):
    """On ranks other than 0, wait (at most `seconds`) for rank 0 to exit; nothing on rank 0 or in one process.

    For errors that every rank meets on its own before the process group is
    up, such as a bad input. torchrun stops all other ranks as soon as one
    exits, so a rank that exits first can cut off rank 0 before rank 0 has
    printed its message; waiting here lets rank 0 speak first, and torchrun
    then ends this rank.
    """
    if rank() > 0:
        time.sleep(seconds)
