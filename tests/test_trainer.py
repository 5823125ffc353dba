"""SPEC §7: the learning-rate schedule, AdamW groups, batch splitting, precision, determinism."""
import json
import math
import re

import pytest
import torch
from torch.utils.data import TensorDataset

import batching
import checkpoint
import dataset
import model
import optim
import trainer
import utils
from conftest import small_config

pytestmark = pytest.mark.usefixtures('single_thread')


def test_config_defaults():
    c = trainer.TrainerConfig()
    assert (c.max_epochs, c.batch_size, c.learning_rate, tuple(c.betas), c.grad_norm_clip, c.weight_decay,
            c.lr_decay, c.warmup_tokens, c.final_tokens, c.ckpt_path, c.num_workers) == \
        (10, 64, 3e-4, (0.9, 0.95), 1.0, 0.1, False, 375e6, 260e9, None, 0)
    c2 = trainer.TrainerConfig(max_epochs=3, learning_rate=1.0)
    assert c2.max_epochs == 3 and c2.learning_rate == 1.0 and c2.batch_size == 64


# ---------------------------------------------------------------- schedule

SCHED = trainer.TrainerConfig(lr_decay=True, warmup_tokens=1000, final_tokens=11000)


@pytest.mark.parametrize('tokens, expected', [
    (0, 0.0),
    (1, 0.001),
    (250, 0.25),
    (999, 0.999),
    (1000, 1.0),                                        # exactly at the end of warmup: progress 0
    (1000 + 2500, 0.5 * (1 + math.cos(math.pi * 0.25))),
    (6000, 0.5),                                        # progress 0.5
    (1000 + 8000, 0.5 * (1 + math.cos(math.pi * 0.8))),  # 0.0955 -> floor
    (1000 + 7000, 0.5 * (1 + math.cos(math.pi * 0.7))),  # 0.206, above the floor
    (11000, 0.1),                                       # progress 1: cosine 0, floored
    (1000 + 12000, 0.1),                                # progress 1.2: still under the floor
    (1000 + 18000, 0.5 * (1 + math.cos(math.pi * 1.8))),  # progress 1.8: the cosine has risen to 0.905
    (21000, 1.0),                                       # progress 2: back to the peak
])
def test_lr_multiplier_values(tokens, expected):
    expected = expected if tokens < 1000 else max(0.1, expected)
    assert optim.lr_multiplier(tokens, SCHED) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_lr_multiplier_rises_past_progress_one():
    at_1_8 = optim.lr_multiplier(1000 + 18000, SCHED)
    assert at_1_8 == pytest.approx(0.9045084971874737, rel=1e-9)
    assert at_1_8 > 0.1
    # monotone rise between progress 1.4 and 2.0
    values = [optim.lr_multiplier(1000 + int(p * 10000), SCHED) for p in (1.4, 1.6, 1.8, 2.0)]
    assert values == sorted(values) and values[0] > 0.1


def test_lr_multiplier_with_the_pretrain_recipe():
    """warmup 512*20 tokens, final 200 * n_docs * 128, as run.py's pretraining recipe."""
    n_docs = 2937
    cfg = trainer.TrainerConfig(lr_decay=True, warmup_tokens=512 * 20, final_tokens=200 * n_docs * 128)
    assert optim.lr_multiplier(5120, cfg) == pytest.approx(0.5)
    assert optim.lr_multiplier(10240, cfg) == 1.0
    tokens = 650 * n_docs * 127   # the whole 650-epoch run, batches of 127-long rows
    progress = (tokens - 10240) / (200 * n_docs * 128 - 10240)
    assert 3.2 < progress < 3.3
    expected = max(0.1, 0.5 * (1 + math.cos(math.pi * progress)))
    assert expected > 0.1     # the unclamped cosine has come back above the floor by the end
    assert optim.lr_multiplier(tokens, cfg) == pytest.approx(expected, rel=1e-9)


