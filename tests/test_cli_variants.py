"""`python src/run.py` with the later years' variants: perceiver (2023) and rope (2024), end to end, tiny.

Each chain pretrains, finetunes and evaluates a tiny model on CPU; the
other tests give the command line wrong params or a bad --bottleneck_dim
and expect one line on stderr and a non-zero exit.
"""
import threading

import pytest
import torch
from test_cli import N_DOCS, TINY, ok, recipe_items, run_cli

pytestmark = pytest.mark.usefixtures('single_thread')

TINY_VARIANT = TINY + ['--n_layer', '3']  # the perceiver needs a down and an up block


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp('cli_variants')
    p = lambda name: str(out / name)  # noqa: E731
    results = {'dir': out}

    def chain(variant, extra):
        steps = [
            ('pretrain', ['pretrain', variant, 'wiki.txt', '--writing_params_path', p(f'{variant}.pretrain.params')]),
            ('finetune', ['finetune', variant, 'wiki.txt', '--reading_params_path', p(f'{variant}.pretrain.params'),
                          '--writing_params_path', p(f'{variant}.finetune.params'),
                          '--finetune_corpus_path', 'birth_places_train.tsv']),
            ('dev', ['evaluate', variant, 'wiki.txt', '--reading_params_path', p(f'{variant}.finetune.params'),
                     '--eval_corpus_path', 'birth_dev.tsv', '--outputs_path', p(f'{variant}.dev.predictions')]),
        ]
        for key, args in steps:
            results[variant, key] = run_cli(args + TINY_VARIANT + extra)
            if results[variant, key].returncode != 0:
                return

    threads = [threading.Thread(target=chain, args=('perceiver', ['--bottleneck_dim', '8'])),
               threading.Thread(target=chain, args=('rope', []))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_perceiver_pipeline(runs):
    items = recipe_items(ok(runs, ('perceiver', 'pretrain')).stdout.splitlines()[0])
    assert items['bottleneck_dim'] == '8'
    assert float(items['final_tokens']) == 200 * N_DOCS * 128  # the 2023 schedule: 2021's
    ok(runs, ('perceiver', 'finetune'))
    assert 'Correct:' in ok(runs, ('perceiver', 'dev')).stdout
    state = torch.load(runs['dir'] / 'perceiver.finetune.params', weights_only=True)
    assert state['down_block.C'].shape == (1, 8, 16) and 'up_block.attn.query.weight' in state
    assert state['blocks.0.attn.mask'].shape == (1, 1, 8, 8) and 'blocks.1.attn.mask' not in state
    with open(runs['dir'] / 'perceiver.dev.predictions', encoding='utf-8') as f:
        assert len(f.read().splitlines()) == 500


def test_rope_pipeline(runs):
    items = recipe_items(ok(runs, ('rope', 'pretrain')).stdout.splitlines()[0])
    assert 'bottleneck_dim' not in items
    assert float(items['final_tokens']) == 650 * N_DOCS * 128  # the 2024 schedule
    ok(runs, ('rope', 'finetune'))
    assert 'Correct:' in ok(runs, ('rope', 'dev')).stdout
    state = torch.load(runs['dir'] / 'rope.finetune.params', weights_only=True)
    assert 'pos_emb' not in state and state['blocks.2.attn.rope_cache'].shape == (128, 4, 2)


def one_line_error(result, code, *words):
    assert result.returncode == code, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize('held, variant', [('perceiver', 'vanilla'), ('rope', 'vanilla'), ('perceiver', 'rope'),
                                           ('rope', 'perceiver')])
def test_params_of_another_variant(runs, held, variant):
    params = str(runs['dir'] / f'{held}.finetune.params')
    ok(runs, (held, 'finetune'))
    result = run_cli(['evaluate', variant, 'wiki.txt', '--reading_params_path', params, '--eval_corpus_path',
                      'birth_dev.tsv', '--outputs_path', str(runs['dir'] / 'wrong.predictions')] + TINY_VARIANT)
    one_line_error(result, 1, f'holds {held} params', f'the variant is {variant}')


def test_vanilla_params_are_not_rope_params(tmp_path):
    result = run_cli(['pretrain', 'vanilla', 'wiki.txt', '--writing_params_path', str(tmp_path / 'v.params')] + TINY)
    assert result.returncode == 0, result.stderr
    result = run_cli(['evaluate', 'rope', 'wiki.txt', '--reading_params_path', str(tmp_path / 'v.params'),
                      '--eval_corpus_path', 'birth_dev.tsv', '--outputs_path', str(tmp_path / 'p')] + TINY)
    one_line_error(result, 1, 'holds vanilla params', 'the variant is rope')


def test_perceiver_params_need_their_bottleneck(runs):
    ok(runs, ('perceiver', 'finetune'))
    result = run_cli(['evaluate', 'perceiver', 'wiki.txt', '--reading_params_path',
                      str(runs['dir'] / 'perceiver.finetune.params'), '--eval_corpus_path', 'birth_dev.tsv',
                      '--outputs_path', str(runs['dir'] / 'wrong.predictions')] + TINY_VARIANT)
    one_line_error(result, 1, '--bottleneck_dim 8')


@pytest.mark.parametrize('value', ['0', '-3', '129'])
def test_bad_bottleneck_dim(tmp_path, value):
    result = run_cli(['pretrain', 'perceiver', 'wiki.txt', '--writing_params_path', str(tmp_path / 'p.params'),
                      '--bottleneck_dim', value] + TINY_VARIANT)
    one_line_error(result, 2, '--bottleneck_dim', value)
    assert not (tmp_path / 'p.params').exists()


def test_bottleneck_dim_is_for_the_perceiver_only(tmp_path):
    result = run_cli(['pretrain', 'vanilla', 'wiki.txt', '--writing_params_path', str(tmp_path / 'p.params'),
                      '--bottleneck_dim', '16'] + TINY)
    one_line_error(result, 2, '--bottleneck_dim', 'perceiver')


def test_perceiver_needs_two_layers(tmp_path):
    result = run_cli(['pretrain', 'perceiver', 'wiki.txt', '--writing_params_path', str(tmp_path / 'p.params')]
                     + TINY + ['--n_layer', '1'])
    one_line_error(result, 2, '--n_layer', 'perceiver')


# --- the recipes of the variants' years ---------------------------------------------

def settings(argv):
    import run
    return run.settings_for(run.build_parser().parse_args(argv), N_DOCS, torch.device('cpu'))


def test_each_variant_defaults_to_its_years_recipe():
    pretrain = ['pretrain', '{}', 'wiki.txt', '--writing_params_path', 'p']
    vanilla_model, vanilla = settings([a.format('vanilla') for a in pretrain])
    perceiver_model, perceiver = settings([a.format('perceiver') for a in pretrain])
    rope_model, rope = settings([a.format('rope') for a in pretrain])
    assert perceiver_model == dict(vanilla_model, bottleneck_dim=64) and perceiver == vanilla  # 2023: 2021's
    assert rope_model == vanilla_model
    assert rope == dict(vanilla, final_tokens=650 * N_DOCS * 128)  # 2024: the cosine spans the 650 epochs
    assert settings([a.format('perceiver') for a in pretrain] + ['--bottleneck_dim', '64'])[0]['bottleneck_dim'] == 64
    finetune = ['finetune', '{}', 'wiki.txt', '--writing_params_path', 'p', '--finetune_corpus_path', 'f']
    for variant in ('perceiver', 'rope'):  # finetuning as in 2021, both with and without pretrained params
        for extra in ([], ['--reading_params_path', 'r']):
            assert settings([a.format(variant) for a in finetune] + extra)[1] == \
                settings([a.format('vanilla') for a in finetune] + extra)[1]


def test_the_2024_recipe_gives_vanilla_ropes_schedule():
    argv = ['pretrain', '{}', 'wiki.txt', '--writing_params_path', 'p']
    _, vanilla_2024 = settings([a.format('vanilla') for a in argv] + ['--recipe', 'faithful-2024'])
    _, rope = settings([a.format('rope') for a in argv])
    assert vanilla_2024 == rope and vanilla_2024['final_tokens'] == 650 * N_DOCS * 128
    _, rope_2024 = settings([a.format('rope') for a in argv] + ['--recipe', 'faithful-2024'])
    assert rope_2024 == rope


def test_laptop_recipe_of_the_variants():
    argv = ['pretrain', '{}', 'wiki.txt', '--writing_params_path', 'p', '--recipe', 'laptop']
    vanilla_model, vanilla = settings([a.format('vanilla') for a in argv])
    assert (vanilla['optimizer'], vanilla['max_epochs']) == ('muon', 150)
    for variant in ('perceiver', 'rope'):
        model_settings, pretrain = settings([a.format(variant) for a in argv])
        assert pretrain == dict({k: v for k, v in vanilla.items() if k not in ('optimizer', 'lr_floor')},
                                max_epochs=230, final_tokens=230 * N_DOCS * 127)  # AdamW, 230 epochs
        assert model_settings == (dict(vanilla_model, bottleneck_dim=64) if variant == 'perceiver' else vanilla_model)
    finetune = ['finetune', '{}', 'wiki.txt', '--writing_params_path', 'p', '--finetune_corpus_path', 'f',
                '--reading_params_path', 'r', '--recipe', 'laptop']
    cosine_ends = {variant: settings([a.format(variant) for a in finetune])[1]['final_tokens']
                   for variant in ('vanilla', 'rope', 'perceiver', 'synthesizer')}
    assert cosine_ends == dict(vanilla=5 * N_DOCS * 127, rope=10 * N_DOCS * 127,  # ends with the run
                               perceiver=200 * N_DOCS * 128, synthesizer=200 * N_DOCS * 128)  # the faithful one
