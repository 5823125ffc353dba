"""GPU settings that must be right before a GPU is there to show them wrong.

- Under torchrun each process picks its own GPU (cuda:LOCAL_RANK) before
  anything touches CUDA; touching `cuda` first opens a context on GPU 0 in
  every process.
- --compile with --train_step graph is refused (one line, exit 2; the
  trainer refuses it too).
- With several processes the model is wrapped in DDP first, then compiled,
  and DDP's no_sync still applies through the compiled wrapper.
"""
import os

import pytest
import torch

import checks
import dataset
import distributed
import model
import run
import trainer
from conftest import ROOT

pytestmark = pytest.mark.usefixtures('single_thread')
WIKI = os.path.join(ROOT, 'wiki.txt')


@pytest.fixture
def two_processes_rank_1(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setenv('LOCAL_RANK', '1')


@pytest.mark.parametrize('name', [None, 'cuda', 'cuda:0'])
def test_each_rank_picks_its_gpu_before_touching_cuda(monkeypatch, two_processes_rank_1, name):
    calls = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda device: calls.append(('set_device', str(device))))
    monkeypatch.setattr(torch, 'empty', lambda *a, device=None, **k: calls.append(('touch', str(device))))
    device = checks.check_device(name)
    assert device == torch.device('cuda', 1)
    assert calls[0] == ('set_device', 'cuda:1')    # the rank's GPU is current before any CUDA call
    assert ('touch', 'cuda:1') in calls and all(c[1] == 'cuda:1' for c in calls)
    assert distributed.rank_device(device) == torch.device('cuda', 1)


def test_one_process_and_cpus_keep_their_device(monkeypatch, two_processes_rank_1):
    assert checks.check_device('cpu') == torch.device('cpu')
    monkeypatch.setenv('WORLD_SIZE', '1')
    calls = []
    monkeypatch.setattr(torch.cuda, 'set_device', lambda device: calls.append(device))
    assert distributed.rank_device(torch.device('cuda')) == torch.device('cuda') and calls == []


def test_compile_with_graph_is_a_one_line_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run.main(['pretrain', 'vanilla', WIKI, '--writing_params_path', str(tmp_path / 'x.params'),
                  '--train_step', 'graph', '--compile', '--quiet'])
    err = capsys.readouterr().err
    assert info.value.code == 2 and 'Traceback' not in err
    lines = err.strip().split('\n')
    assert len(lines) == 1 and lines[0].startswith('run.py: error: --compile and --train_step graph')
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope='module')
def names():
    with open(WIKI, encoding='utf-8') as f:
        corpus = dataset.CharCorruptionDataset(f.read(), run.BLOCK_SIZE)
    return dataset.NameDataset(corpus, 'Where was A born?\tParis\n'), corpus.vocab_size


def tiny_trainer(names, **settings):
    data, vocab_size = names
    gpt = model.GPT(model.GPTConfig(vocab_size, run.BLOCK_SIZE, n_layer=1, n_head=2, n_embd=16))
    config = trainer.TrainerConfig(max_epochs=1, batch_size=1, show_progress=False, **settings)
    return trainer.Trainer(gpt, data, None, config, device='cpu'), gpt


def test_trainer_refuses_compile_with_graph(names, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, 'compile', lambda m, **k: compiled.append(m) or m)
    t, _ = tiny_trainer(names, compile=True, train_step='graph')
    with pytest.raises(ValueError, match="compile and train_step 'graph' do not go together"):
        t.train()
    assert t.state.step == 0
    compiled.clear()
    t, _ = tiny_trainer(names, compile=True, train_step='fixed')
    t.train()
    assert len(compiled) == 1 and t.state.step == 1   # fixed with compile is allowed


class Wrapped(torch.nn.Module):
    def __init__(self, module, how):
        super().__init__()
        self.inner, self.how = module, how

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_ddp_wraps_the_model_first_then_compile(names, monkeypatch):
    monkeypatch.setattr(distributed, 'wrap', lambda m, device: Wrapped(m, 'ddp'))
    monkeypatch.setattr(torch, 'compile', lambda m, **k: Wrapped(m, 'compiled'))
    t, gpt = tiny_trainer(names, compile=True)
    t.prepare()
    assert t.forward.how == 'compiled' and t.forward.inner.how == 'ddp' and t.forward.inner.inner is gpt


def test_no_sync_sees_through_the_compiled_wrapper(monkeypatch):
    """DDP's no_sync on torch.compile's wrapper of a DDP module (it keeps the module as _orig_mod)."""
    entered = []

    class FakeDDP(distributed.DistributedDataParallel):
        def __init__(self):
            torch.nn.Module.__init__(self)

        def no_sync(self):
            entered.append(True)
            return torch.no_grad()

    ddp = FakeDDP()
    compiled = torch.nn.Module()
    compiled._orig_mod = ddp
    with distributed.no_sync(compiled, skip=True):
        pass
    assert entered == [True]
    with distributed.no_sync(compiled, skip=False):
        pass
    assert entered == [True]