def toy_dataset(n=14, T=12, vocab=30, seed=0):
    """(x, y) rows with trailing pad targets of varied length, like span corruption."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (n, T), generator=g)
    y = torch.randint(1, vocab, (n, T), generator=g)
    for i in range(n):
        cut = int(torch.randint(1, T + 1, (1,), generator=g))
        y[i, cut:] = 0
        x[i, cut + 1:] = 0
    return TensorDataset(x, y)


def tiny_model(synthesizer=False, seed=0, pdrop=0.0, block_size=16, vocab=30):
    torch.manual_seed(seed)
    return model.GPT(small_config(synthesizer, block_size=block_size, n_embd=16, n_head=2, n_layer=1,
                                  vocab_size=vocab, pdrop=pdrop))


def capture_optimizer(monkeypatch):
    """Wrap optim.make_optimizer to record the lr each step runs with."""
    record = {'lrs': [], 'opt': None}
    original = optim.make_optimizer

    def wrapped(*args, **kwargs):
        opt = original(*args, **kwargs)
        record['opt'] = opt
        opt.register_step_pre_hook(lambda o, a, k: record['lrs'].append([g['lr'] for g in o.param_groups]))
        return opt

    monkeypatch.setattr(optim, 'make_optimizer', wrapped)
    return record


def test_trainer_applies_schedule_after_each_step(monkeypatch, tmp_path):
    ds = toy_dataset(n=14, T=12)            # batches of 4, 4, 4, 2 rows per epoch
    lr0 = 0.01
    cfg = trainer.TrainerConfig(max_epochs=2, batch_size=4, learning_rate=lr0, lr_decay=True,
                                warmup_tokens=100, final_tokens=250, show_progress=False,
                                metrics_path=str(tmp_path / 'm.jsonl'))
    record = capture_optimizer(monkeypatch)
    trainer.Trainer(tiny_model(), ds, None, cfg, device='cpu').train()
    batch_rows = [4, 4, 4, 2] * 2
    tokens = []
    total = 0
    for rows in batch_rows:
        total += rows * 12          # every target counts, pads included
        tokens.append(total)
    expected_after = [lr0 * optim.lr_multiplier(t, cfg) for t in tokens]
    # step 1 runs with the configured lr; step k+1 with the lr set after step k
    lrs = record['lrs']
    assert len(lrs) == len(batch_rows)
    assert all(len(set(group_lrs)) == 1 for group_lrs in lrs)
    used = [group_lrs[0] for group_lrs in lrs]
    assert used[0] == pytest.approx(lr0)
    assert used[1:] == pytest.approx(expected_after[:-1])
    assert [g['lr'] for g in record['opt'].param_groups] == pytest.approx([expected_after[-1]] * 2)
    # the hand values, to be sure the schedule went through warmup, decay and floor
    assert expected_after[0] == pytest.approx(lr0 * 48 / 100)
    assert expected_after[1] == pytest.approx(lr0 * 0.96)
    assert expected_after[2] == pytest.approx(lr0 * 0.5 * (1 + math.cos(math.pi * 44 / 150)))
    assert expected_after[5] == pytest.approx(lr0 * 0.1)                  # progress 1.09: floor
    assert expected_after[7] == pytest.approx(lr0 * 0.5 * (1 + math.cos(math.pi * 236 / 150)))  # risen
    assert expected_after[7] > 5 * lr0 * 0.1
    with open(tmp_path / 'm.jsonl') as f:
        rows = [json.loads(line) for line in f]
    assert [r['step'] for r in rows] == list(range(1, 9))
    assert [r['tokens'] for r in rows] == tokens
    assert [r['lr'] for r in rows] == pytest.approx(expected_after)
    assert [r['epoch'] for r in rows] == [1] * 4 + [2] * 4


def test_scheduled_first_step_warms_up_from_step_one(monkeypatch, tmp_path):
    """first_step_lr='scheduled': step k runs at the rate of the tokens of batches 1..k, the first included."""
    ds = toy_dataset(n=14, T=12)            # batches of 4, 4, 4, 2 rows per epoch
    lr0 = 0.01
    cfg = trainer.TrainerConfig(max_epochs=2, batch_size=4, learning_rate=lr0, lr_decay=True,
                                warmup_tokens=100, final_tokens=250, show_progress=False,
                                first_step_lr='scheduled', metrics_path=str(tmp_path / 'm.jsonl'))
    record = capture_optimizer(monkeypatch)
    trainer.Trainer(tiny_model(), ds, None, cfg, device='cpu').train()
    tokens, total = [], 0
    for rows in [4, 4, 4, 2] * 2:
        total += rows * 12
        tokens.append(total)
    expected = [lr0 * optim.lr_multiplier(t, cfg) for t in tokens]
    used = [group_lrs[0] for group_lrs in record['lrs']]
    assert used == pytest.approx(expected)
    assert used[0] == pytest.approx(lr0 * 48 / 100)   # not the full rate, as 'full' runs its first step
    with open(tmp_path / 'm.jsonl') as f:
        assert [json.loads(line)['lr'] for line in f] == pytest.approx(expected)  # the rate each step ran at


def test_first_step_lr_full_and_scheduled_differ_only_in_the_first_step(monkeypatch):
    """Adam's first update moves a parameter by about its learning rate: 'full' by lr0, 'scheduled' less."""
    moved = {}
    for mode in trainer.FIRST_STEP_LRS:
        m = tiny_model()
        before = m.head.weight.detach().clone()
        cfg = trainer.TrainerConfig(max_epochs=1, max_steps=1, batch_size=4, learning_rate=0.01, lr_decay=True,
                                    warmup_tokens=480, final_tokens=5000, show_progress=False,
                                    weight_decay=0.0, first_step_lr=mode)
        trainer.Trainer(m, toy_dataset(), None, cfg, device='cpu').train()
        moved[mode] = float((m.head.weight.detach() - before).abs().max())
    assert moved['full'] == pytest.approx(0.01, rel=1e-3)
    assert moved['scheduled'] == pytest.approx(0.01 * 48 / 480, rel=1e-3)
    with pytest.raises(ValueError, match="unknown first_step_lr 'late'"):
        trainer.Trainer(tiny_model(), toy_dataset(), None,
                        trainer.TrainerConfig(first_step_lr='late', show_progress=False), device='cpu').train()


