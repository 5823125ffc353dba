"""Kept attention weights (src/attention.py `keep_weights`) and attention_map.py, which draws them.

The kept weights are held to a per-head, per-query softmax written out here
from SPEC section 5's equations, to sum to 1 over each row and to be zero
above the diagonal; keeping them changes no output. Then a tiny model's
params go through the command end to end.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import attention
import model
from conftest import small_config

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, ROOT)
import attention_map  # noqa: E402

pytestmark = pytest.mark.usefixtures('single_thread')

BS, D, H = 16, 32, 4
CLASSES = {'vanilla': attention.CausalSelfAttention, 'synthesizer': attention.SynthesizerAttention}


def module(variant):
    torch.manual_seed(0)
    m = CLASSES[variant](small_config(variant == 'synthesizer', block_size=BS, n_embd=D, n_head=H))
    if variant == 'synthesizer':  # w2 is tiny at init: make the synthesised scores differ
        with torch.no_grad():
            m.w2.normal_(0, 0.5)
            m.b2.normal_(0, 0.5)
    return m.eval()


def equation_softmax(m, variant, x):
    """(B, h, T, T): row t is the softmax over keys j <= t of the head's score, zeros after; one query at a time."""
    B, T, _ = x.shape
    hs = D // H
    out = torch.zeros(B, H, T, T)
    for b in range(B):
        for i in range(H):
            cols = slice(i * hs, (i + 1) * hs)
            for t in range(T):
                if variant == 'vanilla':
                    q, k = m.query(x[b, t])[cols], m.key(x[b, :t + 1])[:, cols]
                    scores = k @ q / math.sqrt(hs)
                else:
                    a = torch.relu(m.w1(x[b, t])[cols])
                    scores = torch.stack([a @ m.w2[:, j] + m.b2[j] for j in range(t + 1)])
                out[b, i, t, :t + 1] = torch.softmax(scores, 0)
    return out


@pytest.mark.parametrize('variant', CLASSES)
def test_kept_weights_are_the_equations_softmax_rows_sum_to_one_and_causal(variant):
    m = module(variant)
    x = torch.randn(2, BS - 1, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused = m(x)
        assert not hasattr(m, 'weights'), 'off by default: nothing is kept'
        m.keep_weights = True
        kept_output = m(x)
        weights = m.weights
        expected = equation_softmax(m, variant, x)
    assert weights.shape == (2, H, BS - 1, BS - 1)
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, H, BS - 1), rtol=0, atol=1e-6)
    above = torch.triu(torch.ones(BS - 1, BS - 1, dtype=torch.bool), diagonal=1)
    assert torch.all(weights[..., above] == 0)
    assert torch.all(weights[..., ~above] > 0)
    torch.testing.assert_close(kept_output, fused, rtol=1e-5, atol=1e-6)  # keeping them changes nothing


