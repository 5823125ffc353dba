"""Compare variants from their dev predictions: mean and range over seeds, a 95% interval, a paired test.

The table of `pipeline.py --variants ... --seeds ...` (write_results), and the same from any predictions:

    python compare.py --group vanilla docs/laptop_predictions/vanilla.seed*.dev.predictions \
        --group synthesizer docs/laptop_predictions/synthesizer.seed*.dev.predictions

Each --group is a label and one predictions file per seed, scored against the
gold places of --gold (default birth_dev.tsv). It prints a markdown table, one
row per group and one for always answering "London":
- mean and range of the per-seed accuracies;
- the pooled count (every seed's questions together) with its Wilson score
  95% interval. Pooling treats the seeds' answers as independent draws, so
  the interval is a little narrower than one that also modelled how the
  same question tends to be right or wrong in every seed.
Then a paired test for every two groups, on the same questions: per
question, the fraction of each group's seeds that got it right; a question
counts for the group with the higher fraction; the exact two-sided sign test
on those counts says how likely a split at least that uneven would be if the
two were equally good. With one seed per group this is the exact McNemar test.
Groups with unequal numbers of seeds are compared on their first k seeds
each, k the smaller number: a fraction over more seeds is above zero on more
of the questions that few runs get right, so an equally good group with more
seeds would win most of them.
"""
import argparse
import itertools
import math
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, 'src'))
import report  # noqa: E402
import utils  # noqa: E402

Z95 = statistics.NormalDist().inv_cdf(0.975)  # 1.95996...


def wilson(correct, total, z=Z95):
    """The Wilson score interval (low, high) for `correct` successes out of `total`."""
    p = correct / total
    shrink = 1 + z * z / total
    center = (p + z * z / (2 * total)) / shrink
    half = z / shrink * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return center - half, center + half


def sign_test(wins, losses):
    """Exact two-sided p-value of `wins` against `losses` when each is equally likely (ties left out)."""
    n, k = wins + losses, min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def mean_and_range(values):
    """(mean, lowest, highest) of a non-empty list."""
    return statistics.fmean(values), min(values), max(values)


def score(predictions_path, gold):
    """Whether each line of a predictions file equals the gold place of the same line (a list of bools)."""
    with open(predictions_path, encoding='utf-8') as f:
        predictions = [line.rstrip('\n') for line in f]
    if len(predictions) != len(gold):
        raise ValueError(f'{predictions_path} has {len(predictions)} predictions for {len(gold)} questions')
    return [p == g for p, g in zip(predictions, gold)]


def paired(a, b):
    """(questions A does better on, questions B does better on, p) for per-seed score lists of both groups.

    Only the first min(len(a), len(b)) seeds of each count: the sign test needs the two fractions drawn alike.
    """
    a, b = a[:len(b)], b[:len(a)]
    a_frac = [sum(seed[i] for seed in a) / len(a) for i in range(len(a[0]))]
    b_frac = [sum(seed[i] for seed in b) / len(b) for i in range(len(b[0]))]
    wins = sum(x > y for x, y in zip(a_frac, b_frac))
    losses = sum(y > x for x, y in zip(a_frac, b_frac))
    return wins, losses, sign_test(wins, losses)


def percent(x):
    return f'{100 * x:.1f}%'


COLUMNS = ['seeds', 'dev accuracy per seed', 'mean', 'range', 'pooled', 'Wilson 95% interval (pooled)']


def cells(scores):
    """The COLUMNS of a group's per-seed score lists, as text."""
    accuracies = [sum(s) / len(s) for s in scores]
    mean, low, high = mean_and_range(accuracies)
    correct, total = sum(map(sum, scores)), sum(map(len, scores))
    lo, hi = wilson(correct, total)
    return [str(len(scores)), ', '.join(map(percent, accuracies)), percent(mean),
            f'{percent(low)} – {percent(high)}' if len(scores) > 1 else '—',
            f'{percent(correct / total)} ({correct}/{total})', f'{percent(lo)} – {percent(hi)}']


def london(gold):
    """The COLUMNS of always answering "London" (no seeds)."""
    return ['—'] + cells([[g == 'London' for g in gold]])[1:]


def markdown(header, rows):
    """A markdown table, as lines."""
    return ['| ' + ' | '.join(header) + ' |', '|---' * len(header) + '|'] + ['| ' + ' | '.join(r) + ' |' for r in rows]


def paired_table(groups):
    """The paired test between every two of {label: [per-seed score lists]}, as markdown lines."""
    rows = []
    for (a, sa), (b, sb) in itertools.combinations(groups.items(), 2):
        wins, losses, p = paired(sa, sb)
        k = min(len(sa), len(sb))
        seeds = '' if len(sa) == len(sb) else ' (first seed of each)' if k == 1 else f' (first {k} seeds of each)'
        rows.append([f'A = {a}, B = {b}{seeds}', str(wins), str(losses), f'{p:.2g}'])
    return markdown(['paired test (same questions)', 'A better', 'B better', 'exact sign test, two-sided p'], rows)