def test_trainer_without_decay_keeps_lr(monkeypatch):
    record = capture_optimizer(monkeypatch)
    cfg = trainer.TrainerConfig(max_epochs=1, batch_size=4, learning_rate=0.02, show_progress=False)
    trainer.Trainer(tiny_model(), toy_dataset(), None, cfg, device='cpu').train()
    assert all(lr == 0.02 for group_lrs in record['lrs'] for lr in group_lrs)


def test_weight_decay_groups():
    for synthesizer in (False, True):
        m = tiny_model(synthesizer)
        opt = optim.make_optimizer(m, trainer.TrainerConfig(), torch.device('cpu'))
        assert isinstance(opt, torch.optim.AdamW)
        decay_of = {}
        for group in opt.param_groups:
            assert group['betas'] == (0.9, 0.95)
            assert group['lr'] == 3e-4
            for p in group['params']:
                assert id(p) not in decay_of, 'a parameter is in two groups'
                decay_of[id(p)] = group['weight_decay']
        names = dict(m.named_parameters())
        assert len(decay_of) == len(names)
        for name, p in names.items():
            expected = 0.0 if 'bias' in name else 0.1
            assert decay_of[id(p)] == expected, name
        # sanity: both groups are populated, and LayerNorm weights / embeddings / pos_emb decay
        assert decay_of[id(names['ln_f.weight'])] == 0.1
        assert decay_of[id(names['pos_emb'])] == 0.1
        assert decay_of[id(names['tok_emb.weight'])] == 0.1
        if synthesizer:
            assert decay_of[id(names['blocks.0.attn.b2'])] == 0.1   # 'b2' is not named 'bias'
            assert decay_of[id(names['blocks.0.attn.w1.bias'])] == 0.0


