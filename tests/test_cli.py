"""SPEC §9: `python src/run.py` end to end with a tiny model on CPU (pretrain -> finetune -> evaluate).

The runs are started once per module, the two variants' chains side by side,
and each test checks one aspect of their outputs.
"""
import json
import math
import os
import re
import subprocess
import sys
import threading

import pytest
import torch

from conftest import MASK_CHAR, ROOT

pytestmark = pytest.mark.usefixtures('single_thread')

TINY_AUTO_DEVICE = ['--n_layer', '1', '--n_head', '2', '--n_embd', '16', '--max_steps', '2', '--batch_size', '8',
                    '--quiet']
TINY = TINY_AUTO_DEVICE + ['--device', 'cpu']
N_DOCS = 2937                     # documents in wiki.txt
FINAL_TOKENS = 200 * N_DOCS * 128  # the recipe's final_tokens


def run_cli(args, timeout=600):
    # one intra-op thread per process: several run side by side on a small shared machine
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    result = subprocess.run([sys.executable, os.path.join('src', 'run.py')] + args, cwd=ROOT, env=env,
                            capture_output=True, text=True, encoding='utf-8', timeout=timeout)
    return result


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp('cli')
    p = lambda name: str(out / name)  # noqa: E731
    results = {}

    def chain(steps):
        for key, args in steps:
            results[key] = run_cli(args)
            if results[key].returncode != 0:
                return

    vanilla = [
        ('v_pretrain', ['pretrain', 'vanilla', 'wiki.txt', '--writing_params_path', p('v.pretrain.params')] + TINY),
        ('v_finetune', ['finetune', 'vanilla', 'wiki.txt', '--reading_params_path', p('v.pretrain.params'),
                        '--writing_params_path', p('v.finetune.params'),
                        '--finetune_corpus_path', 'birth_places_train.tsv', '--seed', '1'] + TINY_AUTO_DEVICE),
        ('v_dev', ['evaluate', 'vanilla', 'wiki.txt', '--reading_params_path', p('v.finetune.params'),
                   '--eval_corpus_path', 'birth_dev.tsv', '--outputs_path', p('v.dev.predictions')] + TINY),
        ('v_test', ['evaluate', 'vanilla', 'wiki.txt', '--reading_params_path', p('v.finetune.params'),
                    '--eval_corpus_path', 'birth_test_inputs.tsv', '--outputs_path', p('v.test.predictions')] + TINY),
    ]
    synthesizer = [
        ('s_pretrain', ['pretrain', 'synthesizer', 'wiki.txt', '--writing_params_path', p('s.pretrain.params')] + TINY),
        ('s_finetune', ['finetune', 'synthesizer', 'wiki.txt', '--reading_params_path', p('s.pretrain.params'),
                        '--writing_params_path', p('s.finetune.params'),
                        '--finetune_corpus_path', 'birth_places_train.tsv', '--seed', '1'] + TINY_AUTO_DEVICE),
        ('s_dev', ['evaluate', 'synthesizer', 'wiki.txt', '--reading_params_path', p('s.finetune.params'),
                   '--eval_corpus_path', 'birth_dev.tsv', '--outputs_path', p('s.dev.predictions')] + TINY),
    ]
    others = [
        ('v_scratch', ['finetune', 'vanilla', 'wiki.txt', '--writing_params_path', p('v.model.params'),
                       '--finetune_corpus_path', 'birth_places_train.tsv', '--seed', '1'] + TINY_AUTO_DEVICE),
        ('help', ['--help']),
    ]
    threads = [threading.Thread(target=chain, args=(c,)) for c in (vanilla, synthesizer, others)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results['dir'] = out
    return results


def ok(runs, key):
    assert key in runs, f'{key} did not run (an earlier step failed)'
    r = runs[key]
    assert r.returncode == 0, f'{key} failed:\n{r.stdout}\n{r.stderr}'
    return r


def recipe_items(first_line):
    return dict(item.split('=', 1) for item in first_line.split() if '=' in item)


def expected_keys(synthesizer, n_layer=1, d=16, h=2, vocab=256, bs=128):
    shapes = {'tok_emb.weight': (vocab, d), 'pos_emb': (1, bs, d), 'ln_f.weight': (d,), 'ln_f.bias': (d,),
              'head.weight': (vocab, d)}
    for n in range(n_layer):
        b = f'blocks.{n}.'
        shapes.update({b + 'ln1.weight': (d,), b + 'ln1.bias': (d,), b + 'ln2.weight': (d,), b + 'ln2.bias': (d,),
                       b + 'attn.value.weight': (d, d), b + 'attn.value.bias': (d,),
                       b + 'attn.proj.weight': (d, d), b + 'attn.proj.bias': (d,),
                       b + 'attn.mask': (1, 1, bs, bs),
                       b + 'mlp.0.weight': (4 * d, d), b + 'mlp.0.bias': (4 * d,),
                       b + 'mlp.2.weight': (d, 4 * d), b + 'mlp.2.bias': (d,)})
        if synthesizer:
            shapes.update({b + 'attn.w1.weight': (d, d), b + 'attn.w1.bias': (d,),
                           b + 'attn.w2': (d // h, bs - 1), b + 'attn.b2': (bs - 1,)})
        else:
            shapes.update({b + 'attn.key.weight': (d, d), b + 'attn.key.bias': (d,),
                           b + 'attn.query.weight': (d, d), b + 'attn.query.bias': (d,)})
    return shapes


def test_recipe_line_pretrain(runs):
    first = ok(runs, 'v_pretrain').stdout.splitlines()[0]
    items = recipe_items(first)
    assert first.startswith('pretrain vanilla')
    assert items['max_epochs'] == '650'          # --max_steps stops early, the recipe stays
    assert float(items['learning_rate']) == 0.006
    assert items['batch_size'] == '8'            # the override
    assert items['lr_decay'] == 'True'
    assert float(items['warmup_tokens']) == 512 * 20
    assert float(items['final_tokens']) == FINAL_TOKENS
    assert items['n_layer'] == '1' and items['n_head'] == '2' and items['n_embd'] == '16'
    assert items['max_steps'] == '2'


def test_recipe_line_finetune(runs):
    pre = recipe_items(ok(runs, 'v_finetune').stdout.splitlines()[0])
    assert pre['max_epochs'] == '10' and float(pre['learning_rate']) == 6e-4
    assert pre['lr_decay'] == 'True' and float(pre['final_tokens']) == FINAL_TOKENS
    scratch = recipe_items(ok(runs, 'v_scratch').stdout.splitlines()[0])
    assert scratch['max_epochs'] == '75' and float(scratch['learning_rate']) == 6e-4
    assert float(scratch['warmup_tokens']) == 512 * 20
    # no --device: CUDA when there is one, else the CPU
    assert scratch['device'].startswith('cuda' if torch.cuda.is_available() else 'cpu')
    assert scratch['seed'] == '1'


@pytest.mark.parametrize('key, synthesizer', [('v_pretrain', False), ('v_finetune', False), ('v_scratch', False),
                                              ('s_pretrain', True), ('s_finetune', True)])
def test_params_files(runs, key, synthesizer):
    ok(runs, key)
    name = {'v_pretrain': 'v.pretrain', 'v_finetune': 'v.finetune', 'v_scratch': 'v.model',
            's_pretrain': 's.pretrain', 's_finetune': 's.finetune'}[key]
    state = torch.load(runs['dir'] / f'{name}.params', weights_only=True, map_location='cpu')
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_keys(synthesizer)


@pytest.mark.parametrize('prefix', ['v', 's'])
def test_finetune_starts_from_the_pretrained_params(runs, prefix):
    """Finetuning runs with --seed 1 (a different init from pretraining's seed 0), so ending
    next to the pretrained params shows they were loaded."""
    ok(runs, f'{prefix}_finetune')
    pre = torch.load(runs['dir'] / f'{prefix}.pretrain.params', weights_only=True, map_location='cpu')
    fine = torch.load(runs['dir'] / f'{prefix}.finetune.params', weights_only=True, map_location='cpu')
    diffs = {k: float((pre[k] - fine[k]).abs().max()) for k in pre}
    assert max(diffs.values()) < 5e-3, 'two small finetuning steps cannot move far from the pretrained params'
    assert max(diffs.values()) > 0, 'finetuning changed nothing'
    if prefix == 'v':
        scratch = torch.load(runs['dir'] / 'v.model.params', weights_only=True, map_location='cpu')
        assert float((scratch['head.weight'] - pre['head.weight']).abs().max()) > 2e-2


@pytest.mark.parametrize('key, params', [('v_pretrain', 'v.pretrain.params'), ('v_finetune', 'v.finetune.params'),
                                         ('s_pretrain', 's.pretrain.params')])
def test_metrics_file(runs, key, params):
    ok(runs, key)
    path = runs['dir'] / (params + '.metrics.jsonl')
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert len(rows) == 2
    for row in rows:
        assert {'step', 'epoch', 'tokens', 'loss', 'lr', 'tokens_per_s', 'wall_s'} <= set(row)
        assert math.isfinite(row['loss']) and 0 < row['loss'] < 10
        assert row['tokens_per_s'] > 0 and row['wall_s'] > 0
    assert [r['step'] for r in rows] == [1, 2]
    assert [r['epoch'] for r in rows] == [1, 1]
    assert [r['tokens'] for r in rows] == [8 * 127, 16 * 127]
    peak = 6e-3 if 'pretrain' in key else 6e-4
    assert [r['lr'] for r in rows] == pytest.approx([peak * 8 * 127 / 10240, peak * 16 * 127 / 10240])
    assert rows[1]['wall_s'] >= rows[0]['wall_s']


def read_lines(path):
    with open(path, encoding='utf-8') as f:
        text = f.read()
    assert text.endswith('\n')
    return text[:-1].split('\n')


@pytest.mark.parametrize('key, predictions', [('v_dev', 'v.dev.predictions'), ('s_dev', 's.dev.predictions')])
def test_evaluate_dev(runs, key, predictions):
    r = ok(runs, key)
    lines = r.stdout.splitlines()
    assert lines[0].startswith('evaluate')
    matches = [re.fullmatch(r'Correct: (\d+\.\d+) out of 500\.0: (\d+(\.\d+)?)%', line) for line in lines]
    matches = [m for m in matches if m]
    assert len(matches) == 1, r.stdout
    correct, percent = float(matches[0].group(1)), float(matches[0].group(2))
    assert percent == pytest.approx(correct / 500 * 100)
    preds = read_lines(runs['dir'] / predictions)
    assert len(preds) == 500
    assert all(MASK_CHAR not in p for p in preds)
    with open(os.path.join(ROOT, 'birth_dev.tsv'), encoding='utf-8') as f:
        gold = [line.rstrip('\n').split('\t')[1] for line in f]
    assert sum(p == g for p, g in zip(preds, gold)) == correct


def test_evaluate_test_inputs(runs):
    r = ok(runs, 'v_test')
    path = str(runs['dir'] / 'v.test.predictions')
    assert f'Predictions written to {path}; no targets provided' in r.stdout.splitlines()
    assert 'Correct:' not in r.stdout
    assert len(read_lines(path)) == 437


def random_params(tmp_path):
    """A freshly initialised model (width 32) whose 500 dev predictions are varied (over 100 distinct),
    so a prediction given to the wrong question shows."""
    import model
    import run
    import utils
    with open(os.path.join(ROOT, 'wiki.txt'), encoding='utf-8') as f:
        vocab_size = len(set(f.read())) + 2
    utils.set_seed(1)
    gpt = model.GPT(model.GPTConfig(vocab_size, run.BLOCK_SIZE, n_layer=1, n_head=2, n_embd=32))
    path = tmp_path / 'random.params'
    torch.save(gpt.state_dict(), path)
    return path


def evaluate_in_process(tmp_path, params, lines, name, capsys):
    import run
    corpus = tmp_path / f'{name}.tsv'
    corpus.write_text(''.join(lines), encoding='utf-8')
    out = tmp_path / f'{name}.predictions'
    run.main([str(a) for a in ['evaluate', 'vanilla', os.path.join(ROOT, 'wiki.txt'), '--reading_params_path',
                               params, '--eval_corpus_path', corpus, '--outputs_path', out, '--n_layer', '1',
                               '--n_head', '2', '--n_embd', '32', '--device', 'cpu', '--quiet']])
    capsys.readouterr()
    return read_lines(out)


def test_evaluate_is_deterministic(tmp_path, capsys):
    """The same questions evaluated twice, twice in one file, and in another order (other batches): the same
    prediction for each question every time."""
    import random
    params = random_params(tmp_path)
    with open(os.path.join(ROOT, 'birth_dev.tsv'), encoding='utf-8') as f:
        lines = f.readlines()
    first = evaluate_in_process(tmp_path, params, lines, 'first', capsys)
    assert len(first) == 500 and len(set(first)) > 100
    assert evaluate_in_process(tmp_path, params, lines, 'again', capsys) == first
    assert evaluate_in_process(tmp_path, params, lines + lines, 'twice', capsys) == first + first
    order = list(range(500))
    random.Random(0).shuffle(order)
    shuffled = evaluate_in_process(tmp_path, params, [lines[i] for i in order], 'shuffled', capsys)
    assert shuffled == [first[i] for i in order]


def test_greedy_decode_gives_each_prompt_its_tokens_whatever_the_batches(tmp_path):
    """Prompts of mixed lengths, decoded in batches of 512 and of 7 and in another order: the same continuation
    for each prompt."""
    import random

    import model
    import utils
    utils.set_seed(1)
    gpt = model.GPT(model.GPTConfig(60, 128, n_layer=1, n_head=2, n_embd=32))
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 60) for _ in range(rng.randint(5, 40))] for _ in range(120)]
    whole = utils.greedy_decode(gpt, prompts, 20)
    assert len({tuple(c) for c in whole}) > 60
    order = list(range(len(prompts)))
    rng.shuffle(order)
    small = utils.greedy_decode(gpt, [prompts[i] for i in order], 20, batch_size=7)
    assert small == [whole[i] for i in order]


def test_help_documents_every_override(runs):
    import argparse

    import run
    r = ok(runs, 'help')
    text = r.stdout
    for word in ('pretrain', 'finetune', 'evaluate', 'vanilla', 'synthesizer'):
        assert word in text
    parser = run.build_parser()
    documented = {}
    for action in parser._actions:
        for flag in action.option_strings:
            documented[flag] = action.help
    for flag in ('--reading_params_path', '--writing_params_path', '--finetune_corpus_path', '--eval_corpus_path',
                 '--outputs_path', '--max_epochs', '--max_steps', '--batch_size', '--learning_rate',
                 '--n_layer', '--n_head', '--n_embd', '--seed', '--device', '--precision'):
        assert flag in documented, f'{flag} is not an option'
    for flag, help_text in documented.items():
        assert flag in text, f'{flag} missing from --help'
        if flag not in ('-h', '--help'):
            assert help_text and help_text != argparse.SUPPRESS and len(help_text) > 5, f'{flag} undocumented'
