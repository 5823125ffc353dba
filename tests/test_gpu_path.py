"""src/gpu_path.py: span corruption on tensors, epochs on the device, the fixed-shape (and CUDA-graph) step.

Each fast piece is held to the reference: `corrupt` gives CharCorruptionDataset's
exact strings for the same draws and `draw` draws from its distribution; the
fixed step trains to the params of the trainer's own step. The CUDA-graph
tests run only where CUDA is present (bench/gpu_check.sh runs them there).
"""
import json
import os
import random
import subprocess
import statistics

import pytest
import torch

import batching
import checkpoint
import dataset
import gpu_path
import model
import optim
import trainer
import utils
from conftest import ROOT, MASK_CHAR, PAD_CHAR, small_config, synthetic_corpus

pytestmark = pytest.mark.usefixtures('single_thread')
CPU = torch.device('cpu')
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def dataset_with_draws(ds, indices, seed=0):
    """CharCorruptionDataset items, each with the (truncation, masked length, start) its randint calls drew."""
    rng = random.Random(seed)
    items, draws = [], []
    original = random.randint
    calls = []

    def recording(a, b):
        calls.append(rng.randint(a, b))
        return calls[-1]

    random.randint = recording
    try:
        for i in indices:
            calls.clear()
            items.append(ds[i])
            kept = len(ds.data[i][:calls[0]])
            masked = min(calls[1], kept) if kept else 0  # an empty document draws no masked length
            draws.append((calls[0], masked, calls[-1]))
    finally:
        random.randint = original
    return items, draws


@pytest.mark.parametrize('block_size', [128, 16, 8])
@pytest.mark.parametrize('corpus', ['wiki', 'synthetic'])
def test_corrupt_gives_the_datasets_strings_for_its_draws(wiki_text, corpus, block_size):
    text = wiki_text if corpus == 'wiki' else synthetic_corpus()[0]
    ds = dataset.CharCorruptionDataset(text, block_size)
    indices = list(range(min(len(ds), 400)))
    items, draws = dataset_with_draws(ds, indices)
    corruption = gpu_path.DeviceCorruption(ds, CPU)
    truncation, masked, start = (torch.tensor(c) for c in zip(*draws))
    x, y = corruption.examples(torch.tensor(indices), truncation, masked, start)
    assert torch.equal(x, torch.stack([a for a, _ in items]))
    assert torch.equal(y, torch.stack([b for _, b in items]))


def test_draws_follow_the_datasets_distribution(char_dataset):
    """Truncation, masked length and start of the dataset's randint calls and of gpu_path.draw, over many draws."""
    n = 12000
    indices = [i % len(char_dataset) for i in range(n)]
    _, reference = dataset_with_draws(char_dataset, indices, seed=1)
    corruption = gpu_path.DeviceCorruption(char_dataset, CPU)
    ours = list(zip(*(t.tolist() for t in corruption.draw(torch.tensor(indices), torch.Generator().manual_seed(1)))))
    lengths = [len(char_dataset.data[i]) for i in indices]
    max_kept = int(128 * 7 / 8)

    def stats(draws):
        kept = [min(t, n) for (t, _, _), n in zip(draws, lengths)]
        masked = [m for _, m, _ in draws]
        ratio = [m / k for m, k in zip(masked, kept)]
        place = [s / (k - m) for (_, m, s), k in zip(draws, kept) if k > m]
        return dict(truncations={t for t, _, _ in draws}, kept_mean=statistics.fmean(kept),
                    ratio_mean=statistics.fmean(ratio), ratio_sd=statistics.pstdev(ratio),
                    masked_mean=statistics.fmean(masked), masked_sd=statistics.pstdev(masked),
                    place_mean=statistics.fmean(place), place_sd=statistics.pstdev(place),
                    in_range=all(1 <= m <= max(1, round(k / 2) - 1) and 0 <= s <= k - m
                                 for (_, m, s), k in zip(draws, kept)))

    a, b = stats(reference), stats(ours)
    assert a['truncations'] == b['truncations'] == set(range(4, max_kept + 1))   # every length possible
    assert a['in_range'] and b['in_range']
    assert b['kept_mean'] == pytest.approx(a['kept_mean'], rel=0.03)
    assert a['ratio_mean'] == pytest.approx(0.25, abs=0.02) and b['ratio_mean'] == pytest.approx(0.25, abs=0.02)
    assert b['masked_mean'] == pytest.approx(a['masked_mean'], rel=0.04)
    assert b['masked_sd'] == pytest.approx(a['masked_sd'], rel=0.06) and b['masked_sd'] > 3  # it varies
    assert b['ratio_sd'] == pytest.approx(a['ratio_sd'], rel=0.06)
    assert b['place_mean'] == pytest.approx(0.5, abs=0.02) and a['place_mean'] == pytest.approx(0.5, abs=0.02)
    assert b['place_sd'] == pytest.approx(a['place_sd'], rel=0.06)   # uniform start: sd 1/sqrt(12)


