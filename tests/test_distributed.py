"""Data-parallel training under torchrun, on the CPU with gloo and two processes (src/distributed.py).

The launches are real: `python -m torch.distributed.run --standalone
--nproc_per_node 2 src/run.py ...` as a subprocess, with tiny models and one
thread per process. The unit tests at the end need no second process.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import batching
import checkpoint
import checks
import distributed
import model
import run
import steps
import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(ROOT, 'src', 'run.py')
WIKI = os.path.join(ROOT, 'wiki.txt')
TRAIN_TSV = os.path.join(ROOT, 'birth_places_train.tsv')
TINY = ['--n_layer', '1', '--n_head', '2', '--n_embd', '16', '--batch_size', '8', '--device', 'cpu', '--quiet']
# Batches of 3: shares of 1 and 2 examples, so the ranks run different numbers of pieces (chunks) per step.
# The rate set before each step (as the laptop recipe sets it) must count the global batch's tokens too.
FINETUNE = ['finetune', 'vanilla', WIKI, '--finetune_corpus_path', TRAIN_TSV, '--dropout', '0', '--max_steps', '4',
            '--batch_size', '3', '--first_step_lr', 'scheduled']
TIMEOUT = 120

pytestmark = pytest.mark.usefixtures('single_thread')  # conftest: tiny models, one thread


def child_env():
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR',
                                                            'MASTER_PORT', 'LOCAL_WORLD_SIZE')}
    env['OMP_NUM_THREADS'] = '1'
    return env


def torchrun_command(argv, nproc=2):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc),
            RUN_PY] + [str(a) for a in argv]


def torchrun(argv, cwd, nproc=2):
    """Run src/run.py under torchrun with `nproc` processes; the CompletedProcess (text)."""
    return subprocess.run(torchrun_command(argv, nproc), cwd=cwd, env=child_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)


def one_process(argv, cwd):
    return subprocess.run([sys.executable, RUN_PY] + [str(a) for a in argv], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)


def metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def two_process_finetune(tmp_path_factory):
    """A 4-step finetune (no dropout, batches of 3) by two processes, in a folder of its own.

    Returns (folder, CompletedProcess).
    """
    folder = tmp_path_factory.mktemp('two')
    result = torchrun(TINY + FINETUNE + ['--writing_params_path', 'two.params'], folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, result


def test_two_processes_train_the_params_of_one(two_process_finetune, tmp_path):
    folder, _ = two_process_finetune
    result = one_process(TINY + FINETUNE + ['--writing_params_path', 'one.params'], tmp_path)
    assert result.returncode == 0, result.stderr
    one, two = load(tmp_path / 'one.params'), load(folder / 'two.params')
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], rtol=1e-5, atol=1e-6), key
    # the same global batches: the schedule's tokens equal, the losses those of one process within fp32 rounding
    m1, m2 = metrics(tmp_path / 'one.params.metrics.jsonl'), metrics(folder / 'two.params.metrics.jsonl')
    assert [(r['step'], r['tokens'], r['lr']) for r in m1] == [(r['step'], r['tokens'], r['lr']) for r in m2]
    assert [r['loss'] for r in m1] == pytest.approx([r['loss'] for r in m2], rel=1e-6)


def test_only_rank_0_writes(two_process_finetune):
    folder, result = two_process_finetune
    assert sorted(os.listdir(folder)) == ['two.params', 'two.params.metrics.jsonl']  # no checkpoint left either
    assert [r['step'] for r in metrics(folder / 'two.params.metrics.jsonl')] == [1, 2, 3, 4]
    assert result.stdout.count('finetune vanilla: ') == 1 and 'processes=2' in result.stdout
    assert result.stdout.count('Params written to two.params') == 1


def test_evaluation_under_torchrun_writes_the_predictions_of_one_process(two_process_finetune, tmp_path):
    folder, _ = two_process_finetune
    with open(os.path.join(ROOT, 'birth_dev.tsv'), encoding='utf-8') as f:
        (tmp_path / 'dev.tsv').write_text(''.join(f.readlines()[:12]), encoding='utf-8')
    argv = ['evaluate', 'vanilla', WIKI, '--reading_params_path', folder / 'two.params',
            '--eval_corpus_path', 'dev.tsv'] + TINY
    two = torchrun(argv + ['--outputs_path', 'two.predictions'], tmp_path)
    one = one_process(argv + ['--outputs_path', 'one.predictions'], tmp_path)
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-3000:] + one.stderr
    assert (tmp_path / 'two.predictions').read_text() == (tmp_path / 'one.predictions').read_text()
    assert two.stdout.count('Correct: ') == 1


def test_interrupted_two_process_run_resumes_to_the_params_of_an_uninterrupted_one(tmp_path):
    """Pretraining with dropout: span corruption and dropout differ per rank, and the checkpoint restores both."""
    common = ['pretrain', 'vanilla', WIKI, '--checkpoint_minutes', '0', '--dropout', '0.1'] + TINY
    run_argv = common + ['--writing_params_path', 'run.params']
    process = subprocess.Popen(torchrun_command(run_argv + ['--max_steps', '1000']), cwd=tmp_path, env=child_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics_path = tmp_path / 'run.params.metrics.jsonl'
    deadline = time.time() + TIMEOUT
    while not (metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)  # torchrun passes it on to both processes
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode != 0
    assert stderr.count('Interrupted (SIGINT) at step') == 1, stderr[-3000:]
    assert 'Resume with: torchrun --standalone --nproc_per_node 2' in stderr
    saved = checkpoint.load(tmp_path / 'run.params.ckpt')
    stopped_at = saved['step']
    assert len(saved['rank_states']) == 2 and stopped_at < 12
    assert not (tmp_path / 'run.params').exists()

    resumed = torchrun(run_argv + ['--max_steps', '12', '--resume'], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'Resuming from run.params.ckpt: epoch 1, step {stopped_at}' in resumed.stdout
    assert not (tmp_path / 'run.params.ckpt').exists()
    reference = torchrun(common + ['--writing_params_path', 'ref.params', '--max_steps', '12'], tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    a, b = load(tmp_path / 'run.params'), load(tmp_path / 'ref.params')
    assert all(torch.equal(a[k], b[k]) for k in a)  # gloo's sum of two is exact: no tolerance needed
    strip = [{k: v for k, v in r.items() if k not in ('tokens_per_s', 'wall_s')} for r in metrics(metrics_path)]
    reference_metrics = [{k: v for k, v in r.items() if k not in ('tokens_per_s', 'wall_s')}
                         for r in metrics(tmp_path / 'ref.params.metrics.jsonl')]
    assert strip == reference_metrics


def test_bad_input_ends_every_rank_with_its_one_line_error(tmp_path):
    result = torchrun(FINETUNE[:3] + ['--finetune_corpus_path', 'missing.tsv', '--writing_params_path', 'x.params']
                      + TINY, tmp_path)
    assert result.returncode != 0
    message = 'error: --finetune_corpus_path missing.tsv: no such file; check the path'
    lines = result.stderr.splitlines()
    assert f'run.py: {message}' in lines
    # rank 1 prints its own line, unless rank 0 exited first and torchrun stopped it (SIGTERM) before it got there
    assert f'run.py (rank 1): {message}' in lines or 'closing signal SIGTERM' in result.stderr, result.stderr[-2000:]
    assert os.listdir(tmp_path) == []  # and no rank hung: torchrun() would have timed out


# --- no second process needed ---------------------------------------------------------

def test_shares_of_a_batch_are_contiguous_and_cover_it():
    for n in range(0, 12):
        for world in (1, 2, 3, 4):
            batch = list(range(100, 100 + n))
            shares = [batching.share(batch, r, world) for r in range(world)]
            assert sum(shares, []) == batch
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_the_shares_of_every_rank_make_the_one_process_batches(name_dataset):
    """NameDataset items are fixed, so the ranks' examples, put together, are exactly one process's batches."""
    def batches(rank, world):
        generator = torch.Generator().manual_seed(5)
        return list(batching.epoch_batches(name_dataset, 48, generator, torch.device('cpu'), chunks=1, trim=False,
                                           rank=rank, world_size=world))
    whole = batches(0, 1)
    parts = [batches(r, 3) for r in range(3)]
    assert len(whole) == len(parts[0]) == len(parts[2]) == 42
    for b, ((x, y), tokens) in enumerate((pieces[0], tokens) for pieces, tokens in whole):
        shares = [parts[r][b][0][0] for r in range(3)]
        assert torch.equal(torch.cat([sx for sx, _ in shares]), x)
        assert torch.equal(torch.cat([sy for _, sy in shares]), y)
        assert sum(parts[r][b][1] for r in range(3)) == tokens


def test_an_empty_share_is_one_pad_row_of_no_loss():
    pieces, tokens = batching.pieces_of(batching.collate_share([]), torch.device('cpu'), chunks=4, trim=True)
    assert tokens == 0 and len(pieces) == 1 and pieces[0][1].tolist() == [[0]]


def test_a_data_parallel_step_sums_over_processes_once_and_its_losses_once_per_flush(monkeypatch, name_dataset):
    """The counts (targets, schedule tokens) go in one all-reduce per step; the losses wait for the flush's one."""
    calls = []

    def fake_all_sum(values, device):  # as if the other process held the same share
        calls.append(list(values))
        return [2 * v for v in values]

    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setattr(distributed, 'all_sum', fake_all_sum)
    torch.manual_seed(0)
    gpt = model.GPT(model.GPTConfig(256, 128, n_layer=1, n_head=2, n_embd=16))
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=1e-3)
    step = steps.EagerStep(gpt, gpt, optimizer, 1.0, None, torch.device('cpu'), check=lambda what, value: None)
    x, y = (torch.stack(t) for t in zip(*[name_dataset[i] for i in range(6)]))
    pieces = [(x[:3], y[:3]), (x[3:], y[3:])]
    shares = []
    for _ in range(3):
        assert step.count(pieces, 6 * 127) == 2 * 6 * 127  # the global batch's tokens
        shares.append(step.run(pieces))
    n_targets = int((y != 0).sum())
    assert calls == [[n_targets, 6 * 127]] * 3  # one sum per step, before it
    assert all(isinstance(share, steps.Share) and share.n_targets == 2 * n_targets for share in shares)
    losses = step.resolve(shares)
    assert calls[3:] == [[share.total for share in shares]]  # one sum for all three losses
    assert losses == [2 * share.total / (2 * n_targets) for share in shares]


