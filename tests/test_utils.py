"""SPEC §8 and issue 3: evaluate_places, sample, top_k_logits, set_seed, and batched greedy decoding."""
import os
import random

import pytest
import torch

import model
import utils
from conftest import MASK_CHAR, ROOT

pytestmark = pytest.mark.usefixtures('single_thread')

# ------------------------------------------------------------ evaluate_places


def test_evaluate_places_counts(tmp_path):
    path = tmp_path / 'gold.tsv'
    path.write_text('Where was A born?\tParis\nWhere was B born?\tRome\nWhere was C born?\tLondon\n'
                    'Where was D born?\tNew York\n', encoding='utf-8')
    total, correct = utils.evaluate_places(str(path), ['Paris', 'Rom', 'London', 'New York'])
    assert (total, correct) == (4.0, 3.0)
    assert isinstance(total, float) and isinstance(correct, float)
    assert utils.evaluate_places(str(path), ['', '', '', '']) == (4.0, 0.0)
    # exact comparison: case and surrounding text matter
    assert utils.evaluate_places(str(path), ['paris', 'Rome ', 'London', 'New York']) == (4.0, 2.0)


def test_evaluate_places_length_mismatch(tmp_path):
    path = tmp_path / 'gold.tsv'
    path.write_text('Where was A born?\tParis\nWhere was B born?\tRome\n', encoding='utf-8')
    with pytest.raises((ValueError, AssertionError)):
        utils.evaluate_places(str(path), ['Paris'])
    with pytest.raises((ValueError, AssertionError)):
        utils.evaluate_places(str(path), ['Paris', 'Rome', 'x'])


def test_evaluate_places_without_gold(tmp_path, capsys):
    path = tmp_path / 'inputs.tsv'
    path.write_text('Where was A born?\nWhere was B born?\n', encoding='utf-8')
    result = utils.evaluate_places(str(path), ['Paris', 'Rome'])
    assert tuple(result) == (0, 0)
    out = capsys.readouterr().out
    assert 'No gold birth places provided' in out


def test_evaluate_places_on_real_files():
    dev = os.path.join(ROOT, 'birth_dev.tsv')
    with open(dev, encoding='utf-8') as f:
        places = [line.rstrip('\n').split('\t')[1] for line in f]
    assert utils.evaluate_places(dev, places) == (500.0, 500.0)
    assert utils.evaluate_places(dev, ['London'] * 500) == (500.0, 25.0)
    assert tuple(utils.evaluate_places(os.path.join(ROOT, 'birth_test_inputs.tsv'), ['x'] * 437)) == (0, 0)


# ------------------------------------------------------------ small helpers

def test_top_k_logits():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0], [0.0, -1.0, 2.0, 1.0]])
    out = utils.top_k_logits(logits, 2)
    assert torch.equal(torch.isinf(out), torch.tensor([[True, False, True, False], [True, True, False, False]]))
    assert out[0, 1] == 5.0 and out[1, 3] == 1.0
    assert torch.equal(logits, torch.tensor([[1.0, 5.0, 3.0, 4.0], [0.0, -1.0, 2.0, 1.0]])), 'input unchanged'


def test_set_seed_reproducible():
    utils.set_seed(3)
    a = (random.random(), torch.rand(3))
    utils.set_seed(3)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def sharp_model(synthesizer, vocab_size, block_size=128, seed=0, std=None):
    """A random model with large weights, so its logits are spread far apart.

    Every parameter except the LayerNorms is drawn from N(0, std): 0.5 for
    vanilla, 0.3 for the synthesizer (larger saturates its attention and every
    question gets the same continuation).
    """
    torch.manual_seed(seed)
    cfg = model.GPTConfig(vocab_size, block_size, n_layer=2, n_head=4, n_embd=64,
                          embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0, synthesizer=synthesizer)
    m = model.GPT(cfg)
    if std is None:
        std = 0.3 if synthesizer else 0.5
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.startswith('ln') and '.ln' not in name:
                p.normal_(0.0, std)
    return m.eval()


def test_sample_greedy_appends_argmax():
    m = sharp_model(False, 30, block_size=16)
    x = torch.tensor([[3, 4, 5]])
    out = utils.sample(m, x, 20)      # longer than the block: the context is cropped
    assert out.shape == (1, 23)
    assert torch.equal(out[:, :3], x)
    with torch.no_grad():
        for t in range(3, 23):
            ctx = out[:, max(0, t - 16):t]
            assert int(m(ctx)[0][0, -1].argmax()) == int(out[0, t])


@pytest.fixture(scope='module')
def dev_prompts(char_dataset):
    with open(os.path.join(ROOT, 'birth_dev.tsv'), encoding='utf-8') as f:
        questions = [line.rstrip('\r\n').split('\t')[0] for line in f]
    assert len(questions) == 500
    return [[char_dataset.stoi[c] for c in q + MASK_CHAR] for q in questions]


