"""Recipes: the faithful settings are the defaults, overrides and --recipe laptop change only what they name;
the metrics file a run writes can be plotted."""
import json
import os
import subprocess
import sys

import pytest
import torch

import run
from conftest import TINY, WIKI, call, tiny_params, write

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
CPU, N_DOCS = torch.device('cpu'), 2937


def settings(argv):
    args = run.build_parser().parse_args(argv)
    return run.settings_for(args, N_DOCS, CPU)


def test_faithful_is_the_default_and_matches_the_assignment():
    model_settings, pretrain = settings(['pretrain', 'vanilla', 'wiki.txt', '--writing_params_path', 'p'])
    assert model_settings == dict(n_layer=4, n_head=8, n_embd=256)
    assert (pretrain['max_epochs'], pretrain['batch_size'], pretrain['learning_rate']) == (650, 128, 6e-3)
    assert pretrain['lr_decay'] and pretrain['warmup_tokens'] == 512 * 20
    assert pretrain['final_tokens'] == 200 * N_DOCS * 128
    _, scratch = settings(['finetune', 'vanilla', 'wiki.txt', '--writing_params_path', 'p',
                           '--finetune_corpus_path', 'f'])
    assert (scratch['max_epochs'], scratch['batch_size'], scratch['learning_rate']) == (75, 256, 6e-4)
    _, after = settings(['finetune', 'vanilla', 'wiki.txt', '--reading_params_path', 'r',
                         '--writing_params_path', 'p', '--finetune_corpus_path', 'f'])
    assert after['max_epochs'] == 10 and after['learning_rate'] == 6e-4
    assert 'precision' not in pretrain  # fp32, the TrainerConfig default


