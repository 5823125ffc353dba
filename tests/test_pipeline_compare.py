"""pipeline.py --variants/--seeds: every (variant, seed) sequence and no pretraining per seed, two jobs, one table.

One tiny comparison (two variants, two seeds, two jobs) is shared by the
tests that look at its outputs.
"""
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, ROOT)
import compare  # noqa: E402
import pipeline  # noqa: E402
from conftest import PIPELINE_OUTPUTS as PER_SEED  # noqa: E402
from conftest import PIPELINE_TINY as TINY  # noqa: E402
from conftest import run_pipeline  # noqa: E402


@pytest.fixture(scope='module')
def two_seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp('comparison') / 'out'
    first = run_pipeline('--outdir', str(out), '--jobs', '2', '--variants', 'vanilla,synthesizer', '--seeds', '0,1',
                         '--', *TINY)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return out, first


def test_every_variant_and_seed_runs_in_its_folder_with_its_seed(two_seeds):
    out, first = two_seeds
    assert '2 sequences at a time' in first.stdout
    for seed in (0, 1):
        for name in PER_SEED:
            assert (out / f'seed{seed}' / name).is_file(), f'seed{seed}/{name}'
        for log in ('vanilla-nopretrain.log', 'vanilla-pretrain.log', 'synthesizer-pretrain.log'):
            text = (out / f'seed{seed}' / 'logs' / log).read_text()
            assert text.count(f' --seed {seed} --recipe laptop --max_steps 2') == text.count('\n$ ') > 0
    assert (out / 'logs' / 'london.log').is_file() and not (out / 'seed0' / 'logs' / 'london.log').exists()
    # the seed reaches the run: the two seeds' params differ
    assert (out / 'seed0' / 'vanilla.pretrain.params').read_bytes() != (out / 'seed1' / 'vanilla.pretrain.params'
                                                                       ).read_bytes()


def test_results_have_one_row_per_variant_with_intervals_and_the_paired_tests(two_seeds):
    out, first = two_seeds
    text = (out / 'results.md').read_text()
    assert text.startswith('# Comparison: laptop recipe, seeds 0, 1\n') and 'machine: no GPU; CPU ' in text
    rows = {line.split(' | ')[0][2:]: line.strip('|').split(' | ') for line in text.splitlines()
            if line.startswith('| ') and ' | ' in line and not line.startswith(('| run ', '| paired', '|---'))}
    assert list(rows)[:4] == ['vanilla, pretrain + finetune', 'synthesizer, pretrain + finetune',
                              'vanilla, no pretraining', 'London baseline (always "London")']
    gold = [line.rstrip('\n').split('\t')[1] for line in open(os.path.join(ROOT, 'birth_dev.tsv'))]
    for variant, label in (('vanilla', 'vanilla, pretrain + finetune'),
                           ('synthesizer', 'synthesizer, pretrain + finetune')):
        scores = [compare.score(out / f'seed{s}' / f'{variant}.pretrain.dev.predictions', gold) for s in (0, 1)]
        correct = sum(map(sum, scores))
        low, high = compare.wilson(correct, 1000)
        cells = [cell.strip() for cell in rows[label]]
        assert cells[1] == '2' and cells[5] == f'{correct / 10:.1f}% ({correct}/1000)'
        assert cells[6] == f'{100 * low:.1f}% – {100 * high:.1f}%'
        assert cells[7] == '437' and cells[8].startswith('pretrain ') and ', finetune ' in cells[8]
    assert rows['vanilla, pretrain + finetune'][-1].strip() == 'at least 10% dev (2021)'
    assert rows['synthesizer, pretrain + finetune'][-1].strip() == 'at least 5% test (2021)'
    assert rows['London baseline (always "London")'][5].strip() == '5.0% (25/500)'
    assert '| A = vanilla, B = synthesizer |' in text and '| A = synthesizer, B = no pretraining |' in text
    assert 'Wilson score 95% interval on the pooled count' in text
    commands = [line for line in text.split('```')[1].splitlines() if line and not line.startswith('#')]
    assert len(commands) == 1 + 2 * 11  # London once, eleven run.py steps per seed
    assert '| vanilla, no pretraining |' in first.stdout and f'Results written to {out / "results.md"}' in first.stdout


def test_the_curves_and_the_attention_picture_are_drawn(two_seeds):
    pytest.importorskip('matplotlib')
    out, first = two_seeds
    assert (out / 'pretrain_loss.png').read_bytes()[:4] == b'\x89PNG'
    assert (out / 'attention.png').read_bytes()[:4] == b'\x89PNG'
    assert f'Attention maps written to {out / "attention.png"}' in first.stdout


def test_a_second_run_skips_every_step_and_keeps_the_results(two_seeds):
    out, _ = two_seeds
    before = (out / 'results.md').read_text()
    again = run_pipeline('--outdir', str(out), '--jobs', '2', '--variants', 'vanilla,synthesizer', '--seeds', '0,1',
                         '--', *TINY)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count('[skip]') == 2 * len(PER_SEED) and '[run]' not in again.stdout
    assert 'left as it was' in again.stdout and (out / 'results.md').read_text() == before
    assert '| synthesizer, pretrain + finetune | 2 |' in again.stdout


def test_the_sequences_of_a_comparison(tmp_path):
    seqs = pipeline.comparison(str(tmp_path), ['synthesizer'], [3, 5])
    assert [seq.key for seq in seqs] == ['london', 'no-pretrain/seed3', 'synthesizer/seed3', 'no-pretrain/seed5',
                                         'synthesizer/seed5']
    step = seqs[2].steps[0]
    assert step.name == 'synthesizer: pretrain (seed 3)' and step.args[-2:] == ['--seed', '3']
    assert step.output == str(tmp_path / 'seed3' / 'synthesizer.pretrain.params')
    # the default run is untouched: no --seed, no seed folders
    assert all('--seed' not in (s.args or []) for seq in pipeline.sequences(str(tmp_path)) for s in seq.steps)


@pytest.mark.parametrize('args, message', [
    (['--variants', 'vanilla,transformer'], "argument --variants: 'transformer' is not a variant src/run.py accepts"),
    (['--variants', 'vanilla,vanilla'], 'names a variant twice'),
    (['--seeds', '0,x'], "argument --seeds: '0,x' is not a comma-separated list of whole numbers"),
    (['--seeds', '1,1'], 'each once'),
    (['--seeds', '-1'], 'seeds are whole numbers from 0'),
    (['--seeds', '0,1', '--', '--seed', '3'], '--seed among the run.py flags'),
])
def test_bad_variants_or_seeds_are_one_line_usage_errors(args, message, tmp_path):
    result = run_pipeline('--outdir', str(tmp_path / 'out'), *args)
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr.count('\n') == 1 and result.stderr.startswith('pipeline.py: error: ')
    assert message in result.stderr
    assert not (tmp_path / 'out').exists()
