"""When a run goes wrong midway: files written whole or not at all, a diverging run stopped, denormal floats
flushed (test_bad_flags.py and test_bad_files.py: bad input, refused before anything runs)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import dataset
import evaluation
import model
import run
import utils
from conftest import SRC, TINY, WIKI, assert_one_error_line, call, evaluate_argv, listing, write

pytestmark = pytest.mark.usefixtures('single_thread')  # conftest: tiny models, one thread


# --- files written whole or not at all -------------------------------------------------------------------------

def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = write(tmp_path / 'out.txt', 'old\n')
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error):
            with utils.atomic_write(path) as temporary:
                with open(temporary, 'w') as f:
                    f.write('half of the new')
                raise error()
        assert open(path).read() == 'old\n'
        assert listing(tmp_path) == ['out.txt']
    with utils.atomic_write(path) as temporary:
        with open(temporary, 'w') as f:
            f.write('new\n')
    assert open(path).read() == 'new\n' and listing(tmp_path) == ['out.txt']


def test_atomic_write_through_a_symlink(tmp_path):
    real = write(tmp_path / 'real.txt', 'old\n')
    os.symlink(real, tmp_path / 'link.txt')
    with utils.atomic_write(str(tmp_path / 'link.txt')) as temporary:
        with open(temporary, 'w') as f:
            f.write('new\n')
    assert os.path.islink(tmp_path / 'link.txt') and open(real).read() == 'new\n'


def test_interrupted_params_write_keeps_previous_params(tmp_path, capsys, monkeypatch):
    path = tmp_path / 'x.params'
    path.write_bytes(b'previous params')
    real_save = torch.save

    def save_then_interrupt(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', save_then_interrupt)
    code, out, err = call(['pretrain', 'vanilla', WIKI, '--writing_params_path', path, '--checkpoint_minutes', '60']
                          + TINY, capsys)
    assert code == 130 and 'Traceback' not in err and 'Interrupted' in err
    assert path.read_bytes() == b'previous params'
    assert sorted(os.listdir(tmp_path)) == ['x.params', 'x.params.metrics.jsonl']


def test_interrupted_predictions_write_keeps_previous_file(tmp_path, capsys, monkeypatch, params, dev_small):
    out_path = tmp_path / 'out.pred'
    out_path.write_text('previous predictions\n')

    class InterruptedFile:
        """A file whose third write meets a Ctrl-C."""

        def __init__(self, f):
            self.f, self.writes = f, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.writes += 1
            if self.writes == 3:
                raise KeyboardInterrupt
            self.f.write(text)

    monkeypatch.setattr(evaluation, 'open', lambda *args, **kwargs: InterruptedFile(open(*args, **kwargs)),
                        raising=False)
    code, out, err = call(evaluate_argv(params, tmp_path, eval_path=dev_small), capsys)
    assert code == 130 and 'Traceback' not in err and 'no predictions were written' in err
    assert out_path.read_text() == 'previous predictions\n'
    assert sorted(os.listdir(tmp_path)) == ['dev.tsv', 'out.pred', 'vanilla.params']


# --- a diverging run -------------------------------------------------------------

def test_diverging_run_stops_at_the_first_non_finite_loss(tmp_path, capsys):
    """lr 1e6: step 1 is finite, step 2's loss is nan; one line, exit 1, no params, the step-1 checkpoint kept."""
    out_path = tmp_path / 'x.params'
    argv = ['pretrain', 'vanilla', WIKI, '--writing_params_path', out_path, '--n_layer', '1', '--n_head', '2',
            '--n_embd', '16', '--batch_size', '8', '--max_steps', '50', '--quiet',
            '--learning_rate', '1e6', '--checkpoint_minutes', '0']
    code, out, err = call(argv, capsys)
    assert_one_error_line(code, err, 1, 'training diverged: the loss is nan at step 2 (epoch 1)',
                          'no params were written', 'Try a lower --learning_rate',
                          f'the last checkpoint, {out_path}.ckpt, is intact: delete it to start afresh',
                          '--resume --learning_rate LOWER')
    assert not out_path.exists()
    saved = torch.load(f'{out_path}.ckpt', map_location='cpu', weights_only=True)
    assert saved['step'] == 1
    assert all(bool(torch.isfinite(t).all()) for t in saved['model'].values())
    with open(f'{out_path}.metrics.jsonl') as f:
        assert [json.loads(line)['step'] for line in f] == [1]