def test_laptop_recipe_changes_only_where_it_says():
    faithful_model, faithful_pretrain = settings(['pretrain', 'vanilla', 'wiki.txt', '--writing_params_path', 'p'])
    model_settings, pretrain = settings(['pretrain', 'vanilla', 'wiki.txt', '--writing_params_path', 'p',
                                         '--recipe', 'laptop'])
    assert model_settings == dict(n_layer=4, n_head=4, n_embd=128, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    assert pretrain == dict(faithful_pretrain, max_epochs=150, warmup_tokens=100 * 128 * 127, first_step_lr='scheduled',
                            final_tokens=150 * N_DOCS * 127, precision='auto', batching='stratified',
                            optimizer='muon', lr_floor=0.0)
    assert 'first_step_lr' not in faithful_pretrain  # the original: the trainer's default, 'full'
    for function_args, changed in ((['--finetune_corpus_path', 'f'], {}),
                                   (['--finetune_corpus_path', 'f', '--reading_params_path', 'r'],
                                    dict(max_epochs=5, final_tokens=5 * N_DOCS * 127))):  # a cosine ending with it
        argv = ['finetune', 'vanilla', 'wiki.txt', '--writing_params_path', 'p'] + function_args
        _, faithful = settings(argv)
        assert settings(argv + ['--recipe', 'laptop'])[1] == dict(faithful, precision='auto', **changed)


def test_laptop_recipe_pretrains_the_synthesizer_longer_on_random_batches_and_finetunes_it_at_the_faithful_rate():
    vanilla_model, vanilla = settings(['pretrain', 'vanilla', 'wiki.txt', '--writing_params_path', 'p',
                                       '--recipe', 'laptop'])
    synth_model, synth = settings(['pretrain', 'synthesizer', 'wiki.txt', '--writing_params_path', 'p',
                                   '--recipe', 'laptop'])
    assert synth_model == vanilla_model
    adamw = {k: v for k, v in vanilla.items() if k not in ('optimizer', 'lr_floor')}  # vanilla's, less Muon and floor
    assert synth == dict(adamw, max_epochs=320, final_tokens=320 * N_DOCS * 127, batching='random')
    _, shorter = settings(['pretrain', 'synthesizer', 'wiki.txt', '--writing_params_path', 'p', '--recipe', 'laptop',
                           '--max_epochs', '150'])
    assert shorter == dict(adamw, batching='random')  # its batches stay random, not stratified
    argv = ['finetune', '{}', 'wiki.txt', '--writing_params_path', 'p', '--finetune_corpus_path', 'f',
            '--reading_params_path', 'r', '--recipe', 'laptop']
    _, vanilla_after = settings([a.format('vanilla') for a in argv])
    _, synth_after = settings([a.format('synthesizer') for a in argv])
    assert synth_after == dict(vanilla_after, max_epochs=10, final_tokens=200 * N_DOCS * 128)  # the faithful rate
    _, faithful_synth = settings(['pretrain', 'synthesizer', 'wiki.txt', '--writing_params_path', 'p'])
    assert faithful_synth['max_epochs'] == 650


def test_laptop_cosine_ends_with_the_run_and_the_faithful_one_does_not():
    _, laptop = settings(['pretrain', 'vanilla', 'wiki.txt', '--writing_params_path', 'p', '--recipe', 'laptop',
                          '--max_epochs', '40'])
    assert laptop['max_epochs'] == 40 and laptop['final_tokens'] == 40 * N_DOCS * 127
    _, faithful = settings(['pretrain', 'vanilla', 'wiki.txt', '--writing_params_path', 'p', '--max_epochs', '40'])
    assert faithful['final_tokens'] == 200 * N_DOCS * 128


def test_laptop_finetuning_of_a_pretrained_model_ends_its_cosine_with_the_run():
    finetune = ['finetune', 'vanilla', 'wiki.txt', '--writing_params_path', 'p', '--finetune_corpus_path', 'f',
                '--recipe', 'laptop']
    after = run.settings_for(run.build_parser().parse_args(finetune + ['--reading_params_path', 'r']), N_DOCS,
                             CPU, n_examples=2000)[1]
    assert after['max_epochs'] == 5 and after['final_tokens'] == 5 * 2000 * 127
    shorter = run.settings_for(run.build_parser().parse_args(finetune + ['--reading_params_path', 'r',
                                                                         '--max_epochs', '4']), N_DOCS, CPU, 2000)[1]
    assert shorter['final_tokens'] == 4 * 2000 * 127
    scratch = run.settings_for(run.build_parser().parse_args(finetune), N_DOCS, CPU, n_examples=2000)[1]
    assert scratch['final_tokens'] == 200 * N_DOCS * 128  # the faithful finetuning from scratch
    faithful = finetune[:-2] + ['--reading_params_path', 'r']
    assert run.settings_for(run.build_parser().parse_args(faithful), N_DOCS, CPU, 2000)[1]['final_tokens'] == \
        200 * N_DOCS * 128


def test_a_laptop_finetuning_counts_the_examples_of_its_own_file(tmp_path, capsys, wiki_vocab):
    tsv = write(tmp_path / 'train.tsv', ''.join(f'Where was Person {i} born?\tLondon\n' for i in range(37)))
    params = tiny_params(tmp_path, wiki_vocab.vocab_size)
    code, out, err = call(['finetune', 'vanilla', WIKI, '--recipe', 'laptop', '--reading_params_path', params,
                           '--writing_params_path', tmp_path / 'ft.params', '--finetune_corpus_path', tsv] + TINY,
                          capsys)
    assert code == 0, err
    assert f' final_tokens={5 * 37 * 127} ' in out


def test_overrides_touch_only_their_setting():
    base_model, base_train = settings(['pretrain', 'synthesizer', 'wiki.txt', '--writing_params_path', 'p'])
    model_settings, train_settings = settings(['pretrain', 'synthesizer', 'wiki.txt', '--writing_params_path', 'p',
                                               '--n_embd', '64', '--learning_rate', '1e-3', '--dropout', '0',
                                               '--weight_decay', '0', '--batching', 'stratified',
                                               '--weight_decay_on', 'matrices'])
    assert model_settings == dict(base_model, n_embd=64, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    assert train_settings == dict(base_train, learning_rate=1e-3, weight_decay=0.0, batching='stratified',
                                  weight_decay_on='matrices')


def test_metrics_are_plotted(tmp_path):
    pytest.importorskip('matplotlib')
    metrics = tmp_path / 'a.params.metrics.jsonl'
    with open(metrics, 'w') as f:
        for step in range(1, 30):
            f.write(json.dumps({'step': step, 'epoch': 1 + step // 10, 'tokens': step * 100, 'loss': 5.0 / step,
                                'lr': 1e-3, 'tokens_per_s': 1000.0, 'wall_s': step * 0.5}) + '\n')
    png = tmp_path / 'loss.png'
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'plot_metrics.py'), str(metrics), str(metrics),
                             '--output', str(png), '--x', 'wall_s'], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert not list(tmp_path.glob('*.tmp.png'))
    missing = subprocess.run([sys.executable, os.path.join(ROOT, 'plot_metrics.py'), str(tmp_path / 'nope.jsonl'),
                              '--output', str(png)], capture_output=True, text=True)
    assert missing.returncode != 0 and 'no metrics file' in missing.stderr and 'Traceback' not in missing.stderr


def test_a_new_variant_or_recipe_is_one_entry(monkeypatch):
    """A variant is an entry in recipes.VARIANTS (and, where it trains differently, in a recipe's 'variants')."""
    import recipes
    monkeypatch.setitem(recipes.VARIANTS, 'wide', {'synthesizer': True})
    laptop = dict(recipes.LAPTOP, variants={'wide': {'model': dict(n_embd=64), 'pretrain': dict(max_epochs=5)}})
    monkeypatch.setitem(recipes.RECIPES, 'mine', laptop)
    model_settings, pretrain = recipes.settings('mine', 'wide', 'pretrain', N_DOCS, CPU)
    assert model_settings == dict(recipes.LAPTOP['model'], n_embd=64)
    assert pretrain['max_epochs'] == 5 and pretrain['final_tokens'] == 5 * N_DOCS * 127
    assert 'wide' in run.build_parser().parse_args(['pretrain', 'wide', 'wiki.txt']).variant
    assert (pretrain['num_workers'], pretrain['chunks']) == (0, 4)  # recipes.device_settings, after the table
    assert recipes.device_settings(torch.device('cuda')) == dict(num_workers=4, chunks=1)
