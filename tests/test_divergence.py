"""A diverging run is caught before its update on every step kind, and leaves no NaN params or checkpoint.

The divergence is injected as a non-finite gradient with a finite loss: a
hook multiplies one parameter's gradient by a tensor that a callback sets to
NaN before the bad step (a device op, so a captured CUDA graph replays it).
The loss check cannot see it, only the gradient-norm check can. 'default'
checks on the host before its update; 'fixed' and 'graph' (which runs as
'fixed' off CUDA) check on the device, skip that update and every later one,
and stop at the next flush. With CUDA the same tests run on the GPU too, the
bad step a replayed one.
"""
import json
import os

import pytest
import torch

import checkpoint
import dataset
import model
import run
import trainer
import utils
from conftest import ROOT

pytestmark = pytest.mark.usefixtures('single_thread')
BAD_STEP = 6   # on a GPU, 'graph' captures at step 4 and replays from there
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                              reason='needs a CUDA GPU'))]


@pytest.fixture(scope='module')
def data():
    with open(os.path.join(ROOT, 'wiki.txt'), encoding='utf-8') as f:
        corpus = dataset.CharCorruptionDataset(f.read(), run.BLOCK_SIZE)
    with open(os.path.join(ROOT, 'birth_places_train.tsv'), encoding='utf-8') as f:
        lines = f.read().split('\n')[:40]
    return dataset.NameDataset(corpus, '\n'.join(lines) + '\n'), corpus.vocab_size


def inject_nan_gradient(t, gpt, at_step):
    """From step `at_step` on, head.weight's gradient is NaN (the loss stays finite)."""
    scale = torch.ones((), device=t.device)
    gpt.head.weight.register_hook(lambda grad: grad * scale)
    if at_step == 1:
        scale.fill_(float('nan'))
    t.add_callback('on_batch_end', lambda tr: scale.fill_(float('nan')) if tr.step == at_step - 1 else None)


def train(tmp_path, data, train_step, name, max_steps=None, checkpoint_minutes=0.0, nan_at=None, device='cpu'):
    """A tiny run of 10 steps (40 examples, batches of 4) that checkpoints after every step (minutes 0)."""
    examples, vocab_size = data
    utils.set_seed(0)
    gpt = model.GPT(model.GPTConfig(vocab_size, run.BLOCK_SIZE, n_layer=1, n_head=2, n_embd=16, embd_pdrop=0.0,
                                    resid_pdrop=0.0, attn_pdrop=0.0))
    config = trainer.TrainerConfig(max_epochs=1, batch_size=4, learning_rate=1e-3, lr_decay=True,
                                   warmup_tokens=4 * 127 * 5, final_tokens=40 * 127, show_progress=False,
                                   train_step=train_step, max_steps=max_steps,
                                   metrics_path=str(tmp_path / f'{name}.jsonl'),
                                   checkpoint_path=str(tmp_path / f'{name}.ckpt'),
                                   checkpoint_minutes=checkpoint_minutes)
    t = trainer.Trainer(gpt, examples, None, config, device=device)
    if nan_at is not None:
        inject_nan_gradient(t, gpt, nan_at)
    return t, gpt


def metrics_steps(tmp_path, name):
    with open(tmp_path / f'{name}.jsonl') as f:
        return [json.loads(line)['step'] for line in f]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('checkpoint_minutes', [0.0, 60.0], ids=['checkpoint-every-step', 'no-checkpoint-due'])
@pytest.mark.parametrize('train_step', ['default', 'fixed', 'graph'])
def test_non_finite_gradient_with_finite_loss_stops_before_its_update(tmp_path, data, train_step,
                                                                      checkpoint_minutes, device):
    reference, reference_model = train(tmp_path, data, train_step, 'reference', max_steps=BAD_STEP - 1,
                                       device=device)
    reference.train()
    good = {k: v.clone() for k, v in reference_model.state_dict().items()}

    t, gpt = train(tmp_path, data, train_step, 'diverged', checkpoint_minutes=checkpoint_minutes, nan_at=BAD_STEP,
                   device=device)
    with pytest.raises(trainer.TrainingDiverged, match=f'the gradient norm is nan at step {BAD_STEP} ') as info:
        t.train()
    # the rate the bad step ran at: the one set after the step before it (the original's order)
    with open(tmp_path / 'reference.jsonl') as f:
        rate = [json.loads(line) for line in f][-1]['lr']
    assert info.value.learning_rate == pytest.approx(rate, rel=1e-6)
    if device == 'cuda' and train_step == 'graph':
        assert t.train_step.graph is not None   # the bad step was a replay
    # the model is that of the last good step, bit for bit: the bad step's update (and any later one) was skipped
    state = gpt.state_dict()
    assert all(bool(torch.isfinite(v).all()) for v in state.values())
    for k in good:
        assert torch.equal(state[k], good[k]), k
    optimizer_steps = {int(s['step']) for s in t.optimizer.state_dict()['state'].values()}
    assert optimizer_steps == {BAD_STEP - 1}
    # the metrics hold the applied steps only; the checkpoint on disk (if any) is the last good one
    assert metrics_steps(tmp_path, 'diverged') == list(range(1, BAD_STEP))
    ckpt = tmp_path / 'diverged.ckpt'
    if checkpoint_minutes == 0:
        saved = checkpoint.load(str(ckpt))  # on the CPU
        assert saved['step'] == BAD_STEP - 1
        for k in good:
            assert torch.equal(saved['model'][k], good[k].cpu()), k
    else:
        assert not ckpt.exists()


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('train_step', ['fixed', 'graph'])
def test_fixed_step_skips_updates_on_the_device_until_the_flush(tmp_path, data, train_step, device):
    """No checkpoint due: the steps after the bad one still run (no host sync), but none of them updates."""
    t, gpt = train(tmp_path, data, train_step, 'diverged', checkpoint_minutes=60.0, nan_at=BAD_STEP, device=device)
    calls = []
    t.add_callback('on_batch_end', lambda tr: calls.append(tr.step))
    with pytest.raises(trainer.TrainingDiverged, match=f'the gradient norm is nan at step {BAD_STEP} '):
        t.train()
    assert calls == list(range(1, 11))   # the whole epoch ran; the flush at its end found the bad step
    assert float(t.train_step.skip) == 1.0
    assert all(bool(torch.isfinite(v).all()) for v in gpt.state_dict().values())
    assert {int(s['step']) for s in t.optimizer.state_dict()['state'].values()} == {BAD_STEP - 1}


def test_repeated_nan_gradient_on_the_default_step_is_stopped_at_its_first_step(tmp_path, data):
    t, gpt = train(tmp_path, data, 'default', 'diverged', nan_at=1)
    before = {k: v.clone() for k, v in gpt.state_dict().items()}
    with pytest.raises(trainer.TrainingDiverged, match='the gradient norm is nan at step 1 '):
        t.train()
    assert all(torch.equal(before[k], v) for k, v in gpt.state_dict().items())
    assert not (tmp_path / 'diverged.ckpt').exists()


def test_fixed_step_needs_a_fused_optimizer(data):
    examples, vocab_size = data
    gpt = model.GPT(model.GPTConfig(vocab_size, run.BLOCK_SIZE, n_layer=1, n_head=2, n_embd=16))
    config = trainer.TrainerConfig(max_epochs=1, batch_size=4, show_progress=False, train_step='fixed',
                                   fused_optimizer=False)
    with pytest.raises(ValueError, match='need a fused AdamW'):
        trainer.Trainer(gpt, examples, None, config, device='cpu').train()
