"""README command (1): pipeline.py runs every step with the recipe it names, skips finished steps, prints the table."""
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
TINY = ['--max_steps', '2', '--n_layer', '1', '--n_head', '2', '--n_embd', '16', '--quiet']
OUTPUTS = ['vanilla.model.params', 'vanilla.nopretrain.dev.predictions', 'vanilla.nopretrain.test.predictions',
           'vanilla.pretrain.params', 'vanilla.finetune.params', 'vanilla.pretrain.dev.predictions',
           'vanilla.pretrain.test.predictions', 'synthesizer.pretrain.params', 'synthesizer.finetune.params',
           'synthesizer.pretrain.dev.predictions', 'synthesizer.pretrain.test.predictions']


def run_pipeline(out):
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    return subprocess.run([sys.executable, os.path.join(ROOT, 'pipeline.py'), '--outdir', str(out), '--', *TINY],
                          capture_output=True, text=True, env=env, timeout=600)


def test_pipeline_runs_the_laptop_recipe_without_a_gpu_and_then_skips_what_is_done(tmp_path):
    out = tmp_path / 'out'
    first = run_pipeline(out)
    assert first.returncode == 0, first.stderr[-2000:]
    assert 'Recipe: laptop (no GPU found)' in first.stdout and '--recipe faithful' in first.stdout
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert len((out / 'vanilla.pretrain.dev.predictions').read_text().splitlines()) == 500
    assert len((out / 'synthesizer.pretrain.test.predictions').read_text().splitlines()) == 437
    assert '| London baseline | 5.0% (25/500) |' in first.stdout
    assert '| synthesizer, pretrain + finetune |' in first.stdout
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    jobs = min(cores, 4)  # the default without a GPU: one sequence per core
    assert f'{jobs} sequence{"s" if jobs > 1 else ""} at a time' in first.stdout
    if jobs > 1:  # the longest sequence starts first
        assert first.stdout.index('[run]  synthesizer: pretrain') < first.stdout.index('[run]  vanilla: pretrain')
    logs = ''.join((out / 'logs' / name).read_text() for name in os.listdir(out / 'logs'))
    settings_lines = [line for line in logs.splitlines() if line.startswith(('pretrain ', 'finetune '))]
    assert len(settings_lines) == 5 and all('recipe=laptop' in line for line in settings_lines)
    try:
        import matplotlib  # noqa: F401
        assert (out / 'pretrain_loss.png').read_bytes()[:4] == b'\x89PNG'
    except ImportError:
        assert 'pip install matplotlib' in first.stdout

    again = run_pipeline(out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count('[skip]') == len(OUTPUTS) and '[run]' not in again.stdout