@pytest.mark.parametrize('variant', CLASSES)
def test_a_gpt_keeping_weights_gives_the_same_logits(variant):
    torch.manual_seed(0)
    gpt = model.GPT(small_config(variant == 'synthesizer', block_size=BS)).eval()
    idx = torch.randint(0, 50, (2, BS - 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, _ = gpt(idx)
        for block in gpt.blocks:
            block.attn.keep_weights = True
        kept, _ = gpt(idx)
    torch.testing.assert_close(kept, logits, rtol=1e-5, atol=1e-5)
    assert all(block.attn.weights.shape == (2, 4, BS - 1, BS - 1) for block in gpt.blocks)


TINY = ['--recipe', 'laptop', '--n_layer', '2', '--n_head', '2', '--n_embd', '16']


@pytest.fixture(scope='module')
def tiny_params(tmp_path_factory, char_dataset):
    """Untrained params of the tiny laptop-recipe model, one file per variant."""
    folder = tmp_path_factory.mktemp('params')
    paths = {}
    for variant in CLASSES:
        torch.manual_seed(0)
        config = model.GPTConfig(char_dataset.vocab_size, 128, n_layer=2, n_head=2, n_embd=16,
                                 synthesizer=variant == 'synthesizer')
        paths[variant] = str(folder / f'{variant}.params')
        torch.save(model.GPT(config).state_dict(), paths[variant])
    return paths


def test_the_weights_come_from_reading_the_question_and_the_models_answer(tiny_params):
    gpt, pretrain_dataset = attention_map.load('synthesizer', tiny_params['synthesizer'],
                                               os.path.join(ROOT, 'wiki.txt'), TINY)
    question = 'Where was Ralf Wadephul born?'
    chars, answer, layers = attention_map.attention_weights(gpt, pretrain_dataset, question)
    assert chars == question + '\u2047' + answer + '\u2047'
    assert [name for name, _ in layers] == ['blocks.0.attn', 'blocks.1.attn']
    assert all(w.shape == (2, len(chars), len(chars)) for _, w in layers)
    assert not any(block.attn.keep_weights for block in gpt.blocks), 'switched off again'


def run(*args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, os.path.join(ROOT, 'attention_map.py'), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_the_command_draws_both_variants_into_a_png(tiny_params, tmp_path):
    pytest.importorskip('matplotlib')
    out = tmp_path / 'attention.png'
    result = run('--model', 'vanilla', tiny_params['vanilla'], '--model', 'synthesizer', tiny_params['synthesizer'],
                 '--dev', '1', '2', '--output', str(out), '--', *TINY)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert f'Attention maps written to {out}' in result.stdout


@pytest.mark.parametrize('args, message', [
    (['--model', 'vanilla', 'VANILLA', '--dev', '501'], '--dev 501: birth_dev.tsv has lines 1 to 500'),
    (['--model', 'vanilla', 'SYNTHESIZER'], 'holds synthesizer params, but the variant is vanilla'),
    (['--model', 'vanilla', 'no/such.params'], 'no/such.params: no such file'),
    (['--model', 'vanilla', 'VANILLA', '--question', 'Where was \u00c6lfric born?'], 'the vocabulary lacks'),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(tiny_params, tmp_path, args, message):
    args = [{'VANILLA': tiny_params['vanilla'], 'SYNTHESIZER': tiny_params['synthesizer']}.get(a, a) for a in args]
    result = run(*args, '--output', str(tmp_path / 'a.png'), '--', *TINY)
    assert result.returncode != 0 and result.stdout == ''
    assert result.stderr.count('\n') == 1 and 'Traceback' not in result.stderr, result.stderr
    assert message in result.stderr
    assert not (tmp_path / 'a.png').exists()


def test_a_perceiver_without_middle_blocks_is_left_out_with_a_line(tiny_params, tmp_path):
    """With n_layer 2 the perceiver has only its cross-attention blocks, which are not drawn."""
    pytest.importorskip('matplotlib')
    torch.manual_seed(0)
    corpus = os.path.join(ROOT, 'wiki.txt')
    _, pretrain_dataset = attention_map.load('vanilla', tiny_params['vanilla'], corpus, TINY)
    config = model.GPTConfig(pretrain_dataset.vocab_size, 128, n_layer=2, n_head=2, n_embd=16, perceiver=True,
                             bottleneck_dim=64)  # the recipe's default, so the flags below fit both models
    perceiver = str(tmp_path / 'perceiver.params')
    torch.save(model.GPT(config).state_dict(), perceiver)
    flags = TINY
    out = tmp_path / 'both.png'
    result = run('--model', 'perceiver', perceiver, '--model', 'vanilla', tiny_params['vanilla'], '--dev', '1',
                 '--output', str(out), '--', *flags)
    assert result.returncode == 0, result.stderr
    assert 'perceiver has no self-attention layer to draw; left out' in result.stdout
    assert out.read_bytes()[:4] == b'\x89PNG'
    alone = run('--model', 'perceiver', perceiver, '--dev', '1', '--output', str(tmp_path / 'a.png'), '--', *flags)
    assert alone.returncode != 0 and alone.stderr.count('\n') == 1 and 'Traceback' not in alone.stderr
    assert 'no model has a self-attention layer to draw' in alone.stderr
    assert not (tmp_path / 'a.png').exists()
