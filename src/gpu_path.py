"""The GPU fast path: epochs built on the device, a fixed-shape step, a CUDA graph, one host sync per epoch.

Both are off by default (the CPU path and every default run are as before):
- `data_path='device'` (`--data_path device`): each epoch is built on the
  device in a few tensor operations instead of by DataLoader workers calling
  `__getitem__` 128 times a batch. For CharCorruptionDataset that is
  `corrupt`, the same span corruption on whole tensors: given the same draws
  (truncation length, masked length, start) it gives exactly the dataset's
  strings, and `draw` draws them from the same distribution as the dataset's
  `random.randint` calls (tests/test_gpu_path.py holds both). Other datasets
  (NameDataset, whose items are fixed) are read once and reused. The draws
  come from the trainer's data generator, so a resumed epoch replays exactly;
  they are not the draws the DataLoader path would have made.
- `train_step='fixed'` (`--train_step fixed`): every batch runs whole, padded
  to batch_size x (block_size - 1) with all-pad rows and columns (the loss
  ignores pad and attention is causal, so the loss and gradients are those of
  the trimmed batch), the learning rate is a tensor on the device, and the
  loss stays on the device: the metrics lines of an epoch are written at its
  end with one host sync. `train_step='graph'` is the same step captured
  once as a CUDA graph (forward, backward, clipping, fused AdamW) and
  replayed; off CUDA it runs as 'fixed'. If capture fails, the step says so
  in one line and runs as 'fixed' from there.
  A diverging run is caught before its update without a host sync: a step
  whose loss or gradient norm is not finite sets a flag on the device that
  makes fused AdamW skip its update and every later one, and the next flush
  of the metrics (metrics.MetricsLog; at the latest, before a checkpoint or
  at the epoch's end) reports the step, so the params and checkpoints stay
  those of the last good step.
"""
import sys

import torch

import batching
import dataset as datasets
import utils

DATA_PATHS = ('loader', 'device')           # 'loader': DataLoader over __getitem__ (the original)
TRAIN_STEPS = ('default', 'fixed', 'graph')  # 'default': the trainer's own step
GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before capture (they are real training steps)


# ---------------------------------------------------------------- span corruption on tensors