def test_device_epoch_examples_have_the_specs_properties(char_dataset):
    epochs = gpu_path.DeviceEpochs(char_dataset, CPU)
    order = torch.randperm(len(char_dataset), generator=torch.Generator().manual_seed(3))
    x, y = epochs.epoch(order, torch.Generator().manual_seed(4))
    assert x.shape == y.shape == (len(char_dataset), 127) and x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:])
    mask, pad = char_dataset.stoi[MASK_CHAR], char_dataset.stoi[PAD_CHAR]
    for row, i in zip(range(0, len(order), 7), order[::7].tolist()):
        s = ''.join(char_dataset.itos[int(t)] for t in torch.cat([x[row], y[row, -1:]]))
        body = s.rstrip(PAD_CHAR)
        assert PAD_CHAR not in body and body.count(MASK_CHAR) == 2
        prefix, suffix, masked = body.split(MASK_CHAR)
        kept = prefix + masked + suffix
        assert char_dataset.data[i].startswith(kept) and 4 <= len(kept) <= 112 or kept == char_dataset.data[i]
    assert int((x == mask).sum(1).max()) <= 2 and int((x[:, 0] == pad).sum()) == 0


def test_epoch_batches_use_every_example_once_trim_like_the_loader_and_replay_from_skip(name_dataset):
    epochs = gpu_path.DeviceEpochs(name_dataset, CPU)
    state = torch.Generator().manual_seed(5).get_state()
    generator = torch.Generator()
    generator.set_state(state)
    whole = list(gpu_path.epoch_batches(epochs, len(name_dataset), 300, generator, trim=False))
    rows = [tuple(r) for (pieces, _) in whole for x, _ in pieces for r in x.tolist()]
    assert sorted(rows) == sorted(tuple(name_dataset[i][0].tolist()) for i in range(len(name_dataset)))
    generator.set_state(state)
    batches = list(gpu_path.epoch_batches(epochs, len(name_dataset), 300, generator))
    for (pieces, tokens), (full, _) in zip(batches, whole):
        (x, y), = pieces
        assert tokens == full[0][0].numel()
        (xt, yt), = batching.split_batch(*full[0], 1, True)   # the loader path's trimming
        assert torch.equal(x, xt) and torch.equal(y, yt)
    generator.set_state(state)
    tail = list(gpu_path.epoch_batches(epochs, len(name_dataset), 300, generator, skip=4))
    assert len(tail) == len(batches) - 4
    for (a, _), (b, _) in zip(batches[4:], tail):
        assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1], b[0][1])


def test_tensor_learning_rate_trains_like_a_float_one():
    params = {}
    for tensor_lr in (False, True):
        m = model.GPT(small_config(False))
        torch.manual_seed(0)
        m.load_state_dict(model.GPT(small_config(False)).state_dict())
        opt = optim.make_optimizer(m, trainer.TrainerConfig(learning_rate=1e-2), CPU)
        if tensor_lr:
            gpu_path.use_tensor_lr(opt, CPU, capturable=False)
        for step in range(3):
            gpu_path.set_lr(opt, 1e-2 * (step + 1))
            m.zero_grad()
            x = torch.randint(1, 50, (4, 16), generator=torch.Generator().manual_seed(step))
            m(x, x)[1].backward()
            opt.step()
        params[tensor_lr] = m.state_dict()
    for k in params[False]:
        torch.testing.assert_close(params[True][k], params[False][k], rtol=1e-6, atol=1e-7)


def train_run(ds, tmp_path, name, device=CPU, **settings):
    utils.set_seed(0)
    m = model.GPT(small_config(False, block_size=128, n_embd=32, n_head=4, n_layer=2, vocab_size=256))
    config = trainer.TrainerConfig(max_epochs=2, batch_size=48, learning_rate=6e-3, lr_decay=True,
                                   warmup_tokens=512 * 20, final_tokens=200 * 300 * 128, show_progress=False,
                                   metrics_path=str(tmp_path / f'{name}.jsonl'), **settings)
    trainer.Trainer(m, ds, None, config, device=device).train()
    with open(tmp_path / f'{name}.jsonl') as f:
        rows = [json.loads(line) for line in f]
    return m.state_dict(), rows