def table(groups, gold):
    """The markdown table and the paired tests for {label: [per-seed score lists]}, as lines."""
    rows = [[label] + cells(scores) for label, scores in groups.items()]
    rows.append(['London baseline (always "London")'] + london(gold))
    return markdown(['run'] + COLUMNS, rows) + [''] + paired_table(groups)


# ---- the results of pipeline.py --variants/--seeds ------------------------------------------------------------

# Each variant's bar in the handout of the year that set it.
EXPECTS = {'vanilla': 'at least 10% dev (2021)', 'synthesizer': 'at least 5% test (2021)',
           'perceiver': 'at least 6% dev (2023)', 'rope': 'at least 30% test (2024)'}
EXPECTS_2024 = dict(EXPECTS, vanilla='at least 15% dev (2024)')  # that year's handout raised vanilla's bar
NOTE = ("Mean and range: over the seeds' dev accuracies. Interval: the Wilson score 95% interval on the pooled "
        "count (every seed's questions together, taken as independent draws). Paired test: per question, the "
        "fraction of each run's seeds that answered it right; a question counts for the run with the higher "
        "fraction; the exact two-sided sign test on those counts (with one seed each, the exact McNemar test; "
        "runs with unequal numbers of seeds are compared on the first seeds of each, as many as the smaller has). "
        "Wall time per step: each run's median time between consecutive optimizer steps in its metrics file, "
        "then the median over seeds (runs that shared the machine share its time).")


def per_seed(out, seeds, name):
    """OUT/seedN/NAME for each seed."""
    return [os.path.join(out, f'seed{seed}', name) for seed in seeds]


def step_times(out, seeds, stages):
    """'pretrain 12.3 ms, finetune 4.5 ms': for each (stage, params file name), the median over seeds."""
    times = []
    for stage, params in stages:
        medians = [report.step_time(report.read_metrics(path + '.metrics.jsonl'))
                   for path in per_seed(out, seeds, params)]
        medians = [ms for ms in medians if ms is not None]
        if medians:
            times.append(f'{stage} {statistics.median(medians):.1f} ms')
    return ', '.join(times) or '—'


def comparison(out, variants, seeds, recipe='faithful'):
    """The table and the paired tests of a pipeline.py --variants/--seeds run in OUT, as markdown lines."""
    bars = EXPECTS_2024 if recipe == 'faithful-2024' else EXPECTS
    gold = utils.read_gold_places(os.path.join(ROOT, report.DEV))
    runs = [(v, f'{v}, pretrain + finetune', f'{v}.pretrain',
             [('pretrain', f'{v}.pretrain.params'), ('finetune', f'{v}.finetune.params')], bars.get(v, '—'))
            for v in variants]
    runs.append(('no pretraining', 'vanilla, no pretraining', 'vanilla.nopretrain',
                 [('finetune', 'vanilla.model.params')], 'well below 10% dev'))
    groups, rows = {}, []
    for key, label, prefix, stages, expects in runs:
        groups[key] = [score(path, gold) for path in per_seed(out, seeds, prefix + '.dev.predictions')]
        tests = {len(report.read_predictions(path)) for path in per_seed(out, seeds, prefix + '.test.predictions')}
        rows.append([label] + cells(groups[key]) + [', '.join(map(str, sorted(tests))),
                                                    step_times(out, seeds, stages), expects])
    rows.append(['London baseline (always "London")'] + london(gold) + ['—', '—', '—'])
    header = ['run'] + COLUMNS + ['test predictions', 'wall time per step', "the year's expectation"]
    return markdown(header, rows) + [''] + paired_table(groups)


def write_results(path, out, variants, seeds, recipe, jobs, runner, pipeline_command):
    """OUT/results.md of a comparison: the table, the paired tests, how they are computed, every command."""
    table_lines = comparison(out, variants, seeds, recipe)
    title = f'Comparison: {recipe} recipe, seeds {", ".join(map(str, seeds))}'
    lines = (report.header(title, jobs, pipeline_command) + table_lines
             + ['', NOTE, '', 'Pretraining loss curves (mean over seeds, band from lowest to highest): '
                'pretrain_loss.png. Attention weights of each variant (seed ' + str(seeds[0]) + '): attention.png.',
                ''] + report.commands(runner))
    with utils.atomic_write(path) as temporary, open(temporary, 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines))
    return table_lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog='compare.py', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--group', nargs='+', action='append', required=True, metavar=('LABEL', 'PREDICTIONS'),
                        help='a label, then one predictions file per seed')
    parser.add_argument('--gold', default=os.path.join(ROOT, 'birth_dev.tsv'), help='TSV with the gold places')
    args = parser.parse_args(argv)
    try:
        gold = utils.read_gold_places(args.gold)
        if gold is None:
            raise ValueError(f'{args.gold} has no gold places (no second field)')
        groups = {}
        for label, *paths in args.group:
            if label in groups:
                raise ValueError(f'--group {label} is given twice')
            if not paths:
                raise ValueError(f'--group {label} names no predictions file')
            groups[label] = [score(path, gold) for path in paths]
    except (OSError, ValueError) as e:
        sys.exit(f'compare.py: error: {e}')
    print('\n'.join(table(groups, gold)))


if __name__ == '__main__':
    main()
