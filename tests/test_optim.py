"""SPEC §7: the learning-rate schedule and the AdamW groups (src/optim.py), and how the trainer applies them."""
import json
import math

import pytest
import torch

import optim
import trainer
from conftest import tiny_model, toy_dataset

pytestmark = pytest.mark.usefixtures('single_thread')


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


@pytest.mark.parametrize('lr_floor', [0.0, 0.05])
def test_lr_floor_sets_where_the_cosine_stops(lr_floor):
    sched = trainer.TrainerConfig(lr_decay=True, warmup_tokens=1000, final_tokens=11000, lr_floor=lr_floor)
    at_0_7 = 0.5 * (1 + math.cos(math.pi * 0.7))
    assert optim.lr_multiplier(1000 + 7000, sched) == pytest.approx(at_0_7, rel=1e-9)   # above either floor
    assert optim.lr_multiplier(1000 + 9500, sched) == pytest.approx(max(lr_floor, 0.5 * (1 + math.cos(math.pi * 0.95))))
    assert optim.lr_multiplier(11000, sched) == pytest.approx(lr_floor, abs=1e-12)          # progress 1


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
    assert len(record['lrs']) == 4   # 14 rows in batches of 4: every step recorded, so the check below is not vacuous
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


# ---------------------------------------------------------------- Muon

@pytest.mark.parametrize('shape', [(16, 16), (64, 16), (16, 48)])
def test_orthogonalized_is_close_to_the_svd_polar_factor(shape):
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(shape, generator=g, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    polar = u @ vh   # the slow reference: every singular value set to 1
    fast = optim.orthogonalized(matrix)
    assert fast.shape == matrix.shape
    # the same singular vectors: in their bases the result is diagonal, with every value near 1
    in_bases = u.T @ fast @ vh.T
    diagonal = torch.diagonal(in_bases)
    torch.testing.assert_close(in_bases, torch.diag(diagonal), rtol=0, atol=1e-9)
    assert diagonal.min() > 0.6 and diagonal.max() < 1.25
    cosine = (fast * polar).sum() / (fast.norm() * polar.norm())
    assert cosine > 0.97


def muon_config(**kwargs):
    return trainer.TrainerConfig(optimizer='muon', learning_rate=0.01, weight_decay=0.1, **kwargs)


def test_muon_groups_hidden_matrices_apart_from_embeddings_head_and_vectors():
    for synthesizer in (False, True):
        m = tiny_model(synthesizer)
        opt = optim.make_optimizer(m, muon_config(), torch.device('cpu'))
        assert isinstance(opt, optim.Muon)
        of = {id(p): (group['muon'], group['weight_decay']) for group in opt.param_groups for p in group['params']}
        names = dict(m.named_parameters())
        assert len(of) == len(names)
        muon = {name for name, p in names.items() if of[id(p)][0]}
        linear_weights = {f'{name}.weight' for name, module in m.named_modules() if isinstance(module, torch.nn.Linear)}
        expected = (linear_weights - {'head.weight'}) | ({'blocks.0.attn.w2'} if synthesizer else set())
        assert muon == expected
        for name, p in names.items():   # weight decay as with AdamW's original grouping
            assert of[id(p)][1] == (0.0 if 'bias' in name else 0.1), name


def test_muon_steps_adamw_groups_as_torch_adamw_does():
    """Given the same gradients, the parameters outside Muon's groups move as torch.optim.AdamW moves them."""
    reference, ours = tiny_model(), tiny_model()
    cfg = muon_config()
    torch_adamw = torch.optim.AdamW([{'params': [p for n, p in reference.named_parameters() if 'bias' not in n],
                                      'weight_decay': 0.1},
                                     {'params': [p for n, p in reference.named_parameters() if 'bias' in n],
                                      'weight_decay': 0.0}], lr=0.01, betas=cfg.betas, foreach=False)
    muon = optim.make_optimizer(ours, cfg, torch.device('cpu'))
    x, y = toy_dataset()[:4]
    for _ in range(3):
        torch_adamw.zero_grad()
        reference(x, y)[1].backward()
        for a, b in zip(reference.parameters(), ours.parameters()):
            b.grad = a.grad.clone()
        torch_adamw.step()
        muon.step()
    moved_by_muon = 0
    for (name, a), b in zip(reference.named_parameters(), ours.parameters()):
        if optim.is_hidden_matrix(name, a):
            moved_by_muon += 1
            assert not torch.allclose(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    assert moved_by_muon == 6   # query, key, value, proj and the MLP's two


def test_muon_step_on_a_matrix():
    """Decay, Nesterov momentum, orthogonalization and the 0.2 sqrt(max side) scale, step by step."""
    g = torch.Generator().manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(8, 24, generator=g))
    grads = [torch.randn(8, 24, generator=g) for _ in range(2)]
    opt = optim.Muon([{'params': [weight], 'muon': True, 'weight_decay': 0.1}], lr=0.02, betas=(0.9, 0.95))
    expected, buffer = weight.detach().clone(), torch.zeros(8, 24)
    for grad in grads:
        weight.grad = grad.clone()
        opt.step()
        buffer = 0.95 * buffer + grad
        expected = expected * (1 - 0.02 * 0.1) - 0.02 * 0.2 * 24 ** 0.5 * optim.orthogonalized(grad + 0.95 * buffer)
        torch.testing.assert_close(weight.detach(), expected)
    update_rms = (0.2 * 24 ** 0.5 * optim.orthogonalized(grads[0])).pow(2).mean().sqrt()
    assert 0.12 < update_rms < 0.25   # about an AdamW update's size, as the scale intends


def test_muon_state_survives_a_checkpoint_round_trip():
    m, cfg = tiny_model(), muon_config()
    opt = optim.make_optimizer(m, cfg, torch.device('cpu'))
    x, y = toy_dataset()[:4]
    m(x, y)[1].backward()
    opt.step()
    again = optim.make_optimizer(m, cfg, torch.device('cpu'))
    optim.restore(again, opt.state_dict(), lr=0.005)
    assert [group['lr'] for group in again.param_groups] == [0.005] * len(opt.param_groups)
    for p in m.parameters():
        for key, value in opt.state[p].items():
            assert torch.equal(torch.as_tensor(again.state[p][key]), torch.as_tensor(value))