STEPS = 32
# The literal one-prompt-at-a-time reference over all 500 questions is ~16,000
# forward passes per variant (minutes on a shared 2-core CPU). By default the
# reference runs utils.sample on each group of equal-length prompts (rows are
# independent, so it is the same computation) plus a strictly one-at-a-time
# run on a spread of questions; FULL_REFERENCE=1 runs all 500 one at a time.
FULL_REFERENCE = os.environ.get('FULL_REFERENCE') == '1'


@pytest.mark.parametrize('synthesizer', [False, True])
def test_greedy_decode_equals_sample(char_dataset, dev_prompts, synthesizer):
    """Batched KV-cache decoding gives exactly the tokens of the simple full-recompute loop.

    With 500 x 32 greedy decisions over 256 characters a handful of random
    top-2 gaps inevitably fall near fp32 rounding (~1e-5 here), where any two
    correct implementations may differ. So: every question must match exactly,
    except one whose first difference is at a genuine near-tie of the
    reference logits (gap < 1e-3, at most 1% of questions).
    """
    m = sharp_model(synthesizer, char_dataset.vocab_size)
    fast = utils.greedy_decode(m, dev_prompts, STEPS, batch_size=512)
    assert len(fast) == 500
    assert all(len(c) == STEPS for c in fast)
    assert len({tuple(c) for c in fast}) > 100, 'the random model should give varied answers'

    by_length = {}
    for i, p in enumerate(dev_prompts):
        by_length.setdefault(len(p), []).append(i)
    reference, gaps = [None] * 500, [None] * 500
    with torch.no_grad():
        for length, group in by_length.items():
            x = torch.tensor([dev_prompts[i] for i in group])
            out = utils.sample(m, x, STEPS)
            # top-2 margin of the logits that chose each reference token
            top2 = m(out[:, :-1])[0][:, length - 1:].topk(2, dim=-1).values
            margin = top2[..., 0] - top2[..., 1]
            for row, i in enumerate(group):
                reference[i] = out[row, length:].tolist()
                gaps[i] = margin[row].tolist()
    excused = []
    for i in range(500):
        if fast[i] != reference[i]:
            k = next(t for t in range(STEPS) if fast[i][t] != reference[i][t])
            assert gaps[i][k] < 1e-3, (f'question {i} differs at step {k} where the reference margin is '
                                       f'{gaps[i][k]:.3g}: not a near-tie')
            excused.append(i)
    assert len(excused) <= 5, f'{len(excused)} questions differ'
    assert sum(g > 1e-2 for gs in gaps for g in gs) > 0.95 * 500 * STEPS, "logits should be well separated"

    # strictly one prompt at a time, as the original evaluation loop
    indices = range(500) if FULL_REFERENCE else sorted({g[0] for g in by_length.values()})[::2]
    for i in indices:
        out = utils.sample(m, torch.tensor([dev_prompts[i]]), STEPS)
        assert out[0, len(dev_prompts[i]):].tolist() == reference[i], i


def test_greedy_decode_small_batches_same_result(char_dataset, dev_prompts):
    m = sharp_model(False, char_dataset.vocab_size, seed=1)
    prompts = dev_prompts[:60]
    a = utils.greedy_decode(m, prompts, 8, batch_size=512)
    b = utils.greedy_decode(m, prompts, 8, batch_size=3)
    assert a == b


def test_greedy_decode_near_block_end_matches_sample_and_refuses_overflow():
    """Up to the last position of the block the cached decoder equals `sample`;
    past it (where `sample` would crop the context) it refuses with a clear error,
    and run.py sends such prompts through `sample` instead."""
    m = sharp_model(False, 30, block_size=32)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 30, (n,), generator=g).tolist() for n in (20, 20, 24, 25)]
    fast = utils.greedy_decode(m, prompts, 8)
    for p, continuation in zip(prompts, fast):
        ref = utils.sample(m, torch.tensor([p]), 8)[0, len(p):].tolist()
        assert continuation == ref
    with pytest.raises(ValueError, match='block size'):
        utils.greedy_decode(m, [prompts[0] + [3] * 8], 8)


def test_greedy_decode_stop_id_agrees_with_full_decoding(char_dataset, dev_prompts):
    m = sharp_model(False, char_dataset.vocab_size, seed=3)
    prompts = dev_prompts[:80]
    full = utils.greedy_decode(m, prompts, STEPS)
    stop_id = max(set(t for c in full for t in c[:4]), key=lambda t: sum(c[:4].count(t) for c in full))
    early = utils.greedy_decode(m, prompts, STEPS, stop_id=stop_id)
    assert any(len(e) < STEPS for e in early)  # some groups did stop early
    for f, e in zip(full, early):
        assert e == f[:len(e)]
        assert len(e) == STEPS or stop_id in e
