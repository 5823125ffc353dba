"""pipeline.py --jobs 2: sequences side by side, one log each, results.md, skips, failures, the status line.

One tiny two-job pipeline run (module fixture) is shared by the tests that
look at its outputs; the failure test reruns part of a copy of it.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, ROOT)
import pipeline  # noqa: E402
import scheduler  # noqa: E402
from conftest import PIPELINE_OUTPUTS as OUTPUTS  # noqa: E402
from conftest import PIPELINE_TINY as TINY  # noqa: E402
from conftest import run_pipeline  # noqa: E402

LOGS = ['london.log', 'vanilla-nopretrain.log', 'vanilla-pretrain.log', 'synthesizer-pretrain.log']


@pytest.fixture(scope='module')
def two_jobs(tmp_path_factory):
    out = tmp_path_factory.mktemp('pipeline') / 'out'
    start = time.time()
    first = run_pipeline('--outdir', str(out), '--jobs', '2', '--', *TINY)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    return out, first, time.time() - start


def test_two_jobs_write_every_output_and_one_log_per_sequence(two_jobs):
    out, first, _ = two_jobs
    assert '2 sequences at a time' in first.stdout
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert len((out / 'vanilla.nopretrain.dev.predictions').read_text().splitlines()) == 500
    assert len((out / 'synthesizer.pretrain.test.predictions').read_text().splitlines()) == 437
    assert sorted(os.listdir(out / 'logs')) == sorted(LOGS)
    assert 'Correct: 25.0 out of 500.0: 5.0%' in (out / 'logs' / 'london.log').read_text()
    vanilla = (out / 'logs' / 'vanilla-pretrain.log').read_text()
    # each step's header, command and output, in the sequence's order
    assert vanilla.index('vanilla: pretrain') < vanilla.index('pretrain vanilla: recipe=laptop') \
        < vanilla.index('vanilla: finetune') < vanilla.index('vanilla: evaluate test')
    assert vanilla.count('\n$ OMP_NUM_THREADS=1 ') == 4
    assert '| London baseline | 5.0% (25/500) |' in first.stdout
    assert '| synthesizer, pretrain + finetune |' in first.stdout
    assert f'Results written to {out / "results.md"}' in first.stdout


def test_results_file_has_every_row_the_machine_and_the_commands(two_jobs):
    out, _, _ = two_jobs
    text = (out / 'results.md').read_text()
    import torch
    assert '# Results: laptop recipe' in text and f'torch {torch.__version__}' in text
    assert 'machine: no GPU; CPU ' in text and ' UTC' in text
    rows = [line for line in text.splitlines() if line.startswith('| ') and not line.startswith('| run ')]
    assert len(rows) == 4
    assert rows[0].startswith('| London baseline') and '5.0% (25/500)' in rows[0] and '5.0%' in rows[0]
    vanilla = next(row for row in rows if row.startswith('| vanilla, pretrain + finetune'))
    cells = [cell.strip() for cell in vanilla.strip('|').split('|')]
    assert cells[1].endswith('/500)') and cells[2] == '437'
    assert '(mean of epoch 1, 2 steps)' in cells[3]
    assert 'pretrain ' in cells[4] and ' ms' in cells[4] and cells[5] == 'at least 10%'
    losses = [json.loads(line)['loss'] for line in (out / 'vanilla.pretrain.params.metrics.jsonl').open()]
    assert cells[3].startswith(f'{sum(losses) / len(losses):.4f}')
    assert 'well below 10%' in text and '20% – 25%' in text and '5% – 13%' in text
    commands = [line for line in text.split('```')[1].splitlines() if line and not line.startswith('#')]
    assert len(commands) == 12  # London and the eleven run.py steps
    assert commands[0].endswith('london_baseline.py')
    assert all(c.startswith('OMP_NUM_THREADS=1 ') for c in commands)
    assert all(' --recipe laptop --max_steps 2 --n_layer 1' in c for c in commands[1:])
    assert '--jobs 2 -- --max_steps 2' in text


def test_a_second_run_skips_every_step_and_keeps_the_results(two_jobs):
    out, _, _ = two_jobs
    before = (out / 'results.md').read_text()
    again = run_pipeline('--outdir', str(out), '--jobs', '2', '--', *TINY)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count('[skip]') == len(OUTPUTS) and '[run]' not in again.stdout
    assert 'left as it was' in again.stdout and (out / 'results.md').read_text() == before
    assert '| London baseline | 5.0% (25/500) |' in again.stdout


def test_a_failing_step_stops_its_sequence_only_and_names_its_log(two_jobs, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(two_jobs[0], out)
    for name in ('results.md', 'synthesizer.finetune.params', 'synthesizer.pretrain.dev.predictions',
                 'vanilla.pretrain.dev.predictions'):
        (out / name).unlink()
    # an interrupted finetune's checkpoint, but not one run.py can read: the step runs with --resume and fails
    (out / 'synthesizer.finetune.params.ckpt').write_bytes(b'not a checkpoint')
    result = run_pipeline('--outdir', str(out), '--jobs', '2', '--', *TINY)
    assert result.returncode != 0
    error = result.stderr.strip()
    assert '\n' not in error and 'Traceback' not in error
    log = out / 'logs' / 'synthesizer-pretrain.log'
    assert error.startswith('pipeline stopped: step "synthesizer: finetune" failed (exit status 1)')
    assert f'log: {log}; it ends: run.py: error: ' in error  # run.py's own one-line message
    assert ' --resume\n' in log.read_text()
    assert f'[run]  synthesizer: finetune, resuming from {out}/synthesizer.finetune.params.ckpt' in result.stdout
    assert (out / 'vanilla.pretrain.dev.predictions').is_file()  # the other sequence finished
    assert not (out / 'synthesizer.pretrain.dev.predictions').exists() and not (out / 'results.md').exists()


@pytest.mark.parametrize('jobs', ['0', '-2', 'two'])
def test_jobs_below_one_is_a_one_line_usage_error(jobs, tmp_path):
    result = run_pipeline('--outdir', str(tmp_path / 'out'), f'--jobs={jobs}')
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr.count('\n') == 1 and result.stderr.startswith('pipeline.py: error: argument --jobs:')
    assert not (tmp_path / 'out').exists()


def test_the_status_line_shows_each_sequence_with_its_step_and_eta(tmp_path, capsys):
    seqs = pipeline.sequences(str(tmp_path))
    runner = scheduler.Runner(seqs, 2, 'laptop', [], {})
    vanilla, synthesizer = seqs[2], seqs[3]
    os.makedirs(tmp_path / 'logs')
    with open(vanilla.log, 'w') as f:
        f.write('pretrain vanilla: recipe=laptop device=cpu n_layer=4 max_epochs=230 batch_size=128 chunks=4\n')
    with open(synthesizer.log, 'w') as f:
        f.write('finetune synthesizer: recipe=laptop max_epochs=10 batch_size=256 max_steps=50\n')
    now = time.time()
    with open(vanilla.steps[0].metrics, 'w') as f:  # 10 steps at 2 s each, then an unfinished line
        f.write(''.join(json.dumps({'step': s, 'epoch': 1, 'loss': 3.0, 'wall_s': 2.0 * s}) + '\n'
                        for s in range(1, 11)) + '{"step": 11, "ep')
    for key, seq, step in (('vanilla', vanilla, vanilla.steps[0]), ('synthesizer', synthesizer, synthesizer.steps[1])):
        runner.running[key] = dict(seq=seq, step=step, start=now - 20, log_offset=0)
    runner.state.update({'london': 'done', 'no-pretrain': 'failed'})
    runner.status(force=True)
    line = capsys.readouterr().out
    # 230 epochs of ceil(2937 / 128) = 23 batches; 5280 steps left at 2 s
    assert line == ('[status] london: done | no-pretrain: failed | vanilla: pretrain step 10/5290 ETA 2h56m | '
                    'synthesizer: finetune starting (20s)\n')
    assert runner.running['synthesizer']['total'] == 50  # max_steps caps 10 epochs of 8 batches
    # a narrow terminal: the running sequences first, the rest counted, cut at the width
    assert runner.status_line(100) == ('vanilla: pretrain 10/5290 ETA 2h56m | synthesizer: finetune starting (20s) | '
                                       '+2 done or waiting')
    assert runner.status_line(20) == 'vanilla: pretrain 10'


def test_progress_and_durations():
    rows = [{'step': 100, 'wall_s': 50.0}, {'step': 110, 'wall_s': 60.0}]
    assert scheduler.progress(rows, 200, 60) == 'step 110/200 ETA 1m30s'
    assert scheduler.progress(rows, None, 60) == 'step 110'
    assert scheduler.progress([], 200, 5) == 'starting (5s)'
    assert [scheduler.duration(s) for s in (0, 59, 60, 3599, 3600, 7325)] == ['0s', '59s', '1m00s', '59m59s',
                                                                              '1h00m', '2h02m']
    assert scheduler.total_steps({'max_epochs': '650', 'batch_size': '128', 'max_steps': 'None'}, 2937) == 650 * 23
    assert scheduler.total_steps({'batch_size': '128'}, 2937) is None


def test_more_than_one_job_starts_the_longest_sequences_first(tmp_path):
    seqs = pipeline.sequences(str(tmp_path))
    assert [seq.key for seq in seqs] == ['london', 'no-pretrain', 'vanilla', 'synthesizer']
    # laptop: the synthesizer pretrains 320 epochs of 2,937 documents and finetunes 10 of 2,000 pairs, vanilla
    # 150 and 5; no pretraining is 75 epochs of 2,000 pairs, London none
    assert [scheduler.training_examples(seq, 'laptop') for seq in seqs] == [
        0, 75 * 2000, 150 * 2937 + 5 * 2000, 320 * 2937 + 10 * 2000]

    def started(jobs, recipe):
        return [seq.key for seq in scheduler.Runner(seqs, jobs, recipe, [], {}).pending]

    assert started(2, 'laptop') == ['synthesizer', 'vanilla', 'no-pretrain', 'london']
    assert started(2, 'faithful') == ['vanilla', 'synthesizer', 'no-pretrain', 'london']  # a tie keeps its order
    assert started(1, 'laptop') == ['london', 'no-pretrain', 'vanilla', 'synthesizer']
    runner = scheduler.Runner(seqs, 2, 'laptop', [], {})
    assert runner.order == ['london', 'no-pretrain', 'vanilla', 'synthesizer']  # the status line keeps its order


def test_the_max_epochs_pipeline_reads_is_the_one_run_py_reads():
    import run
    parser = run.build_parser()
    for n in range(len('--m'), len('--max_epochs') + 1):
        for flags in (['--max_epochs'[:n], '9'], ['--max_epochs'[:n] + '=9']):
            try:
                read = parser.parse_args(['pretrain', 'vanilla', 'wiki.txt', *flags]).max_epochs
            except SystemExit:  # ambiguous ('--max' is --max_steps's too) or unknown: run.py stops there
                read = None
            assert scheduler.epochs_given(flags) == read, flags


def test_max_epochs_given_to_every_step_sizes_the_sequences(tmp_path):
    seqs = pipeline.sequences(str(tmp_path))
    for extra in (['--seed', '1', '--max_epochs', '3'], ['--max_epochs=3']):
        assert [scheduler.training_examples(seq, 'laptop', extra) for seq in seqs] == [
            0, 3 * 2000, 3 * 2937 + 3 * 2000, 3 * 2937 + 3 * 2000]
    assert scheduler.epochs_given(['--max_epochs', '3', '--max_epochs', '7']) == 7  # the last one counts
    assert scheduler.epochs_given(['--max_epochs', 'many']) is None  # run.py says what is wrong with it
    assert scheduler.epochs_given(['--seed', '1']) is None
    assert scheduler.epochs_given(['--max_ep', '4', '--max_epochs=5', '--max_e=6']) == 6  # abbreviations too
    # 3 epochs for every step: vanilla and the synthesizer tie, and a tie keeps the listed order
    started = [seq.key for seq in scheduler.Runner(seqs, 2, 'laptop', ['--max_epochs', '3'], {}).pending]
    assert started == ['vanilla', 'synthesizer', 'no-pretrain', 'london']


def test_a_missing_corpus_counts_as_empty_when_ordering(tmp_path):
    seq = scheduler.Sequence('x', str(tmp_path / 'x.log'), [scheduler.Step(
        'x: pretrain', 'pretrain', str(tmp_path / 'p'), ['pretrain', 'vanilla', str(tmp_path / 'no_such_corpus.txt')])])
    assert scheduler.training_examples(seq, 'laptop') == 0


class ScriptStep(scheduler.Step):
    """A step that runs a Python snippet (given its output path as argv[1]) instead of run.py; with `training`,
    the scheduler takes it for a training step writing OUTPUT.metrics.jsonl."""

    def __init__(self, name, output, script, training=False):
        super().__init__(name, name, output, ['evaluate'])
        self.script, self.training = script, training

    def command(self, recipe, extra):
        return [sys.executable, '-c', self.script, self.output]

    @property
    def metrics(self):
        return self.output + '.metrics.jsonl' if self.training else None


WAIT_FOR_A_SECOND_THREAD = '''
import os, sys, time
open(sys.argv[1] + '.metrics.jsonl', 'w').write('{"step": 7, "wall_s": 1.0}\\n')
path, deadline = os.environ['PIPELINE_THREADS_FILE'], time.time() + 60
while open(path).read() != '2' and time.time() < deadline:
    time.sleep(0.05)
open(sys.argv[1], 'w').write(os.environ['OMP_NUM_THREADS'] + ' then ' + open(path).read())
'''
RECORD_THREADS = "import os, sys; open(sys.argv[1], 'w').write(os.environ['OMP_NUM_THREADS'])"


def test_a_core_a_finished_sequence_leaves_goes_to_one_still_running(tmp_path, capsys):
    out = lambda name: str(tmp_path / name)  # noqa: E731
    quick = scheduler.Sequence('quick', out('quick.log'), [ScriptStep('quick: one', out('q1'), RECORD_THREADS)])
    slow = scheduler.Sequence('slow', out('slow.log'), [
        ScriptStep('slow: one', out('s1'), WAIT_FOR_A_SECOND_THREAD, training=True),
        ScriptStep('slow: two', out('s2'), RECORD_THREADS)])
    runner = scheduler.Runner([slow, quick], 2, 'laptop', [], {}, cores=2)
    runner.run()
    assert runner.failures == []
    assert (tmp_path / 'q1').read_text() == '1'
    # the slow sequence's running step saw its file go to 2; its next step started with 2 threads
    assert (tmp_path / 's1').read_text() == '1 then 2'
    assert (tmp_path / 's2').read_text() == '2'
    assert '[cores] slow now runs with 2 threads' in capsys.readouterr().out
    commands = [command for key, command, _, _ in runner.commands if key == 'slow']  # as results.md lists them
    assert len(commands) == 3 and commands[0].startswith('OMP_NUM_THREADS=1 ') and commands[2].startswith(
        'OMP_NUM_THREADS=2 ') and commands[1].startswith('# the step above went on with 2 threads after step 7 or so')
    assert 'OMP_NUM_THREADS=2 ' in (tmp_path / 'slow.log').read_text().split('slow: two')[1]
    assert not os.path.exists(runner.threads_dir)  # the thread files go with the run


def test_freed_cores_go_to_a_waiting_sequence_first_then_to_the_fewest_threads(tmp_path):
    seqs = pipeline.sequences(str(tmp_path))
    runner = scheduler.Runner(seqs, 2, 'laptop', [], {}, cores=3)
    runner.threads_dir = str(tmp_path)
    runner.running = {key: dict(step=seq.steps[0], start=time.time()) for key, seq in (('synthesizer', seqs[3]),
                                                                                     ('vanilla', seqs[2]))}
    runner.threads = {'synthesizer': 1, 'vanilla': 1}
    runner.share_free_cores()  # while sequences wait, a freed core is theirs: nothing changes
    assert runner.threads == {'synthesizer': 1, 'vanilla': 1}
    runner.pending = []
    runner.share_free_cores()  # 3 cores for 2 sequences: the first started gets the spare one
    assert runner.threads == {'synthesizer': 2, 'vanilla': 1}
    assert (tmp_path / 'synthesizer').read_text() == '2' and not (tmp_path / 'vanilla').exists()
    del runner.running['synthesizer'], runner.threads['synthesizer']
    runner.share_free_cores()
    assert runner.threads == {'vanilla': 3}
    # without `cores` (OMP_NUM_THREADS set by the user, one job, or a GPU) the threads are left alone
    fixed = scheduler.Runner(seqs, 2, 'laptop', [], {'OMP_NUM_THREADS': '1'})
    fixed.running, fixed.pending = {'vanilla': runner.running['vanilla']}, []
    fixed.share_free_cores()
    assert fixed.threads == {} and fixed.step_env(seqs[2]) == {'OMP_NUM_THREADS': '1'}


def test_a_comparisons_sequences_get_thread_files_too(tmp_path):
    seqs = pipeline.comparison(str(tmp_path), ['vanilla', 'synthesizer'], [0, 1])
    runner = scheduler.Runner(seqs, 2, 'laptop', [], {}, cores=2)
    try:
        for seq in seqs:  # keys such as vanilla/seed1
            env = runner.step_env(seq)
            assert env['OMP_NUM_THREADS'] == '1' and open(env['PIPELINE_THREADS_FILE']).read() == '1'
        assert len(os.listdir(runner.threads_dir)) == len(seqs)
    finally:
        shutil.rmtree(runner.threads_dir)


def test_a_training_step_takes_up_the_threads_its_file_names(tmp_path):
    threads = tmp_path / 'threads'
    threads.write_text('2')
    env = dict(os.environ, OMP_NUM_THREADS='1', PIPELINE_THREADS_FILE=str(threads), CUDA_VISIBLE_DEVICES='')
    result = subprocess.run([sys.executable, 'src/run.py', 'pretrain', 'vanilla', 'wiki.txt', '--writing_params_path',
                             str(tmp_path / 'p'), '--max_steps', '3', '--batch_size', '8', *TINY[2:]],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count('threads: ') == 1 and 'threads: 1 -> 2 from step 2\n' in result.stdout


def test_a_thread_file_that_is_missing_or_not_a_number_changes_nothing(tmp_path, single_thread):
    import torch

    import training

    class Run:
        step = 5

    follow = training.FollowThreads(str(tmp_path / 'threads'))
    follow(Run())  # no file yet
    for text in ('', 'two', '0', '-1'):
        (tmp_path / 'threads').write_text(text)
        follow(Run())
        assert torch.get_num_threads() == 1


def test_a_compiled_run_keeps_the_threads_it_started_with(tmp_path, monkeypatch):
    """Compiled CPU kernels keep the thread count they were built with, so --compile takes no freed core."""
    import argparse

    import torch

    import model
    import trainer
    import training

    trained = []
    monkeypatch.setattr(trainer.Trainer, 'train', lambda self: trained.append(self))
    monkeypatch.setenv(training.THREADS_FILE, str(tmp_path / 'threads'))
    gpt = model.GPT(model.GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=8))
    for compile in (False, True):
        args = argparse.Namespace(metrics_path=None, compile=compile, quiet=True, seed=0, checkpoint_minutes=10,
                                  checkpoint_path=str(tmp_path / 'ckpt'), writing_params_path=str(tmp_path / 'p'))
        training.train(args, gpt, [], {}, torch.device('cpu'))
    followers = [[f for f in t.callbacks['on_batch_end'] if isinstance(f, training.FollowThreads)] for t in trained]
    assert [len(f) for f in followers] == [1, 0]
    assert followers[0][0].path == str(tmp_path / 'threads')
