"""plot_metrics.py: files of the same name (seeds of one run) become one curve, their mean in a min-max band."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, ROOT)
import plot_metrics  # noqa: E402


def test_files_of_the_same_name_are_grouped_in_the_order_given():
    paths = ['a/seed0/vanilla.pretrain.params.metrics.jsonl', 'a/seed0/synthesizer.pretrain.params.metrics.jsonl',
             'a/seed1/vanilla.pretrain.params.metrics.jsonl']
    assert plot_metrics.grouped(paths) == {'vanilla.pretrain': [paths[0], paths[2]],
                                           'synthesizer.pretrain': [paths[1]]}


def test_band_is_mean_lowest_and_highest_over_the_steps_every_seed_has():
    runs = [[{'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 4.0}, {'step': 3, 'loss': 9.0}],
            [{'step': 1, 'loss': 3.0}, {'step': 2, 'loss': 2.0}],
            [{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 6.0}, {'step': 3, 'loss': 1.0}]]
    assert plot_metrics.band(runs, 'step', 1) == ([1, 2], [2.0, 4.0], [1.0, 2.0], [3.0, 6.0])
    # smoothed first: trailing means over 2 points are [1, 2.5], [3, 2.5], [2, 4]
    assert plot_metrics.band(runs, 'step', 2) == ([1, 2], [2.0, 3.0], [1.0, 2.5], [3.0, 4.0])
    one = plot_metrics.band(runs[:1], 'step', 1)
    assert one == ([1, 2, 3], [1.0, 4.0, 9.0], [1.0, 4.0, 9.0], [1.0, 4.0, 9.0])


def test_seeds_in_folders_are_drawn(tmp_path):
    pytest.importorskip('matplotlib')
    paths = []
    for seed in range(3):
        for variant in ('vanilla', 'synthesizer'):
            path = tmp_path / f'seed{seed}' / f'{variant}.pretrain.params.metrics.jsonl'
            path.parent.mkdir(exist_ok=True)
            path.write_text(''.join(json.dumps({'step': s, 'wall_s': s * 0.1, 'loss': 5.0 / s + seed}) + '\n'
                                    for s in range(1, 40 + seed)))
            paths.append(str(path))
    png = tmp_path / 'loss.png'
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'plot_metrics.py'), *paths, '--output', str(png)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