def test_weight_decay_on_matrices_leaves_norms_embeddings_and_biases_alone():
    for synthesizer in (False, True):
        m = tiny_model(synthesizer)
        cfg = trainer.TrainerConfig(weight_decay=0.3, weight_decay_on='matrices')
        opt = optim.make_optimizer(m, cfg, torch.device('cpu'))
        decayed = {id(p) for group in opt.param_groups if group['weight_decay'] == 0.3 for p in group['params']}
        kept = {id(p) for group in opt.param_groups if group['weight_decay'] == 0.0 for p in group['params']}
        names = dict(m.named_parameters())
        assert decayed | kept == {id(p) for p in names.values()} and not decayed & kept
        linear_weights = {f'{name}.weight' for name, module in m.named_modules() if isinstance(module, torch.nn.Linear)}
        synthesizer_w2 = {name for name in names if name.endswith('attn.w2')}
        assert len(synthesizer_w2) == (1 if synthesizer else 0)  # tiny_model has one block
        expected = linear_weights | synthesizer_w2
        assert {name for name, p in names.items() if id(p) in decayed} == expected
        assert 'head.weight' in expected and 'blocks.0.mlp.0.weight' in expected
    with pytest.raises(ValueError, match="use 'all' or 'matrices'"):
        optim.decays('head.weight', names['head.weight'], 'embeddings')


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


# ------------------------------------------------------ precision, seeds

@pytest.mark.parametrize('synthesizer', [False, True])
def test_bf16_autocast_loss_close_to_fp32(char_dataset, synthesizer):
    """bf16 autocast loss within 2% (relative) of the fp32 loss on the same batch."""
    import random
    random.seed(1)
    x = torch.stack([char_dataset[i][0] for i in range(8)])
    y = torch.stack([char_dataset[i][1] for i in range(8)])
    torch.manual_seed(0)
    m = model.GPT(small_config(synthesizer, block_size=128, n_embd=64, n_head=4, n_layer=2,
                               vocab_size=char_dataset.vocab_size)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():   # move away from the near-uniform init
            if p.dim() > 1:
                p.normal_(0, 0.1)
        _, loss32 = m(x, y)
        dtype = trainer.autocast_dtype('bf16', torch.device('cpu'))
        assert dtype == torch.bfloat16
        with torch.autocast('cpu', dtype=dtype):
            logits16, loss16 = m(x, y)
    assert logits16.dtype == torch.bfloat16, 'autocast did not run the model in bf16'
    assert abs(float(loss16) - float(loss32)) <= 0.02 * float(loss32)
    assert float(loss16) != float(loss32)


def test_autocast_dtype_settings():
    cpu = torch.device('cpu')
    assert trainer.autocast_dtype('fp32', cpu) is None
    assert trainer.autocast_dtype('auto', cpu) is None     # bf16 on a CPU only when asked
    assert trainer.autocast_dtype('bf16', cpu) == torch.bfloat16
    assert trainer.autocast_dtype('tf32', cpu) is None     # fp32 tensors; TF32 products only on a CUDA GPU
    assert not torch.backends.cuda.matmul.allow_tf32       # and a CPU run leaves the CUDA setting alone
    with pytest.raises(ValueError):
        trainer.autocast_dtype('fp16x', cpu)


def test_same_seed_gives_identical_params():
    def run():
        utils.set_seed(7)
        m = tiny_model(seed=7, pdrop=0.1)     # dropout on: the RNG stream matters
        cfg = trainer.TrainerConfig(max_epochs=1, max_steps=3, batch_size=4, learning_rate=1e-2,
                                    lr_decay=True, warmup_tokens=50, final_tokens=500, show_progress=False)
        trainer.Trainer(m, toy_dataset(), None, cfg, device='cpu').train()
        return {k: v.clone() for k, v in m.state_dict().items()}

    a, b = run(), run()
    init = tiny_model(seed=7).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a), 'training changed nothing'
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_max_steps_and_checkpoint(tmp_path):
    ckpt = tmp_path / 'ckpt.params'
    m = tiny_model()
    cfg = trainer.TrainerConfig(max_epochs=5, max_steps=2, batch_size=4, ckpt_path=str(ckpt), show_progress=False)
    t = trainer.Trainer(m, toy_dataset(), None, cfg, device='cpu')
    t.train()
    assert t.step == 2
    state = torch.load(ckpt, weights_only=True, map_location='cpu')
    assert set(state) == set(m.state_dict())
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())


