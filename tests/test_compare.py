"""compare.py: Wilson interval, exact sign test, paired comparison, scoring and the table from prediction files."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, ROOT)
import compare  # noqa: E402

GPU = os.path.join(ROOT, 'docs', 'gpu_runs', 'h200-2026-11-28')


def test_wilson_42_of_500_by_hand():
    # p = 0.084, n = 500, z = 1.96: z^2 = 3.8416, z^2/n = 0.0076832
    # center = (p + z^2/2n) / (1 + z^2/n) = 0.0878416 / 1.0076832 = 0.0871718
    # half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2) = 1.96 / 1.0076832 * sqrt(0.000153888 + 0.0000038416)
    #      = 1.9450557 * 0.0125590 = 0.0244280
    # interval: 0.0627438 .. 0.1115998; the exact quantile z = 1.959964 moves both ends by under 1e-6
    assert compare.wilson(42, 500, z=1.96) == pytest.approx((0.0627438, 0.1115998), abs=2e-7)
    assert compare.wilson(42, 500) == pytest.approx((0.062744, 0.111600), abs=1e-6)


def test_wilson_edges_stay_inside_0_and_1():
    assert compare.wilson(0, 10)[0] == pytest.approx(0, abs=1e-12)
    assert compare.wilson(10, 10)[1] == pytest.approx(1, abs=1e-12)
    # z^2 / (n + z^2) at 1.96: the upper end for 0 of 10
    assert compare.wilson(0, 10, z=1.96)[1] == pytest.approx(3.8416 / 13.8416)


@pytest.mark.parametrize('wins, losses, p', [
    (0, 5, 2 / 32),           # both all-or-nothing tails of 5 fair coins
    (9, 1, 2 * 11 / 1024),    # P(X <= 1) for X ~ Bin(10, 1/2) is (1 + 10) / 1024
    (2, 0, 0.5),
    (3, 3, 1.0),
    (0, 0, 1.0),              # no discordant question: no evidence either way
    (4, 2, 2 * 22 / 64),      # P(X <= 2) for Bin(6, 1/2) = (1 + 6 + 15) / 64
])
def test_sign_test_known_cases(wins, losses, p):
    assert compare.sign_test(wins, losses) == pytest.approx(p, rel=1e-12)
    assert compare.sign_test(losses, wins) == pytest.approx(p, rel=1e-12)


def test_paired_with_one_seed_each_is_mcnemar_on_discordant_questions():
    a = [[True, True, True, False, False, True, True]]
    b = [[True, False, False, False, True, False, False]]
    # discordant: questions 1, 2, 5, 6 for A, question 4 for B; the concordant ones do not count
    assert compare.paired(a, b) == (4, 1, pytest.approx(2 * 6 / 32))


def test_paired_over_seeds_compares_each_questions_fraction_of_seeds():
    a = [[1, 1, 0, 0], [1, 0, 1, 0]]   # fractions 1, 1/2, 1/2, 0
    b = [[1, 1, 1, 0], [0, 0, 0, 1]]   # fractions 1/2, 1/2, 1/2, 1/2
    wins, losses, p = compare.paired(a, b)
    assert (wins, losses) == (1, 1) and p == 1.0
    b = [[1, 1, 1, 0], [0, 0, 1, 1]]   # fractions 1/2, 1/2, 1, 1/2
    assert compare.paired(a, b)[:2] == (1, 2)


def test_paired_with_unequal_seeds_compares_the_first_seeds_of_each():
    # Equally good groups: every run gets 10 of 500 questions right, each run its own 10. On fractions over
    # 3 seeds against 1, A would "win" its 30 questions against B's 10 (p = 0.002); on one seed each it is 10-10.
    runs = [[q // 10 == r for q in range(500)] for r in range(4)]
    a, b = runs[:3], runs[3:]
    assert compare.paired(a, b) == (10, 10, 1.0)
    assert compare.paired(b, a) == (10, 10, 1.0)
    assert compare.paired(a, runs[1:3]) == (10, 10, 1.0)   # runs 0, 1 against 1, 2
    assert '| A = three, B = one (first seed of each) | 10 | 10 | 1 |' in compare.paired_table({'three': a, 'one': b})


def test_mean_and_range():
    assert compare.mean_and_range([0.072, 0.084, 0.092, 0.086]) == pytest.approx((0.0835, 0.072, 0.092))


def test_score_compares_line_by_line_and_rejects_a_wrong_length(tmp_path):
    path = tmp_path / 'p.predictions'
    path.write_text('Paris\n\nLondon\n')
    assert compare.score(path, ['Paris', 'Rome', 'Lyon']) == [True, False, False]
    with pytest.raises(ValueError, match='has 3 predictions for 2 questions'):
        compare.score(path, ['Paris', 'Rome'])


def run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'compare.py'), *args],
                          capture_output=True, text=True, timeout=120)


def test_the_table_from_the_committed_gpu_predictions():
    seeds = [os.path.join(GPU, 'seed0'), os.path.join(GPU, 'seed1')]
    result = run('--group', 'vanilla', *(os.path.join(s, 'vanilla.pretrain.dev.predictions') for s in seeds),
                 '--group', 'synthesizer', *(os.path.join(s, 'synthesizer.pretrain.dev.predictions') for s in seeds))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # 123 + 110 and 57 + 63 correct of 1,000 (docs/gpu_runs/h200-2026-11-28/README.md)
    assert '| vanilla | 2 | 24.6%, 22.0% | 23.3% | 22.0% – 24.6% | 23.3% (233/1000) | 20.8% – 26.0% |' in lines
    assert '| synthesizer | 2 | 11.4%, 12.6% | 12.0% | 11.4% – 12.6% | 12.0% (120/1000) | 10.1% – 14.2% |' in lines
    assert '| London baseline (always "London") | — | 5.0% | 5.0% | — | 5.0% (25/500) | 3.4% – 7.3% |' in lines
    # vanilla right more often on 130 questions, the synthesizer on 47: 2 * P(Bin(177, 1/2) <= 47)
    assert '| A = vanilla, B = synthesizer | 130 | 47 | 3.4e-10 |' in lines


@pytest.mark.parametrize('args, message', [
    (['--group', 'vanilla', 'no/such.predictions'], 'no/such.predictions'),
    (['--group', 'vanilla'], 'names no predictions file'),
    (['--group', 'v', os.path.join(ROOT, 'birth_dev.tsv'), '--group', 'v', os.path.join(ROOT, 'birth_dev.tsv')],
     'given twice'),
    (['--group', 'v', os.path.join(ROOT, 'birth_test_inputs.tsv')], 'has 437 predictions for 500 questions'),
    (['--group', 'v', os.path.join(ROOT, 'birth_test_inputs.tsv'), '--gold',
      os.path.join(ROOT, 'birth_test_inputs.tsv')], 'no gold places'),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(args, message):
    result = run(*args)
    assert result.returncode != 0 and result.stdout == ''
    assert result.stderr.count('\n') == 1 and 'Traceback' not in result.stderr
    assert result.stderr.startswith('compare.py: error: ') and message in result.stderr


def test_the_pipeline_comparison_table_from_the_gpu_runs_laid_out_as_pipeline_writes_them(tmp_path):
    import shutil
    for seed in (0, 1):
        shutil.copytree(os.path.join(GPU, f'seed{seed}'), tmp_path / f'seed{seed}')
    lines = compare.comparison(str(tmp_path), ['vanilla', 'synthesizer'], [0, 1])
    # no metrics files were committed: no step times
    assert ('| vanilla, pretrain + finetune | 2 | 24.6%, 22.0% | 23.3% | 22.0% – 24.6% | 23.3% (233/1000) '
            '| 20.8% – 26.0% | 437 | — | at least 10% dev (2021) |') in lines
    assert ('| synthesizer, pretrain + finetune | 2 | 11.4%, 12.6% | 12.0% | 11.4% – 12.6% | 12.0% (120/1000) '
            '| 10.1% – 14.2% | 437 | — | at least 5% test (2021) |') in lines
    assert ('| vanilla, no pretraining | 2 | 2.2%, 0.8% | 1.5% | 0.8% – 2.2% | 1.5% (15/1000) | 0.9% – 2.5% '
            '| 437 | — | well below 10% dev |') in lines
    assert '| A = vanilla, B = synthesizer | 130 | 47 | 3.4e-10 |' in lines
    assert len([line for line in lines if line.startswith('| A = ')]) == 3
    # the same runs read as the 2024 recipe's: vanilla's bar is that year's
    lines_2024 = compare.comparison(str(tmp_path), ['vanilla', 'synthesizer'], [0, 1], 'faithful-2024')
    assert [line.rsplit('|', 2)[1] for line in lines_2024 if line.startswith('| vanilla, pretrain')] == \
        [' at least 15% dev (2024) ']
    assert [a for a, b in zip(lines, lines_2024) if a != b] == [lines[2]]
