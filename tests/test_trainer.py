"""SPEC §7: the trainer's config, precision, determinism, max_steps, progress, held-out loss, metrics on resume
(test_optim.py: the schedule and AdamW; test_batching.py: pieces and stratified batches)."""
import json
import re

import pytest
import torch

import checkpoint
import model
import steps
import trainer
import utils
from conftest import small_config, tiny_model, toy_dataset

pytestmark = pytest.mark.usefixtures('single_thread')


def test_config_defaults():
    c = trainer.TrainerConfig()
    assert (c.max_epochs, c.batch_size, c.learning_rate, tuple(c.betas), c.grad_norm_clip, c.weight_decay,
            c.lr_decay, c.warmup_tokens, c.final_tokens, c.ckpt_path, c.num_workers) == \
        (10, 64, 3e-4, (0.9, 0.95), 1.0, 0.1, False, 375e6, 260e9, None, 0)
    c2 = trainer.TrainerConfig(max_epochs=3, learning_rate=1.0)
    assert c2.max_epochs == 3 and c2.learning_rate == 1.0 and c2.batch_size == 64


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
        for p in m.parameters():   # move away from the near-uniform init
            if p.dim() > 1:
                p.normal_(0, 0.1)
        _, loss32 = m(x, y)
        dtype = steps.autocast_dtype('bf16', torch.device('cpu'))
        assert dtype == torch.bfloat16
        with torch.autocast('cpu', dtype=dtype):
            logits16, loss16 = m(x, y)
    assert logits16.dtype == torch.bfloat16, 'autocast did not run the model in bf16'
    assert abs(float(loss16) - float(loss32)) <= 0.02 * float(loss32)
    assert float(loss16) != float(loss32)


def test_autocast_dtype_settings():
    cpu = torch.device('cpu')
    assert steps.autocast_dtype('fp32', cpu) is None
    assert steps.autocast_dtype('auto', cpu) is None     # bf16 on a CPU only when asked
    assert steps.autocast_dtype('bf16', cpu) == torch.bfloat16
    assert steps.autocast_dtype('tf32', cpu) is None     # fp32 tensors; TF32 products only on a CUDA GPU
    steps.allow_tf32('tf32', cpu)
    assert not torch.backends.cuda.matmul.allow_tf32       # and a CPU run leaves the CUDA setting alone
    with pytest.raises(ValueError):
        steps.autocast_dtype('fp16x', cpu)


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