class DeviceCorruption:
    """CharCorruptionDataset's documents as one tensor on `device`, corrupted many at a time.

    Only the first int(block_size * 7 / 8) characters of a document can ever
    be kept, so only those are stored (pad beyond a document's end).
    """

    def __init__(self, corpus, device):
        self.block_size = corpus.block_size
        self.max_kept = int(corpus.block_size * 7 / 8)
        self.mask_id = corpus.stoi[corpus.MASK_CHAR]
        self.pad_id = corpus.stoi[corpus.PAD_CHAR]
        width = max(1, self.max_kept)
        docs = torch.full((len(corpus), width), self.pad_id, dtype=torch.long)
        lengths = torch.zeros(len(corpus), dtype=torch.long)
        for i, document in enumerate(corpus.data):
            ids = [corpus.stoi[c] for c in document[:width]]
            docs[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            lengths[i] = len(ids)
        self.docs, self.lengths, self.cpu_lengths = docs.to(device), lengths.to(device), lengths

    def draw(self, index, generator):
        """(truncation, masked length, start) for the documents `index` (a CPU tensor), from `generator`.

        The dataset's distribution: truncation uniform in [4, max_kept]; with
        kept = min(truncation, document length), masked length uniform in
        [1, max(1, round(kept / 2) - 1)] (round half to even, as Python's
        round), at most kept, 0 for an empty document; start uniform in
        [0, kept - masked length].
        """
        n = len(index)
        truncation = torch.randint(4, self.max_kept + 1, (n,), generator=generator)
        kept = torch.minimum(truncation, self.cpu_lengths[index])
        high = torch.clamp(torch.round(kept.double() / 2) - 1, min=1)
        masked = 1 + (torch.rand(n, dtype=torch.float64, generator=generator) * high).long()
        masked = torch.where(kept > 0, torch.minimum(masked, kept), torch.zeros_like(masked))
        start = (torch.rand(n, dtype=torch.float64, generator=generator) * (kept - masked + 1)).long()
        return truncation, masked, start

    def examples(self, index, truncation, masked, start):
        """(x, y) of the documents `index` corrupted with the given draws, each (n, block_size - 1), on the device."""
        device = self.docs.device
        index, truncation, masked, start = (t.to(device) for t in (index, truncation, masked, start))
        return corrupt(self.docs[index], self.lengths[index], truncation, masked, start,
                       self.block_size, self.mask_id, self.pad_id)


def corrupt(docs, lengths, truncation, masked, start, block_size, mask_id, pad_id):
    """masked_string = prefix + MASK + suffix + MASK + masked_content, padded to block_size; (x, y) = ([:-1], [1:]).

    docs (n, W) holds each document's first W >= max(truncation) ids; the
    other arguments are (n,) tensors. Position p of masked_string is, with
    k the kept length, s the start, m the masked length, u = k - s - m:
    doc[p] for p < s; MASK at s; doc[p - 1 + m] for s < p <= s + u (the
    suffix); MASK at s + u + 1; doc[p - u - 2] up to k + 2 (the masked
    content); pad after.
    """
    kept = torch.minimum(truncation, lengths)[:, None]
    s, m = start[:, None], masked[:, None]
    u = kept - s - m
    p = torch.arange(block_size, device=docs.device)[None, :]
    source = torch.where(p < s, p, torch.where(p <= s + u, p - 1 + m, p - u - 2))
    ids = torch.gather(docs, 1, source.clamp(0, docs.size(1) - 1))
    ids = torch.where((p == s) | (p == s + u + 1), torch.full_like(ids, mask_id), ids)
    ids = torch.where(p >= kept + 2, torch.full_like(ids, pad_id), ids)
    return ids[:, :-1], ids[:, 1:]


# ---------------------------------------------------------------- an epoch on the device

class DeviceEpochs:
    """Builds whole epochs of `dataset` on `device`: corrupted afresh (CharCorruptionDataset) or read once."""

    def __init__(self, dataset, device):
        self.device = device
        if isinstance(dataset, datasets.CharCorruptionDataset):
            self.corruption, self.fixed = DeviceCorruption(dataset, device), None
        else:  # items that do not change between calls (NameDataset): stacked once
            items = [dataset[i] for i in range(len(dataset))]
            self.corruption = None
            self.fixed = (torch.stack([x for x, _ in items]).to(device), torch.stack([y for _, y in items]).to(device))

    def epoch(self, order, generator):
        """(x, y) of every example in `order`, in that order; corruption draws come from `generator`."""
        if self.corruption is None:
            index = order.to(self.device)
            return self.fixed[0][index], self.fixed[1][index]
        return self.corruption.examples(order, *self.corruption.draw(order, generator))


def epoch_batches(epochs, n_examples, batch_size, generator, chunks=1, trim=True, skip=0):
    """Like batching.epoch_batches for random batching: (pieces on the device, token count) from batch `skip` on.

    The order is a permutation from `generator`, then the epoch's corruption
    draws; all of them are drawn before the first batch, so a resumed epoch
    (skip > 0) replays them exactly. Trimming a whole batch needs its
    length: the lengths of every batch come back in one host sync.
    """
    order = torch.randperm(n_examples, generator=generator)
    x, y = epochs.epoch(order, generator)
    starts = list(range(0, n_examples, batch_size))
    if trim and chunks <= 1:
        lengths = batching.target_lengths(y)
        padded = torch.nn.functional.pad(lengths, (0, len(starts) * batch_size - n_examples))
        widths = padded.view(len(starts), batch_size).max(1).values.tolist()
    for b in range(skip, len(starts)):
        xb, yb = x[starts[b]:starts[b] + batch_size], y[starts[b]:starts[b] + batch_size]
        if trim and chunks <= 1:
            pieces = [(xb[:, :widths[b]], yb[:, :widths[b]])]
        else:
            pieces = batching.split_batch(xb, yb, chunks, trim)
        yield pieces, yb.numel()


# ---------------------------------------------------------------- the fixed-shape step

def use_tensor_lr(optimizer, device, capturable):
    """Make each group's learning rate a tensor on `device` (the trainer fills it in place) and set `capturable`.

    Also after load_state_dict, which brings back the saved groups' floats.
    """
    for group in optimizer.param_groups:
        lr = group['lr']
        value = float(lr) if torch.is_tensor(lr) else lr
        group['lr'] = torch.tensor(value, dtype=torch.float32, device=device)
        group['capturable'] = capturable


def set_lr(optimizer, lr):
    """Set every group's learning rate: in place where it is a tensor (a captured graph reads it there)."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group['lr']):
            group['lr'].fill_(lr)
        else:
            group['lr'] = lr


def on_side_stream(step):
    """step() on a side stream, the current stream then waiting for it: how torch.cuda.graphs asks the
    steps before a capture to run."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)


class FixedShapeStep:
    """One optimizer step on a batch padded to (batch_size, width); returns the mean loss as a device tensor.

    The batch is copied into static buffers, the rows and columns beyond it
    filled with pad: pad targets add nothing to the summed loss nor to the
    count of targets it is divided by, and with causal attention no real
    position sees a pad column after it, so the loss and gradients are those
    of the batch itself. With `graph` (CUDA only), the step after
    GRAPH_WARMUP_STEPS eager ones is captured as a CUDA graph and every later
    step replays it; if capture fails, one line on stderr says so and every
    later step runs eagerly.

    The optimizer must be a fused AdamW: its update reads `found_inf`, set
    here to `self.skip`, a device flag that turns 1 at the first step whose
    loss or gradient norm is not finite and stays 1, so that step's update
    and every later one are skipped (step counts included) with no host
    sync. `last_norm` is each step's gradient norm (before clipping), which
    `run` hands on with the loss for the flush to check.
    """

    def __init__(self, model, forward, optimizer, grad_norm_clip, amp_dtype, batch_size, width, device, graph):
        if not optimizer.defaults.get('fused'):
            raise ValueError("train_step 'fixed' and 'graph' need a fused AdamW (fused_optimizer True or 'auto' "
                             "on a CPU or CUDA device): its update is what skips a diverged step on the device")
        self.model, self.forward, self.optimizer = model, forward, optimizer
        self.grad_norm_clip, self.amp_dtype, self.device = grad_norm_clip, amp_dtype, device
        self.graph_wanted = bool(graph) and device.type == 'cuda'
        self.x = torch.zeros(batch_size, width, dtype=torch.long, device=device)
        self.y = torch.zeros(batch_size, width, dtype=torch.long, device=device)
        self.skip = torch.zeros((), dtype=torch.float32, device=device)
        optimizer.found_inf = self.skip
        self.loss = self.norm = self.last_norm = None
        self.graph = None
        self.eager_steps = 0

    def body(self):
        """Forward, backward, clipping and the AdamW step on the static buffers; self.loss: the mean loss."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None,
                            cache_enabled=False):
            loss_sum = self.forward(self.x, self.y, loss_reduction='sum')[1]
        n_targets = (self.y != 0).sum().clamp(min=1)
        loss = loss_sum / n_targets
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_norm_clip)
        # on the device: once a loss or gradient norm is not finite, fused AdamW skips every update
        finite = torch.isfinite(loss.detach()) & torch.isfinite(norm)
        self.skip.copy_(torch.maximum(self.skip, (~finite).float()))
        self.optimizer.step()
        self.loss, self.norm = loss.detach(), norm.detach()

    def __call__(self, x, y):
        rows, cols = x.shape
        if rows > self.x.size(0) or cols > self.x.size(1):
            raise ValueError(f'a batch of {rows} x {cols} does not fit the fixed step of {tuple(self.x.shape)}')
        self.x.zero_()
        self.y.zero_()  # pad id 0
        self.x[:rows, :cols].copy_(x)
        self.y[:rows, :cols].copy_(y)
        if self.graph_wanted and self.graph is None and self.eager_steps >= GRAPH_WARMUP_STEPS:
            self.capture()
        if self.graph is not None:
            self.graph.replay()
        elif self.graph_wanted:  # the steps before capture
            on_side_stream(self.eager_step)
            self.eager_steps += 1
        else:
            self.eager_step()
        self.last_norm = self.norm.clone()
        return self.loss.clone()

    def count(self, pieces, batch_tokens):
        """The tokens the schedule counts (steps.EagerStep.count): one process, so the batch's own."""
        return batch_tokens

    def run(self, pieces):
        """The trainer's call: the batch as its one piece. Pending on the device: its loss, gradient norm and
        the learning rate it ran at (a tensor use_tensor_lr made; the trainer sets the next one in place)."""
        (x, y), = pieces
        lr = self.optimizer.param_groups[0]['lr']
        loss = self(x, y)
        return torch.stack([loss, self.last_norm.to(loss.dtype), lr.to(loss.dtype)])

    @staticmethod
    def resolve(pending):
        """The loss, gradient norm and learning rate of steps gone by as floats, in one host sync
        (metrics.MetricsLog.flush)."""
        return [{'loss': loss, 'gradient norm': norm, 'learning rate': lr}
                for loss, norm, lr in torch.stack(pending).tolist()]

    def eager_step(self):
        self.model.zero_grad(set_to_none=True)
        self.body()

    def capture(self):
        """Record one step: the gradients are allocated inside the graph, so each replay writes them afresh.

        If capture fails, the step runs eagerly from here on (graph_wanted
        off) and one line on stderr says so: capture runs nothing, so the
        model and optimizer are as the last eager step left them.
        """
        self.model.zero_grad(set_to_none=True)
        try:
            graph = torch.cuda.CUDAGraph()
            # thread_local: a call in another thread (a DataLoader's pin-memory thread) does not break the capture
            with torch.cuda.graph(graph, capture_error_mode='thread_local'):
                self.body()
        except Exception as e:  # noqa: BLE001 - any failure of capture: fall back, never end the run
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            print(f"warning: CUDA graph capture failed ({type(e).__name__}: {first}); train_step 'graph' runs "
                  f"as 'fixed' (eager) from here on", file=sys.stderr, flush=True)
            self.graph_wanted = False
            self.model.zero_grad(set_to_none=True)
            return
        self.graph = graph


def check_choices(data_path, train_step, compile=False):
    utils.check_choice('data_path', data_path, DATA_PATHS)
    utils.check_choice('train_step', train_step, TRAIN_STEPS)
    if compile and train_step == 'graph':
        raise ValueError("compile and train_step 'graph' do not go together: the CUDA graph records the step's "
                         "kernels itself; use train_step 'fixed' with compile")


def width_of(dataset, model):
    """The examples' width, block_size - 1, without drawing an example (that would use up random numbers)."""
    return getattr(dataset, 'block_size', model.get_block_size()) - 1