def test_a_checkpoint_of_two_processes_gives_each_rank_its_random_states():
    saved = {'step': 3, 'rng': 'rank 0', 'epoch_start_rng': 'start 0',
             'rank_states': [{'rng': 'rank 0', 'epoch_start_rng': 'start 0'},
                             {'rng': 'rank 1', 'epoch_start_rng': 'start 1'}]}
    state = checkpoint.TrainingState.from_checkpoint(saved, rank=1)
    assert (state.step, state.rng, state.epoch_start_rng) == (3, 'rank 1', 'start 1')
    assert checkpoint.TrainingState.from_checkpoint(saved).rng == 'rank 0'


def test_resume_refuses_a_checkpoint_of_another_process_count(tmp_path, monkeypatch):
    args = run.parse_args(['pretrain', 'vanilla', WIKI, '--writing_params_path', str(tmp_path / 'p.params'),
                           '--resume'])
    monkeypatch.setattr(checks, 'read_checkpoint', lambda path, info: ({'rank_states': [{}, {}]}, []))
    with pytest.raises(checks.BadInput, match='written by 2 process'):
        training.resume_checkpoint(args, info=None)
    monkeypatch.setenv('WORLD_SIZE', '2')
    assert training.resume_checkpoint(args, info=None) == {'rank_states': [{}, {}]}
    monkeypatch.setenv('WORLD_SIZE', '3')
    with pytest.raises(checks.BadInput, match='this run has 3'):
        training.resume_checkpoint(args, info=None)


def test_only_ranks_other_than_0_wait_for_rank_0_to_exit(monkeypatch):
    waits = []
    monkeypatch.setattr(distributed.time, 'sleep', waits.append)
    distributed.let_main_exit_first(7)  # one process
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '0')
    distributed.let_main_exit_first(7)
    assert waits == []
    monkeypatch.setenv('RANK', '1')
    distributed.let_main_exit_first(7)
    assert waits == [7]