def test_diverging_run_without_checkpoint(tmp_path, capsys):
    code, out, err = call(['pretrain', 'vanilla', WIKI, '--writing_params_path', tmp_path / 'x.params']
                          + ['--n_layer', '1', '--n_head', '2', '--n_embd', '16', '--batch_size', '8', '--quiet',
                             '--max_steps', '20', '--learning_rate', '1e6'], capsys)
    assert_one_error_line(code, err, 1, 'the loss is nan at step 2', 'no checkpoint was saved before it')
    assert listing(tmp_path) == ['x.params.metrics.jsonl']


def tiny_trainer(tmp_path, gpt):
    import trainer
    data = dataset.NameDataset(dataset.CharCorruptionDataset('abc def\nghi\n', run.BLOCK_SIZE), 'ab\tc\nde\tf\n')
    config = trainer.TrainerConfig(max_epochs=1, batch_size=2, show_progress=False, learning_rate=1e-3,
                                   checkpoint_path=str(tmp_path / 'x.ckpt'), checkpoint_minutes=0)
    return trainer.Trainer(gpt, data, None, config, device='cpu')


def test_non_finite_loss_changes_nothing(tmp_path):
    import trainer
    gpt = model.GPT(model.GPTConfig(12, run.BLOCK_SIZE, n_layer=1, n_head=2, n_embd=8))
    with torch.no_grad():
        gpt.head.weight[3, 0] = float('inf')
    before = {k: v.clone() for k, v in gpt.state_dict().items()}
    t = tiny_trainer(tmp_path, gpt)
    with pytest.raises(trainer.TrainingDiverged, match=r'the loss is (nan|inf) at step 1 \(epoch 1\)'):
        t.train()
    after = gpt.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert t.optimizer.state_dict()['state'] == {} and t.state.step == 0
    assert not os.path.exists(tmp_path / 'x.ckpt')


def test_resume_applies_the_new_learning_rate_and_weight_decay(tmp_path):
    """The optimizer state a checkpoint holds carries the old run's rate and decay; a resumed run uses its own."""
    import checkpoint
    gpt = model.GPT(model.GPTConfig(12, run.BLOCK_SIZE, n_layer=1, n_head=2, n_embd=8))
    first = tiny_trainer(tmp_path, gpt)
    first.config.batch_size, first.config.max_steps = 1, 2  # a checkpoint after step 1
    first.train()
    resumed = tiny_trainer(tmp_path, gpt)
    resumed.config.learning_rate, resumed.config.weight_decay = 5e-2, 0.25
    resumed.resume(checkpoint.load(str(tmp_path / 'x.ckpt')))
    resumed.prepare()
    assert [g['lr'] for g in resumed.optimizer.param_groups] == [5e-2, 5e-2]
    assert [g['weight_decay'] for g in resumed.optimizer.param_groups] == [0.25, 0.0]


def test_non_finite_gradient_norm_with_a_finite_loss(tmp_path, monkeypatch):
    import trainer
    gpt = model.GPT(model.GPTConfig(12, run.BLOCK_SIZE, n_layer=1, n_head=2, n_embd=8))
    before = {k: v.clone() for k, v in gpt.state_dict().items()}
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', lambda *a, **k: torch.tensor(float('inf')))
    with pytest.raises(trainer.TrainingDiverged, match='the gradient norm is inf at step 1'):
        tiny_trainer(tmp_path, gpt).train()
    assert all(torch.equal(before[k], v) for k, v in gpt.state_dict().items())


def test_fixed_step_stops_at_the_epoch_flush_on_a_non_finite_loss(tmp_path):
    """train_step 'fixed' keeps losses on the device until a flush: the flush raises, before any checkpoint."""
    import trainer
    gpt = model.GPT(model.GPTConfig(12, run.BLOCK_SIZE, n_layer=1, n_head=2, n_embd=8))
    with torch.no_grad():
        gpt.head.weight[3, 0] = float('inf')
    t = tiny_trainer(tmp_path, gpt)
    t.config.train_step = 'fixed'
    with pytest.raises(trainer.TrainingDiverged, match=r'the loss is (nan|inf) at step 1 \(epoch 1\)'):
        t.train()
    assert not os.path.exists(tmp_path / 'x.ckpt')


