"""pipeline.py's report: results.md (dev accuracies, final losses, step times, machine, commands) and the plot."""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

import torch

import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = 'birth_dev.tsv'

# (sequence key, row label, assignment expectation, public reports): SPEC section 11.
ROWS = [('london', 'London baseline (always "London")', '—', '5.0%'),
        ('no-pretrain', 'vanilla, no pretraining', 'well below 10%', '0.2% – 2%'),
        ('vanilla', 'vanilla, pretrain + finetune', 'at least 10%', '20% – 25%'),
        ('synthesizer', 'synthesizer, pretrain + finetune', 'at least 5% (test)', '5% – 13% (dev)')]


# ---- results --------------------------------------------------------------------------------------------------

def dev_score(predictions):
    """(correct, total) of predictions on the dev set."""
    total, correct = utils.evaluate_places(os.path.join(ROOT, DEV), predictions)
    return int(correct), int(total)


def dev_accuracy(predictions):
    correct, total = dev_score(predictions)
    return f'{correct / total * 100:.1f}% ({correct}/{total})'


def read_predictions(path):
    with open(path, encoding='utf-8') as f:
        return [line.rstrip('\n') for line in f]


def read_metrics(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def final_loss(rows):
    """Mean loss over the steps of the last epoch in a metrics file, said with the epoch and step count."""
    if not rows:
        return '—'
    epoch = rows[-1]['epoch']
    losses = [r['loss'] for r in rows if r['epoch'] == epoch]
    return f'{statistics.fmean(losses):.4f} (mean of epoch {epoch}, {len(losses)} steps)'


def step_time(rows):
    """Median wall time between consecutive optimizer steps, in ms (None for fewer than 2 steps)."""
    gaps = [b['wall_s'] - a['wall_s'] for a, b in zip(rows, rows[1:]) if b['step'] == a['step'] + 1]
    return statistics.median(gaps) * 1000 if gaps else None


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cpu = f'CPU {cpu}, {os.cpu_count()} cores'
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f'GPU {", ".join(gpus)}; {cpu}'
    return f'no GPU; {cpu}'


def result_rows(out):
    """For each row of ROWS: (label, dev accuracy, test predictions, final pretraining loss, time per step)."""
    with open(os.path.join(ROOT, DEV), encoding='utf-8') as f:
        n_dev = sum(1 for _ in f)
    rows = [(ROWS[0], dev_accuracy(['London'] * n_dev), '—', '—', '—')]
    for row, prefix, pretrain, finetune in (
            (ROWS[1], 'vanilla.nopretrain', None, 'vanilla.model.params'),
            (ROWS[2], 'vanilla.pretrain', 'vanilla.pretrain.params', 'vanilla.finetune.params'),
            (ROWS[3], 'synthesizer.pretrain', 'synthesizer.pretrain.params', 'synthesizer.finetune.params')):
        dev = dev_accuracy(read_predictions(os.path.join(out, f'{prefix}.dev.predictions')))
        n_test = len(read_predictions(os.path.join(out, f'{prefix}.test.predictions')))
        pretrain_rows = read_metrics(os.path.join(out, pretrain + '.metrics.jsonl')) if pretrain else []
        times = []
        for name, params in (('pretrain', pretrain), ('finetune', finetune)):
            ms = step_time(read_metrics(os.path.join(out, params + '.metrics.jsonl'))) if params else None
            if ms is not None:
                times.append(f'{name} {ms:.1f} ms')
        rows.append((row, dev, str(n_test), final_loss(pretrain_rows) if pretrain else '— (no pretraining)',
                     ', '.join(times) or '—'))
    return rows


def write_results(path, out, recipe, jobs, runner, pipeline_command):
    rows = result_rows(out)
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f'# Results: {recipe} recipe', '',
             f'- date: {now:%Y-%m-%d %H:%M} UTC',
             f'- machine: {machine()}',
             f'- torch {torch.__version__}, Python {platform.python_version()}',
             f'- pipeline: `{pipeline_command}` ({jobs} sequence{"s" if jobs > 1 else ""} at a time)', '',
             '| run | dev accuracy | test predictions | pretraining loss at the end | wall time per step '
             '| the assignment expects | public reports (dev) |',
             '|---|---|---|---|---|---|---|']
    for (_, label, expects, public), dev, n_test, loss, times in rows:
        lines.append(f'| {label} | {dev} | {n_test} | {loss} | {times} | {expects} | {public} |')
    lines += ['',
              'Pretraining loss at the end: the mean training loss over the steps of the last epoch in '
              'PARAMS.metrics.jsonl. Wall time per step: the median time between consecutive optimizer steps in '
              'the metrics files (data loading included; runs that shared the machine share its time).', '',
              '## Commands', '',
              'Run from the repository root, grouped by sequence (with several jobs the sequences ran side by '
              'side); a step whose output already existed was skipped and is shown commented out. Each log also '
              'holds the commands of earlier, interrupted invocations.',
              '', '```']
    for key in runner.order:
        lines.append(f'# {key} (log: {runner.logs[key]})')
        for _, command, step, skipped in (c for c in runner.commands if c[0] == key):
            lines.append(f'# skipped ({step.output} existed): {command}' if skipped else command)
    lines += ['```', '']
    with utils.atomic_write(path) as temporary, open(temporary, 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines))
    return rows


def plot_pretraining(out):
    """Draw both variants' pretraining loss to OUT/pretrain_loss.png when matplotlib is installed."""
    metrics = [os.path.join(out, f'{variant}.pretrain.params.metrics.jsonl') for variant in ('vanilla', 'synthesizer')]
    metrics = [path for path in metrics if os.path.exists(path)]
    if not metrics:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print('\nFor loss curves: pip install matplotlib, then python plot_metrics.py ' + ' '.join(metrics)
              + f' --output {os.path.join(out, "pretrain_loss.png")}')
        return
    subprocess.run([sys.executable, 'plot_metrics.py', *metrics, '--output', os.path.join(out, 'pretrain_loss.png')])
