"""bench/gpu_check.sh, dry-run on the CPU: the same parts and outputs as on a GPU, with tiny steps.

The check is what a rare GPU window is spent on, so its logic is held here,
where CI runs: every part leaves its log and its summary line, the faithful
pipeline leaves its predictions and results.md, the bench runs with time
left, and a part past its limit is stopped without stopping the others.
"""
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, 'bench', 'gpu_check.sh')
TINY_FLAGS = '--max_steps 2 --n_layer 2 --n_head 2 --n_embd 16 --batch_size 8 --quiet'  # the perceiver needs 2
PREDICTIONS = {'vanilla.nopretrain.dev.predictions': 500, 'vanilla.nopretrain.test.predictions': 437,
               'vanilla.pretrain.dev.predictions': 500, 'vanilla.pretrain.test.predictions': 437,
               'synthesizer.pretrain.dev.predictions': 500, 'synthesizer.pretrain.test.predictions': 437}
PARAMS = ['vanilla.model.params', 'vanilla.pretrain.params', 'vanilla.finetune.params',
          'synthesizer.pretrain.params', 'synthesizer.finetune.params']
# the later years: (folder, its results file, the variants of its comparison, vanilla's bar that year)
LATER_YEARS = [('faithful-2024', 'results-2024.md', ['vanilla', 'rope'], 'at least 15% dev (2024)'),
               ('faithful-2023', 'results-2023.md', ['perceiver'], None)]


def dry_run(out, budget, pipeline_flags=TINY_FLAGS):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='',
               GPU_CHECK_FLAGS=pipeline_flags,
               GPU_CHECK_BENCH_ARGS='--documents 16 --epochs 1 --batch_size 8 --n_layer 1 --n_head 2 --n_embd 16',
               GPU_CHECK_TESTS='tests/test_gpu_path.py -k ready_to_run')
    return run_script([str(out), str(budget)], env, timeout=max(600, budget + 60))


