"""Runs the demo notebook's code cells top to bottom, without Jupyter."""
import json
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, 'mingpt-demo')
NOTEBOOK = os.path.join(DEMO, 'play_char.ipynb')


def code_cells(path):
    with open(path, encoding='utf-8') as f:
        nb = json.load(f)
    assert nb['nbformat'] == 4
    cells = []
    for cell in nb['cells']:
        if cell['cell_type'] != 'code':
            continue
        source = cell['source']
        source = ''.join(source) if isinstance(source, list) else source
        # IPython magics and shell escapes are not Python.
        lines = [line for line in source.splitlines() if not line.lstrip().startswith(('%', '!'))]
        cells.append('\n'.join(lines))
    return cells


def test_notebook_is_stored_without_outputs():
    with open(NOTEBOOK, encoding='utf-8') as f:
        nb = json.load(f)
    for cell in nb['cells']:
        if cell['cell_type'] == 'code':
            assert cell.get('outputs') == []
            assert cell.get('execution_count') is None


@pytest.fixture
def in_demo_dir(monkeypatch):
    monkeypatch.chdir(DEMO)
    monkeypatch.syspath_prepend(DEMO)
    # A `mingpt` imported from elsewhere must not shadow the demo's own package.
    for name in [m for m in sys.modules if m == 'mingpt' or m.startswith('mingpt.')]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [m for m in sys.modules if m == 'mingpt' or m.startswith('mingpt.')]:
        del sys.modules[name]


def test_notebook_trains_and_samples(in_demo_dir):
    import torch
    cells = code_cells(NOTEBOOK)
    assert cells, 'the notebook has no code cells'
    namespace = {'__name__': '__main__'}
    start, cpu_start = time.time(), time.process_time()
    # One thread: on a shared 2-core machine two OpenMP threads competing with
    # other jobs can be many times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, source in enumerate(cells):
            exec(compile(source, f'{NOTEBOOK}[code cell {i}]', 'exec'), namespace)
    finally:
        torch.set_num_threads(threads)
    elapsed, cpu = time.time() - start, time.process_time() - cpu_start

    mingpt = sys.modules['mingpt']
    assert os.path.dirname(os.path.abspath(mingpt.__file__)) == os.path.join(DEMO, 'mingpt')

    losses = namespace['losses']
    assert len(losses) == namespace['train_config'].max_iters
    head, tail = losses[:10], losses[-10:]
    assert sum(tail) / len(tail) < sum(head) / len(head) - 0.5, (head, tail)

    completion, context, steps = namespace['completion'], namespace['context'], namespace['steps']
    assert isinstance(completion, str)
    assert len(completion) == len(context) + steps
    assert completion.startswith(context)
    assert set(completion) <= set(namespace['text'])
    print(f'notebook cells ran in {elapsed:.1f} s wall, {cpu:.1f} s CPU')