def test_progress_bar_shows_epoch_iteration_loss_lr(capfd):
    cfg = trainer.TrainerConfig(max_epochs=2, batch_size=4, learning_rate=1e-3, show_progress=True)
    trainer.Trainer(tiny_model(), toy_dataset(n=8), None, cfg, device='cpu').train()
    err = capfd.readouterr().err
    assert re.search(r'epoch 1 iter 1: train loss \d+\.\d+\. lr \d', err), err[-500:]
    assert re.search(r'epoch 2 iter 1: train loss \d+\.\d+\. lr 1\.0+e-03', err), err[-500:]


def test_held_out_loss_ends_each_epoch_and_leaves_the_run_alone(tmp_path):
    """With a test_dataset, each epoch ends with a test_loss line in the metrics file (the original's
    test pass); the pass draws no random numbers, so the trained params are those of a run without it."""
    def run(test_dataset, metrics_path):
        utils.set_seed(5)
        m = tiny_model(seed=5, pdrop=0.1)     # dropout on: the training's random stream matters
        cfg = trainer.TrainerConfig(max_epochs=3, batch_size=4, learning_rate=1e-2, show_progress=False,
                                    metrics_path=str(metrics_path))
        t = trainer.Trainer(m, toy_dataset(n=10), test_dataset, cfg, device='cpu')
        t.train()
        return t

    held_out = toy_dataset(n=6, seed=1)
    with_test = run(held_out, tmp_path / 'with.jsonl')
    without = run(None, tmp_path / 'without.jsonl')
    expected = without.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in with_test.model.state_dict().items())
    def read(path):  # the metrics lines without their timings
        return [{k: v for k, v in json.loads(line).items() if k not in ('tokens_per_s', 'wall_s')}
                for line in open(path)]
    rows = read(tmp_path / 'with.jsonl')
    test_rows = [r for r in rows if 'test_loss' in r]
    assert [(r['step'], r['epoch']) for r in test_rows] == [(3, 1), (6, 2), (9, 3)]  # 3 batches an epoch
    assert [r for r in rows if 'test_loss' not in r] == read(tmp_path / 'without.jsonl')
    assert rows.index(test_rows[0]) == 3 and len({r['test_loss'] for r in test_rows}) == 3
    x, y = held_out.tensors
    with_test.model.eval()
    with torch.no_grad():
        _, mean_loss = with_test.model(x, y)   # the mean over non-pad targets of the whole held-out set
    assert test_rows[-1]['test_loss'] == pytest.approx(float(mean_loss), rel=1e-5)


def test_resumed_metrics_keep_the_checkpoints_steps_only(tmp_path):
    """open_metrics on resume: lines up to the checkpoint's step stay; later ones go, and so does a
    held-out loss line of that very step, since the resumed run ends that epoch again."""
    path = tmp_path / 'm.jsonl'
    lines = [{'step': 1, 'loss': 3.0}, {'step': 2, 'loss': 2.5}, {'step': 2, 'epoch': 1, 'test_loss': 2.7},
             {'step': 3, 'loss': 2.0}]
    path.write_text(''.join(json.dumps(r) + '\n' for r in lines))
    checkpoint.open_metrics(str(path), resumed_step=2).close()
    assert [json.loads(line) for line in open(path)] == lines[:2]
    path.write_text(''.join(json.dumps(r) + '\n' for r in lines))
    checkpoint.open_metrics(str(path), resumed_step=3).close()
    assert [json.loads(line) for line in open(path)] == lines
    checkpoint.open_metrics(str(path)).close()
    assert path.read_text() == ''