@pytest.mark.parametrize('train_step', ['fixed', 'graph'])
def test_fixed_step_trains_to_the_params_of_the_default_step(char_dataset, tmp_path, train_step):
    """Same examples (the loader path, Python's random), padded whole batches, the loss synced once an epoch:
    the params, losses and learning rates of the default step. 'graph' off CUDA runs as 'fixed'."""
    ds = torch.utils.data.Subset(char_dataset, range(100))   # 3 batches an epoch, the last of 4 rows
    reference, ref_rows = train_run(ds, tmp_path, 'reference')
    fast, rows = train_run(ds, tmp_path, 'fast', train_step=train_step)
    assert [r['step'] for r in rows] == [r['step'] for r in ref_rows] == list(range(1, 7))
    for a, b in zip(rows, ref_rows):
        assert a['loss'] == pytest.approx(b['loss'], rel=1e-5) and a['lr'] == b['lr'] and a['tokens'] == b['tokens']
    for k in reference:
        torch.testing.assert_close(fast[k], reference[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f'{k}: {m}')


def small_corpus(char_dataset, n=100):
    return dataset.CharCorruptionDataset('\n'.join(char_dataset.data[:n]) + '\n', 128)


def test_device_data_path_trains_and_resumes_exactly(char_dataset, tmp_path):
    """data_path 'device' with the fixed step: every step logged; a run stopped and resumed ends as one that was not."""
    ds = small_corpus(char_dataset)
    whole, rows = train_run(ds, tmp_path, 'whole', data_path='device', train_step='fixed')
    assert [r['step'] for r in rows] == list(range(1, 7)) and all(r['loss'] > 0 for r in rows)

    ckpt = tmp_path / 'run.ckpt'
    train_run(ds, tmp_path, 'part', data_path='device', train_step='fixed', max_steps=4,
              checkpoint_path=str(ckpt), checkpoint_minutes=0)
    utils.set_seed(0)
    m = model.GPT(small_config(False, block_size=128, n_embd=32, n_head=4, n_layer=2, vocab_size=256))
    config = trainer.TrainerConfig(max_epochs=2, batch_size=48, learning_rate=6e-3, lr_decay=True,
                                   warmup_tokens=512 * 20, final_tokens=200 * 300 * 128, show_progress=False,
                                   data_path='device', train_step='fixed')
    t = trainer.Trainer(m, ds, None, config, device=CPU)
    t.resume(checkpoint.load(str(ckpt)))
    assert t.step == 3
    t.train()
    for k in whole:
        torch.testing.assert_close(m.state_dict()[k], whole[k], rtol=0, atol=0)


@needs_cuda
@pytest.mark.parametrize('synthesizer', [False, True])
def test_cuda_graph_step_trains_like_the_eager_fixed_step(char_dataset, synthesizer):
    """On a GPU: the captured step's params equal the eager one's (no dropout), and dropout differs per replay."""
    cuda = torch.device('cuda')
    results = {}
    for step in ('fixed', 'graph'):
        utils.set_seed(0)
        m = model.GPT(small_config(synthesizer, block_size=128, n_embd=64, n_head=4, n_layer=2, vocab_size=256))
        config = trainer.TrainerConfig(max_epochs=3, batch_size=32, learning_rate=6e-3, lr_decay=True,
                                       warmup_tokens=512 * 20, final_tokens=200 * 300 * 128, show_progress=False,
                                       data_path='device', train_step=step, precision='fp32')
        t = trainer.Trainer(m, small_corpus(char_dataset), None, config, device=cuda)
        t.train()
        results[step] = {k: v.float().cpu() for k, v in m.state_dict().items()}
        if step == 'graph':
            assert t.train_step.graph is not None
    for k in results['fixed']:
        torch.testing.assert_close(results['graph'][k], results['fixed'][k], rtol=1e-3, atol=1e-4)


@needs_cuda
def test_cuda_graph_replays_draw_fresh_dropout(char_dataset):
    cuda = torch.device('cuda')
    utils.set_seed(0)
    m = model.GPT(small_config(False, block_size=128, n_embd=64, n_head=4, n_layer=2, vocab_size=256,
                               pdrop=0.1)).to(cuda)
    opt = optim.make_optimizer(m, trainer.TrainerConfig(learning_rate=0.0), cuda)
    gpu_path.use_tensor_lr(opt, cuda, capturable=True)
    step = gpu_path.FixedShapeStep(m, m, opt, 1.0, torch.bfloat16, 16, 127, cuda, graph=True)
    x, y = (t.to(cuda) for t in gpu_path.DeviceEpochs(char_dataset, cuda).epoch(torch.arange(16),
                                                                                 torch.Generator().manual_seed(0)))
    losses = [float(step(x, y)) for _ in range(gpu_path.GRAPH_WARMUP_STEPS + 3)]
    assert step.graph is not None
    assert len(set(losses[-3:])) == 3, losses   # lr 0: only dropout changes the loss


def test_run_py_accepts_the_gpu_path_flags(tmp_path):
    params = tmp_path / 'p.params'
    result = subprocess.run(
        [os.sys.executable, 'src/run.py', 'pretrain', 'vanilla', 'wiki.txt', '--writing_params_path', str(params),
         '--data_path', 'device', '--train_step', 'graph', '--n_layer', '1', '--n_embd', '32', '--n_head', '4',
         '--batch_size', '8', '--max_steps', '3', '--device', 'cpu', '--quiet'],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'data_path=device' in result.stdout and 'train_step=graph' in result.stdout
    with open(str(params) + '.metrics.jsonl') as f:
        assert [json.loads(line)['step'] for line in f] == [1, 2, 3]


def test_gpu_check_script_is_ready_to_run():
    path = os.path.join(ROOT, 'bench', 'gpu_check.sh')
    assert os.access(path, os.X_OK)
    assert subprocess.run(['bash', '-n', path]).returncode == 0
    with open(path) as f:
        header = f.read(2000)
    assert 'bash bench/gpu_check.sh' in header