# --- denormal floats -------------------------------------------------------------

def denormal_model(vocab_size, **sizes):
    """A TINY model whose attention and MLP matrices are scaled into float32's denormal range (below 1.2e-38)."""
    settings = dict(n_layer=1, n_head=2, n_embd=16)
    settings.update(sizes)
    utils.set_seed(0)
    gpt = model.GPT(model.GPTConfig(vocab_size, run.BLOCK_SIZE, **settings))
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if p.dim() == 2 and ('.attn.' in name or '.mlp.' in name):
                p.mul_(1e-37)
    return gpt


def test_flush_denormals_sets_and_restores(wiki_vocab):
    assert not utils.denormals_flushed()
    with utils.flush_denormals():
        assert float(torch.full((1,), 1e-39) * 1.5) == 0.0
        with utils.flush_denormals():
            pass
        assert float(torch.full((1,), 1e-39) * 1.5) == 0.0  # an inner block restores the outer's setting
    assert float(torch.full((1,), 1e-39) * 1.5) > 0


def test_greedy_decode_flushes_and_predicts_as_the_reference(wiki_vocab, dev_small):
    """Denormals through the whole forward: greedy_decode (flushing) and sample (not) agree token for token."""
    gpt = denormal_model(wiki_vocab.vocab_size).eval()
    stoi = wiki_vocab.stoi
    with open(dev_small, encoding='utf-8') as f:
        questions = [line.split('\t')[0] for line in f.read().split('\n') if line]
    prompts = [[stoi[c] for c in q + wiki_vocab.MASK_CHAR] for q in questions]
    decoded = utils.greedy_decode(gpt, prompts, 32)
    assert not utils.denormals_flushed()  # restored
    for prompt, continuation in zip(prompts, decoded):
        reference = utils.sample(gpt, torch.tensor([prompt]), 32)[0, len(prompt):].tolist()
        assert continuation == reference


def test_run_flushes_denormals_on_every_thread(tmp_path, wiki_vocab, dev_small):
    """In a run.py process with two threads, every thread flushes while run() works, and importing changes nothing."""
    gpt = denormal_model(wiki_vocab.vocab_size)
    params_path = str(tmp_path / 'denormal.params')
    torch.save(gpt.state_dict(), params_path)
    script = f'''
import sys
sys.path.insert(0, {SRC!r})
import torch
import dataset, evaluation, model, run, trainer, utils
torch.set_num_threads(2)
print('imported', float(torch.full((1,), 1e-39) * 1.5) == 0)  # this thread only: it starts no worker threads
evaluate = evaluation.evaluate
def spy(*args):
    print('evaluate', utils.denormals_flushed())
    evaluate(*args)
evaluation.evaluate = spy
run.main(sys.argv[1:])
'''
    argv = ['evaluate', 'vanilla', WIKI, '--reading_params_path', params_path, '--eval_corpus_path', dev_small,
            '--outputs_path', tmp_path / 'flushed', '--n_layer', '1', '--n_head', '2', '--n_embd', '16', '--quiet']
    p = subprocess.run([sys.executable, '-c', script] + [str(a) for a in argv], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS='2', OMP_WAIT_POLICY='PASSIVE'), timeout=600)
    # (passive: two spinning threads on a busy machine made a run of under a second take minutes)
    assert p.returncode == 0, p.stderr
    assert 'imported False' in p.stdout and 'evaluate True' in p.stdout
    # the predictions are those of the reference decoder without flushing
    with open(tmp_path / 'flushed', encoding='utf-8') as f:
        predictions = f.read().split('\n')[:-1]
    mask = wiki_vocab.MASK_CHAR
    with open(dev_small, encoding='utf-8') as f:
        questions = [line.split('\t')[0] for line in f.read().split('\n') if line]
    for question, prediction in zip(questions, predictions):
        x = torch.tensor([[wiki_vocab.stoi[c] for c in question + mask]])
        out = ''.join(wiki_vocab.itos[int(i)] for i in utils.sample(gpt.eval(), x, 32)[0])
        assert out.split(mask)[1] == prediction
    assert len(predictions) == len(questions)
