"""Reproducible runs, and interrupted runs that resume to exactly the parameters of uninterrupted ones (CPU).

Interruptions are real signals: an on_batch_end callback sends SIGINT (or
SIGTERM) to this process at a chosen step, or a subprocess gets one from here.
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import dataset
import model
import run
import trainer
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, 'src')  # on sys.path through conftest

WIKI = os.path.join(ROOT, 'wiki.txt')
TRAIN_TSV = os.path.join(ROOT, 'birth_places_train.tsv')
TINY_MODEL = ['--n_layer', '1', '--n_head', '2', '--n_embd', '16', '--batch_size', '8', '--quiet']


pytestmark = pytest.mark.usefixtures('single_thread')  # conftest: tiny models, one thread


@pytest.fixture(autouse=True)
def signals_delivered():
    """A shell runs background jobs with SIGINT ignored, and run.py then leaves it ignored
    (as under nohup); these tests need it delivered, as in a terminal."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def default_signals():
    """Popen preexec_fn: the child starts with SIGINT at its default, as from a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def call(argv):
    """run.main(argv) in this process: its exit status."""
    try:
        run.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def same_params(path_a, path_b):
    a, b = torch.load(path_a, map_location='cpu'), torch.load(path_b, map_location='cpu')
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metrics(path):
    """The metrics lines without their timings."""
    with open(path) as f:
        records = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in ('tokens_per_s', 'wall_s')} for r in records]


def signal_at(step, signum=signal.SIGINT, times=1):
    """A callback that sends `signum` to this process `times` times once `step` is done."""
    def hook(t):
        if t.step == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)
    return hook


@pytest.fixture
def corpus(tmp_path):
    """20 wiki documents: an epoch is 3 batches of 8, 8 and 4."""
    with open(WIKI, encoding='utf-8') as f:
        lines = f.read().split('\n')[:20]
    path = tmp_path / 'corpus.txt'
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return str(path)


@pytest.fixture
def hook(monkeypatch):
    """set(h) makes h an on_batch_end callback of the Trainers of this test's runs; set(None) removes it."""
    original = trainer.Trainer.__init__

    def install(h):
        def init(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if h is not None:
                self.add_callback('on_batch_end', h)
        monkeypatch.setattr(trainer.Trainer, '__init__', init)
    return install


def pretrain_argv(corpus, params_path, epochs=3):
    return ['pretrain', 'vanilla', corpus, '--writing_params_path', params_path, '--max_epochs', epochs] + TINY_MODEL


def check_resume_message(err, argv, step):
    """The Ctrl-C message names the step and the exact command: this run's arguments plus --resume."""
    assert 'Traceback' not in err
    line = [x for x in err.split('\n') if x.startswith('Interrupted')][-1]
    assert f'at step {step};' in line
    command = shlex.split(line.split('Resume with: ')[1])
    python = command[0]
    assert python == sys.executable or os.path.abspath(shutil.which(python)) == sys.executable
    assert os.path.abspath(command[1]) == os.path.join(SRC, 'run.py')
    assert command[2:] == [str(a) for a in argv] + ['--resume']


# --- reproducibility -----------------------------------------------------------------

def test_same_seed_same_params_and_fresh_runs_rewrite_metrics(tmp_path, corpus):
    path = tmp_path / 'a.params'
    argv = pretrain_argv(corpus, path, epochs=2)
    assert call(argv) == 0
    first = tmp_path / 'first.params'
    shutil.copy(path, first)
    assert call(argv) == 0
    assert same_params(first, path)
    assert [r['step'] for r in metrics(str(path) + '.metrics.jsonl')] == [1, 2, 3, 4, 5, 6]
    other = tmp_path / 'b.params'
    assert call(pretrain_argv(corpus, other, epochs=2) + ['--seed', '1']) == 0
    assert not same_params(first, other)


# --- resume after Ctrl-C, SIGTERM or a crash ------------------------------------------------

@pytest.mark.parametrize('batching', [[], ['--batching', 'stratified', '--chunks', '2'], ['--optimizer', 'muon']])
def test_pretrain_interrupted_mid_epoch_resumes_identically(tmp_path, corpus, hook, capsys, batching):
    full = tmp_path / 'full.params'
    assert call(pretrain_argv(corpus, full) + batching) == 0
    part = tmp_path / 'part.params'
    argv = pretrain_argv(corpus, part) + batching
    hook(signal_at(4))  # mid-way through epoch 2
    assert call(argv) == 130
    out, err = capsys.readouterr()
    check_resume_message(err, argv, 4)
    assert 'SIGINT: stopping after this step' in err
    assert os.path.exists(str(part) + '.ckpt') and not os.path.exists(part)
    hook(None)
    assert call(argv + ['--resume']) == 0
    out, err = capsys.readouterr()
    assert 'Resuming from' in out and 'epoch 2, step 4' in out and err == ''
    assert same_params(full, part)
    assert metrics(str(part) + '.metrics.jsonl') == metrics(str(full) + '.metrics.jsonl')
    assert sorted(os.listdir(tmp_path)) == ['corpus.txt', 'full.params', 'full.params.metrics.jsonl',
                                            'part.params', 'part.params.metrics.jsonl']


def test_finetune_interrupted_at_epoch_end_by_sigterm_resumes_identically(tmp_path, hook, capsys):
    with open(TRAIN_TSV, encoding='utf-8') as f:
        tsv = tmp_path / 'train.tsv'
        tsv.write_text(''.join(f.readlines()[:16]), encoding='utf-8')

    def argv(params_path):
        return ['finetune', 'synthesizer', WIKI, '--finetune_corpus_path', tsv, '--writing_params_path', params_path,
                '--max_epochs', 3, '--checkpoint_path', tmp_path / 'ft.ckpt'] + TINY_MODEL
    assert call(argv(tmp_path / 'full.params')) == 0
    hook(signal_at(2, signal.SIGTERM))  # the end of epoch 1
    assert call(argv(tmp_path / 'part.params')) == 128 + signal.SIGTERM
    out, err = capsys.readouterr()
    check_resume_message(err, argv(tmp_path / 'part.params'), 2)
    assert os.path.exists(tmp_path / 'ft.ckpt')
    hook(None)
    assert call(argv(tmp_path / 'part.params') + ['--resume']) == 0
    assert same_params(tmp_path / 'full.params', tmp_path / 'part.params')
    assert not os.path.exists(tmp_path / 'ft.ckpt')


def test_crash_resumes_from_the_last_periodic_checkpoint(tmp_path, corpus, hook, capsys):
    full = tmp_path / 'full.params'
    assert call(pretrain_argv(corpus, full)) == 0
    part = tmp_path / 'part.params'
    argv = pretrain_argv(corpus, part) + ['--checkpoint_minutes', 0]

    def crash(t):
        if t.step == 5:
            raise RuntimeError('simulated crash')
    hook(crash)
    with pytest.raises(RuntimeError, match='simulated crash'):
        run.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert 'The last training checkpoint is' in err and '--resume' in err
    assert [r['step'] for r in metrics(str(part) + '.metrics.jsonl')] == [1, 2, 3, 4, 5]
    assert torch.load(str(part) + '.ckpt', map_location='cpu')['step'] == 4
    hook(None)
    assert call(argv + ['--resume']) == 0
    assert same_params(full, part)
    assert metrics(str(part) + '.metrics.jsonl') == metrics(str(full) + '.metrics.jsonl')


def test_second_ctrl_c_quits_at_once(tmp_path, corpus, hook, capsys):
    part = tmp_path / 'part.params'
    hook(signal_at(2, times=2))
    assert call(pretrain_argv(corpus, part)) == 130
    out, err = capsys.readouterr()
    assert 'Traceback' not in err and 'Interrupted before any checkpoint was saved' in err
    assert sorted(os.listdir(tmp_path)) == ['corpus.txt', 'part.params.metrics.jsonl']


def test_resume_with_dataloader_workers(tmp_path, corpus):
    """Workers draw examples in sequence, so a resumed epoch replays its trained batches."""
    with open(corpus, encoding='utf-8') as f:
        data = dataset.CharCorruptionDataset(f.read(), 128)
    ckpt = str(tmp_path / 'w.ckpt')

    def trainer_for(on_batch_end=None):
        utils.set_seed(0)
        gpt = model.GPT(model.GPTConfig(data.vocab_size, 128, n_layer=1, n_head=2, n_embd=16))
        config = trainer.TrainerConfig(max_epochs=2, batch_size=8, learning_rate=6e-3, lr_decay=True,
                                       warmup_tokens=2000, final_tokens=20000, num_workers=2, show_progress=False,
                                       checkpoint_path=ckpt)
        t = trainer.Trainer(gpt, data, None, config, device='cpu')
        if on_batch_end is not None:
            t.add_callback('on_batch_end', on_batch_end)
        return t

    full = trainer_for()
    full.train()
    part = trainer_for(on_batch_end=lambda t: t.step == 2 and os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(checkpoint.TrainingInterrupted):
        part.train()
    resumed = trainer_for()
    resumed.resume(checkpoint.load(ckpt))
    resumed.train()
    assert resumed.step == full.step == 6
    expected = full.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.model.state_dict().items())


# --- what --resume refuses -------------------------------------------------------------------------

@pytest.fixture
def interrupted(tmp_path, corpus, hook, capsys):
    """An interrupted pretrain run: (its argv, its params path); the checkpoint is at params + '.ckpt'."""
    params = tmp_path / 'part.params'
    argv = pretrain_argv(corpus, params)
    hook(signal_at(2))
    assert call(argv) == 130
    hook(None)
    capsys.readouterr()
    return argv, params


def assert_refused(capsys, status, *words):
    out, err = capsys.readouterr()
    assert 'Traceback' not in err
    lines = err.strip().split('\n')
    assert len(lines) == 1 and lines[0].startswith('run.py: error: '), err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_fresh_run_does_not_clobber_a_checkpoint(interrupted, capsys):
    argv, params = interrupted
    before = open(str(params) + '.ckpt', 'rb').read()
    assert call(argv) == 2
    assert_refused(capsys, 2, 'a checkpoint of an interrupted run is at', 'add --resume', 'delete it')
    assert open(str(params) + '.ckpt', 'rb').read() == before


def test_resume_refuses_another_model(interrupted, capsys):
    argv, params = interrupted
    assert call(argv + ['--resume', '--n_embd', '32']) == 1
    assert_refused(capsys, 1, 'holds a model of other settings', 'n_embd 16 -> 32')


def test_resume_refuses_changed_data(interrupted, corpus, capsys):
    argv, params = interrupted
    with open(corpus, 'a', encoding='utf-8') as f:
        f.write('One more document.\n')
    assert call(argv + ['--resume']) == 1
    assert_refused(capsys, 1, 'was written for other training data')


def test_resume_refuses_another_function(interrupted, tmp_path, capsys):
    argv, params = interrupted
    with open(argv[2], encoding='utf-8') as f:
        text = f.readline()
    tsv = tmp_path / 't.tsv'
    tsv.write_text(f'{text[:12]}\t{text[12:18]}\n', encoding='utf-8')  # characters the vocabulary has
    assert call(['finetune', 'vanilla', argv[2], '--finetune_corpus_path', tsv, '--writing_params_path',
                 tmp_path / 'ft.params', '--checkpoint_path', str(params) + '.ckpt', '--resume'] + TINY_MODEL) == 1
    assert_refused(capsys, 1, 'belongs to a pretrain vanilla run, not finetune vanilla')


def test_resume_refuses_a_corrupt_checkpoint(interrupted, capsys):
    argv, params = interrupted
    data = open(str(params) + '.ckpt', 'rb').read()
    with open(str(params) + '.ckpt', 'wb') as f:
        f.write(data[:len(data) // 3])
    assert call(argv + ['--resume']) == 1
    assert_refused(capsys, 1, 'checkpoint', 'is not a params file or is corrupt')


def test_resume_with_more_epochs_warns_and_continues(interrupted, capsys):
    argv, params = interrupted
    assert call(argv + ['--resume', '--max_epochs', 4]) == 0
    out, err = capsys.readouterr()
    assert err.startswith('warning: resuming with training settings') and 'max_epochs 3 -> 4' in err
    assert [r['step'] for r in metrics(str(params) + '.metrics.jsonl')] == list(range(1, 13))


# --- a real Ctrl-C to a real process -----------------------------------------------------------------

def test_ctrl_c_on_a_subprocess_then_the_printed_command(tmp_path, corpus):
    env = dict(os.environ, OMP_NUM_THREADS='1')

    def argv(params_path):
        return [str(a) for a in pretrain_argv(corpus, params_path, epochs=40)]
    part = tmp_path / 'part.params'
    process = subprocess.Popen([sys.executable, 'src/run.py'] + argv(part), cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_signals)
    metrics_path = str(part) + '.metrics.jsonl'
    deadline = time.time() + 240
    while not (os.path.exists(metrics_path) and os.path.getsize(metrics_path) > 0):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 130, err
    assert 'Traceback' not in err
    line = [x for x in err.split('\n') if x.startswith('Interrupted (SIGINT)')][0]
    command = shlex.split(line.split('Resume with: ')[1])
    assert command[1] == 'src/run.py' and command[2:] == argv(part) + ['--resume']
    assert os.path.exists(str(part) + '.ckpt') and not os.path.exists(part)

    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert call(argv(tmp_path / 'full.params')) == 0  # one thread, as OMP_NUM_THREADS=1 gives the subprocesses
    assert same_params(tmp_path / 'full.params', part)
    assert not os.path.exists(str(part) + '.ckpt')
