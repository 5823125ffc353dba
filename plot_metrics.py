"""Draw the training-loss curves of one or more runs to a PNG.

    python plot_metrics.py vanilla.pretrain.params.metrics.jsonl synthesizer.pretrain.params.metrics.jsonl \
        --output pretrain_loss.png [--x step|epoch|wall_s|tokens]
    python plot_metrics.py out/seed*/vanilla.pretrain.params.metrics.jsonl \
        out/seed*/synthesizer.pretrain.params.metrics.jsonl --output pretrain_loss.png

Each input is the JSONL metrics file that src/run.py writes beside the params
(one line per optimizer step; lines without a loss are left out). Files of
the same name in different folders (the seeds of one run, as pipeline.py
--seeds writes them) are one curve: their mean, in a band from the lowest to
the highest, over the steps they all have. Needs matplotlib (an optional
dependency).
"""
import argparse
import json
import os
import sys


def read_metrics(path):
    """The per-step lines of a metrics file (a Trainer with a test_dataset adds per-epoch test_loss lines)."""
    with open(path, encoding='utf-8') as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [row for row in rows if 'loss' in row]


def smooth(values, window):
    """Trailing mean over `window` points, to make noisy per-step losses readable."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def grouped(paths):
    """{label: [path, ...]}: files of the same name are the seeds of one run."""
    groups = {}
    for path in paths:
        groups.setdefault(os.path.basename(path).replace('.params.metrics.jsonl', ''), []).append(path)
    return groups


def band(runs, x, window):
    """(x, mean, lowest, highest) of the smoothed losses of several runs, at each step index they all reach."""
    n = min(len(rows) for rows in runs)
    xs = [[row[x] for row in rows[:n]] for rows in runs]
    ys = [smooth([row['loss'] for row in rows[:n]], window) for rows in runs]
    columns = list(zip(*ys))
    return ([sum(c) / len(c) for c in zip(*xs)], [sum(c) / len(c) for c in columns],
            [min(c) for c in columns], [max(c) for c in columns])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('metrics', nargs='+', help='metrics JSONL files')
    parser.add_argument('--output', required=True, help='PNG file to write')
    parser.add_argument('--x', choices=['step', 'epoch', 'wall_s', 'tokens'], default='step', help='x axis')
    parser.add_argument('--smooth', type=int, default=20, help='trailing-mean window in steps (1: raw)')
    parser.add_argument('--title', default='training loss')
    args = parser.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit('plot_metrics.py needs matplotlib: pip install matplotlib')
    for path in args.metrics:
        if not os.path.isfile(path):
            sys.exit(f'no metrics file at {path}: train with src/run.py first (it writes PARAMS.metrics.jsonl)')

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for label, paths in grouped(args.metrics).items():
        x, mean, low, high = band([read_metrics(p) for p in paths], args.x, max(1, args.smooth))
        x = [v / (60 if args.x == 'wall_s' else 1) for v in x]
        if len(paths) == 1:
            ax.plot(x, mean, label=label)
        else:
            line, = ax.plot(x, mean, label=f'{label} (mean of {len(paths)} seeds, band: lowest to highest)')
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.25, linewidth=0)
    ax.set_xlabel({'wall_s': 'wall time (min)'}.get(args.x, args.x))
    ax.set_ylabel('loss (mean over non-pad targets)')
    ax.set_yscale('log')
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = args.output + '.tmp.png'
    fig.savefig(tmp)
    os.replace(tmp, args.output)
    print(f'Plot written to {args.output}')


if __name__ == '__main__':
    main()
