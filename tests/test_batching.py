"""SPEC §7: batches split into trimmed pieces (same loss and gradients), stratified batches."""
import math

import pytest
import torch

import batching
import model
import optim
import trainer
from conftest import small_config, tiny_model, toy_dataset

pytestmark = pytest.mark.usefixtures('single_thread')


# ---------------------------------------------------------- split_batch

def full_and_split(m, x, y, chunks, trim):
    m.zero_grad(set_to_none=True)
    _, loss = m(x, y)
    loss.backward()
    full = (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
    m.zero_grad(set_to_none=True)
    n_targets = int((y != 0).sum())
    total = 0.0
    pieces = batching.split_batch(x, y, chunks, trim)
    for xp, yp in pieces:
        _, loss_sum = m(xp, yp, loss_reduction='sum')
        (loss_sum / n_targets).backward()
        total += loss_sum.item()
    split = (total / n_targets, {n: p.grad.clone() for n, p in m.named_parameters()})
    return full, split, pieces


@pytest.mark.parametrize('synthesizer', [False, True])
@pytest.mark.parametrize('chunks, trim', [(1, True), (3, True), (4, True), (1, False)])
def test_split_batch_same_loss_and_gradients(char_dataset, synthesizer, chunks, trim):
    import random
    random.seed(0)
    items = [char_dataset[i] for i in range(0, 400, 25)]   # 16 rows of varied length
    x = torch.stack([a for a, _ in items])
    y = torch.stack([b for _, b in items])
    torch.manual_seed(0)
    m = model.GPT(small_config(synthesizer, block_size=128, n_embd=32, n_head=4, n_layer=2,
                               vocab_size=char_dataset.vocab_size))
    (loss_full, g_full), (loss_split, g_split), pieces = full_and_split(m, x, y, chunks, trim)
    # the pieces hold every row once, and every non-pad target
    assert sum(p[0].shape[0] for p in pieces) == x.shape[0]
    assert sum(int((p[1] != 0).sum()) for p in pieces) == int((y != 0).sum())
    if trim:
        assert max(p[0].shape[1] for p in pieces) < 127, 'trimming should have dropped pad columns'
    assert loss_split == pytest.approx(float(loss_full), rel=1e-5)
    for name in g_full:
        torch.testing.assert_close(g_split[name], g_full[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda msg, name=name: f'{name}: {msg}')


def test_split_batch_with_name_dataset_rows(name_dataset):
    """NameDataset y has leading pads and non-pad answers in the middle."""
    x = torch.stack([name_dataset[i][0] for i in range(12)])
    y = torch.stack([name_dataset[i][1] for i in range(12)])
    torch.manual_seed(1)
    m = model.GPT(small_config(False, block_size=128, n_embd=32, n_head=4, n_layer=1, vocab_size=256))
    (loss_full, g_full), (loss_split, g_split), _ = full_and_split(m, x, y, 3, True)
    assert loss_split == pytest.approx(float(loss_full), rel=1e-5)
    for name in g_full:
        torch.testing.assert_close(g_split[name], g_full[name], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------- stratified_batches

def last_target(y):
    return int((y != 0).nonzero().max()) + 1


@pytest.mark.parametrize('n, batch_size, chunks', [(300, 32, 4), (37, 8, 3), (5, 2, 4)])
def test_stratified_batches_use_every_example_once_in_pieces_of_similar_length(char_dataset, n, batch_size, chunks):
    import random
    random.seed(0)
    examples = [char_dataset[i] for i in range(n)]
    generator = torch.Generator().manual_seed(0)
    batches = batching.stratified_batches(examples, batch_size, chunks, generator)
    if batch_size >= chunks:
        assert len(batches) == math.ceil(n / batch_size)
    assert all(1 <= len(pieces) <= chunks for pieces in batches)
    # every example once, each piece trimmed to its longest target (only pad targets are cut off)
    unused = {}
    for x, y in examples:
        unused.setdefault(tuple(y.tolist()), []).append(x)
    width, count = examples[0][1].size(0), 0
    for pieces in batches:
        for xp, yp in pieces:
            assert xp.shape == yp.shape and xp.shape[1] == max(last_target(y) for y in yp)
            for x, y in zip(xp, yp):
                candidates = unused[tuple(torch.cat([y, y.new_zeros(width - len(y))]).tolist())]
                match = next(i for i, c in enumerate(candidates) if torch.equal(c[:len(x)], x))
                candidates.pop(match)
                count += 1
    assert count == n
    if n == 300:
        # a batch holds one piece of each length stratum: its k-th shortest piece is no longer than
        # any batch's (k+1)-th shortest; and the batches are of one size (300 = 10 x 30)
        ordered = [sorted(pieces, key=lambda p: p[0].shape[1]) for pieces in batches]
        for k in range(chunks - 1):
            assert max(last_target(y) for b in ordered for y in b[k][1]) <= \
                min(last_target(y) for b in ordered for y in b[k + 1][1])
        assert {sum(xp.shape[0] for xp, _ in pieces) for pieces in batches} == {n // len(batches)}
        # and far less padding than trimming whole random batches
        stratified = sum(xp.numel() for pieces in batches for xp, _ in pieces)
        whole = sum(len(examples[i:i + batch_size]) * max(last_target(y) for _, y in examples[i:i + batch_size])
                    for i in range(0, n, batch_size))
        assert stratified < 0.8 * whole


def test_stratified_batching_in_the_trainer_sees_every_example_each_epoch():
    seen = []

    class Recording(torch.utils.data.Dataset):
        def __init__(self, data):
            self.data = data

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            seen.append(i)
            return self.data[i]

    m = tiny_model(seed=3)
    data = Recording(toy_dataset(n=20))
    cfg = trainer.TrainerConfig(max_epochs=2, batch_size=8, chunks=2, batching='stratified', show_progress=False)
    t = trainer.Trainer(m, data, None, cfg, device='cpu')
    t.train()
    assert t.step == 6 and sorted(seen) == sorted(list(range(20)) * 2)
    assert t.tokens == 0  # no lr_decay: the schedule's counter is untouched


def test_trainer_chunked_gradients_equal_plain(monkeypatch):
    """Inside Trainer.train: the gradient of the first step with chunks=3 + trim equals the plain one."""
    grads = {}

    def run(chunks, trim):
        original = optim.make_optimizer

        def wrapped(m, *a, **k):
            opt = original(m, *a, **k)
            def hook(o, args, kw):
                grads.setdefault((chunks, trim), [p.grad.clone() for p in m.parameters()])

            opt.register_step_pre_hook(hook)
            return opt

        monkeypatch.setattr(optim, 'make_optimizer', wrapped)
        m = tiny_model(seed=3)
        cfg = trainer.TrainerConfig(max_epochs=1, max_steps=1, batch_size=8, chunks=chunks, trim_padding=trim,
                                    grad_norm_clip=1e9, show_progress=False)
        torch.manual_seed(123)    # same shuffle
        trainer.Trainer(m, toy_dataset(n=16), None, cfg, device='cpu').train()
        monkeypatch.setattr(optim, 'make_optimizer', original)

    run(1, False)
    run(3, True)
    for a, b in zip(grads[(1, False)], grads[(3, True)]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