def run_script(args, env=None, timeout=600):
    """bash bench/gpu_check.sh ARGS in a session of its own; past `timeout`, every process of that session is
    killed (the script's parts run under `timeout`, in process groups of their own) and the test fails."""
    process = subprocess.Popen(['bash', SCRIPT] + args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [int(p) for p in os.listdir('/proc') if p.isdigit()]:
            try:
                if os.getsid(pid) == process.pid:
                    os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        process.communicate()
        pytest.fail(f'bench/gpu_check.sh {" ".join(args)} ran past {timeout} s')
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def summary_lines(out):
    return (out / 'summary.log').read_text().splitlines()


def part_line(lines, name):
    found = [line for line in lines if line.startswith(name + ': ')]
    assert len(found) == 1, lines
    return found[0]


def test_dry_run_leaves_every_part_and_the_faithful_results(tmp_path):
    out = tmp_path / 'check'
    result = dry_run(out, 400)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = summary_lines(out)
    assert lines[0].startswith('date: ') and lines[1].startswith('commit: ')
    assert any(line.startswith('torch ') for line in lines)
    assert f'budget: 400 s; pipeline flags: {TINY_FLAGS}' in lines
    assert re.fullmatch(r'tests: exit 0, \d+ s \(limit 120 s\)', part_line(lines, 'tests'))
    for part in ('pipeline', 'pipeline-2024', 'pipeline-2023'):
        assert re.fullmatch(rf'{part}: exit 0, \d+ s \(limit 380 s\)', part_line(lines, part))
    assert re.fullmatch(r'bench: exit 0, \d+ s \(limit \d+ s\)', part_line(lines, 'bench'))
    assert re.fullmatch(rf'done: {re.escape(str(out))} after \d+ s', lines[-1])
    assert result.stdout.splitlines() == lines   # the summary is printed at the end

    tests_log = (out / 'tests.log').read_text()
    assert tests_log.startswith('$ ') and '-m pytest' in tests_log.splitlines()[0]
    assert re.search(r'\b1 passed\b', tests_log)
    assert 'Results written to' in (out / 'pipeline.log').read_text()
    bench = (out / 'bench.log').read_text()
    assert len(re.findall(r'ms/step', bench)) == 4, bench   # the default step and the three fast-path rows

    faithful = out / 'faithful'
    results = (out / 'results.md').read_text()
    assert results == (faithful / 'results.md').read_text()
    for row in ('| London baseline', '| vanilla, no pretraining', '| vanilla, pretrain + finetune',
                '| synthesizer, pretrain + finetune'):
        assert row in results
    assert '--recipe faithful' in results and TINY_FLAGS in results
    for name, count in PREDICTIONS.items():
        assert len((faithful / name).read_text(encoding='utf-8').split('\n')[:-1]) == count, name
    for name in PARAMS:
        assert (faithful / name).is_file(), name
    assert not list(out.rglob('*.ckpt'))

    for folder, results_name, variants, vanilla_bar in LATER_YEARS:
        results = (out / results_name).read_text()
        assert results == (out / folder / 'results.md').read_text()
        assert TINY_FLAGS in results and f'--variants {",".join(variants)} --seeds 0' in results
        for variant in variants:
            row = [line for line in results.splitlines() if line.startswith(f'| {variant}, pretrain + finetune | 1 |')]
            assert len(row) == 1, results
            for split, count in (('dev', 500), ('test', 437)):
                predictions = out / folder / 'seed0' / f'{variant}.pretrain.{split}.predictions'
                assert len(predictions.read_text(encoding='utf-8').split('\n')[:-1]) == count
        if vanilla_bar:
            assert vanilla_bar in results


def test_a_part_past_its_limit_is_stopped_and_the_check_goes_on(tmp_path):
    """Budget 22 s: each year's pipeline has a limit of 2 s, so each is stopped (exit 124); the tests still end,
    the bench is skipped for want of time, and the summary says all of it."""
    out = tmp_path / 'check'
    result = dry_run(out, 22)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = summary_lines(out)
    for part in ('pipeline', 'pipeline-2024', 'pipeline-2023'):
        assert re.fullmatch(rf'{part}: exit 124, \d+ s \(limit 2 s\)', part_line(lines, part))
    assert re.fullmatch(r'tests: exit 0, \d+ s \(limit 120 s\)', part_line(lines, 'tests'))
    assert re.fullmatch(r'bench: skipped, -?\d+ s left', part_line(lines, 'bench'))
    assert lines[-1].startswith('done: ')
    assert not list(out.glob('results*.md')) and not (out / 'bench.log').exists()
    assert not list(out.rglob('*.ckpt'))


def test_the_checks_tests_are_the_cuda_ones():
    """The tests part's default selection (pytest -k cuda) holds the CUDA tests of both files, and no CPU-only
    test but the one that says what 'graph' does off CUDA."""
    with open(SCRIPT) as f:
        selection = re.search(r'TESTS_ARGS=\$\{GPU_CHECK_TESTS:-([^}]*)\}', f.read()).group(1).split()
    collected = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q', '-p', 'no:cacheprovider']
                               + selection, cwd=ROOT, capture_output=True, text=True, timeout=300,
                               env=dict(os.environ, OMP_NUM_THREADS='1'))
    ids = [line for line in collected.stdout.splitlines() if '::' in line]
    assert collected.returncode == 0, collected.stdout + collected.stderr
    expected = {'test_gpu_path.py::test_cuda_graph_step_trains_like_the_eager_fixed_step',
                'test_gpu_path.py::test_cuda_graph_replays_draw_fresh_dropout_while_training',
                'test_gpu_path.py::test_fixed_step_trains_to_the_params_of_the_default_step[graph-cuda]',
                'test_divergence.py::test_non_finite_gradient_with_finite_loss_stops_before_its_update',
                'test_divergence.py::test_fixed_step_skips_updates_on_the_device_until_the_flush'}
    for name in expected:
        assert any(name in i for i in ids), (name, ids)
    assert all('cuda' in i.lower() for i in ids), ids
    assert len(ids) >= 14


@pytest.mark.parametrize('budget', ['9m', '-5', ''])
def test_a_budget_that_is_not_a_number_of_seconds_is_one_line_and_nothing_made(tmp_path, budget):
    out = tmp_path / 'check'
    result = run_script([str(out), budget], timeout=60)
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr == f"gpu_check.sh: SECONDS must be a whole number of seconds, got '{budget}'\n"
    assert not out.exists()
