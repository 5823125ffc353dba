"""What a pipeline step's log and metrics file say while it runs: its settings, its progress and ETA, its last line."""
import json
import math
import os
import re


def last_metrics(path, since, size=16384):
    """The last complete lines of a metrics JSONL file, if it was written since `since` (else [])."""
    try:
        stat = os.stat(path)
        if stat.st_mtime < since:
            return []  # a file left by an earlier run, not yet rewritten
        with open(path, 'rb') as f:
            start = max(0, stat.st_size - size)
            f.seek(start)
            lines = f.read().split(b'\n')
    except OSError:
        return []
    lines = lines[1 if start else 0:-1]  # a partial first line (after seeking), and the unfinished last one
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def settings_of(text, function):
    """The key=value settings of the line run.py prints first (`pretrain vanilla: recipe=... max_epochs=...`)."""
    for line in text.splitlines():
        if line.startswith(function + ' ') and '=' in line:
            return dict(re.findall(r'(\w+)=(\S+)', line))
    return None


def total_steps(settings, n_examples):
    """Optimizer steps of a training run with these printed settings, or None when they do not say."""
    try:
        total = int(settings['max_epochs']) * math.ceil(n_examples / int(settings['batch_size']))
        if settings.get('max_steps', 'None') != 'None':
            total = min(total, int(settings['max_steps']))
        return total
    except (KeyError, ValueError, ZeroDivisionError):
        return None


def duration(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f'{seconds}s'
    if seconds < 3600:
        return f'{seconds // 60}m{seconds % 60:02d}s'
    return f'{seconds // 3600}h{seconds // 60 % 60:02d}m'


def progress(rows, total, elapsed):
    """`step 1200/5290 ETA 3m10s` from a running step's last metrics rows (time per step over the last ones)."""
    if not rows:
        return f'starting ({duration(elapsed)})'
    step = rows[-1]['step']
    if total is None:
        return f'step {step}'
    first, last = rows[0], rows[-1]
    if last['step'] > first['step']:
        per_step = (last['wall_s'] - first['wall_s']) / (last['step'] - first['step'])
    else:
        per_step = last['wall_s'] / max(1, last['step'])
    return f'step {step}/{total} ETA {duration(max(0, total - step) * per_step)}'


def read_from(path, offset, size=65536):
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            f.seek(offset)
            return f.read(size)
    except OSError:
        return ''


def last_line(path, offset, prefix='; it ends: '):
    """The last non-empty line a step wrote to its log (a progress bar's last state if nothing follows it)."""
    text = read_from(path, offset, size=1 << 24)
    lines = [line.strip() for line in re.split(r'[\r\n]', text) if line.strip()]
    return prefix + lines[-1][:500] if lines else ''
