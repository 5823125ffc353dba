"""london_baseline.py and collect_submission.sh, run as a user would."""
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPECTED = [
    'vanilla.model.params',
    'vanilla.nopretrain.dev.predictions',
    'vanilla.nopretrain.test.predictions',
    'vanilla.pretrain.params',
    'vanilla.finetune.params',
    'vanilla.pretrain.dev.predictions',
    'vanilla.pretrain.test.predictions',
    'synthesizer.pretrain.params',
    'synthesizer.finetune.params',
    'synthesizer.pretrain.dev.predictions',
    'synthesizer.pretrain.test.predictions',
]


def test_london_baseline_from_another_directory(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'london_baseline.py')],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == 'Correct: 25.0 out of 500.0: 5.0%'


@pytest.fixture
def no_zip_path(tmp_path):
    """A PATH holding python3 and the few tools the script uses, and no zip binary."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / 'python3')
    for tool in ('dirname',):
        found = shutil.which(tool)
        assert found, f'{tool} is needed to run collect_submission.sh'
        os.symlink(found, bin_dir / tool)
    path = str(bin_dir)
    assert shutil.which('zip', path=path) is None
    return path


@pytest.fixture
def submission_dir(tmp_path):
    """A copy of the script and src/*.py, with two of the expected output files."""
    work = tmp_path / 'repo'
    (work / 'src').mkdir(parents=True)
    sources = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, 'src', '*.py')))
    assert sources
    for name in sources:
        shutil.copy(os.path.join(ROOT, 'src', name), work / 'src' / name)
    shutil.copy(os.path.join(ROOT, 'collect_submission.sh'), work / 'collect_submission.sh')
    (work / 'vanilla.model.params').write_bytes(b'\x00fake params\x01' * 100)
    (work / 'vanilla.nopretrain.dev.predictions').write_text('London\nParis\n')
    (work / 'notes.txt').write_text('not part of the submission\n')
    return work, ['src/' + name for name in sources]


def run_script(script, cwd, path):
    bash = shutil.which('bash')
    env = {'PATH': path, 'HOME': str(cwd), 'LC_ALL': 'C.UTF-8'}
    return subprocess.run([bash, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_collect_submission_without_zip_binary(submission_dir, no_zip_path, tmp_path):
    work, sources = submission_dir
    assert os.access(os.path.join(ROOT, 'collect_submission.sh'), os.X_OK)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    (work / 'assignment5.zip').write_bytes(b'a stale file, to be replaced')

    result = run_script(work / 'collect_submission.sh', elsewhere, no_zip_path)
    assert result.returncode == 0, result.stdout + result.stderr

    # Built in the script's own directory, not the caller's.
    assert not (elsewhere / 'assignment5.zip').exists()
    with zipfile.ZipFile(work / 'assignment5.zip') as zf:
        assert zf.testzip() is None
        names = sorted(zf.namelist())
        assert zf.read('vanilla.nopretrain.dev.predictions') == b'London\nParis\n'
        assert zf.read('vanilla.model.params') == (work / 'vanilla.model.params').read_bytes()
        assert zf.read('src/run.py') == (work / 'src' / 'run.py').read_bytes()
    assert names == sorted(sources + ['vanilla.model.params', 'vanilla.nopretrain.dev.predictions'])

    missing = [line for line in result.stderr.splitlines() if line.strip()]
    present = {'vanilla.model.params', 'vanilla.nopretrain.dev.predictions'}
    for name in EXPECTED:
        mentioned = [line for line in missing if name in line.split()]
        assert bool(mentioned) == (name not in present), (name, result.stderr)
    assert len(missing) == len(EXPECTED) - len(present)

    # No temporary file left behind.
    assert sorted(p.name for p in work.iterdir()) == sorted(
        ['src', 'collect_submission.sh', 'notes.txt', 'assignment5.zip'] + sorted(present))


def test_collect_submission_with_every_file(submission_dir, no_zip_path):
    work, sources = submission_dir
    for name in EXPECTED:
        (work / name).write_text(name + '\n')
    result = run_script(work / 'collect_submission.sh', work, no_zip_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == ''
    with zipfile.ZipFile(work / 'assignment5.zip') as zf:
        assert sorted(zf.namelist()) == sorted(sources + EXPECTED)


def test_collect_submission_fails_without_sources(submission_dir, no_zip_path):
    work, _ = submission_dir
    shutil.rmtree(work / 'src')
    result = run_script(work / 'collect_submission.sh', work, no_zip_path)
    assert result.returncode != 0
    assert 'src/*.py' in result.stderr
    assert not (work / 'assignment5.zip').exists()
