"""Shared fixtures: src/ on sys.path (flat imports, as run.py uses), the corpora, small configs, and the helpers
of the bad-input tests (run.main in-process, tiny params and files)."""
import os
import random
import subprocess
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, 'src')
if SRC not in sys.path:
    sys.path.insert(0, SRC)
import dataset  # noqa: E402
import model  # noqa: E402
import run  # noqa: E402

PAD_CHAR = '\u25A1'
MASK_CHAR = '\u2047'


# A tiny pipeline: run.py flags for every step, and the files one seed's sequences leave.
PIPELINE_TINY = ['--max_steps', '2', '--n_layer', '1', '--n_head', '2', '--n_embd', '16', '--quiet']
PIPELINE_OUTPUTS = ['vanilla.model.params', 'vanilla.nopretrain.dev.predictions',
                    'vanilla.nopretrain.test.predictions', 'vanilla.pretrain.params', 'vanilla.finetune.params',
                    'vanilla.pretrain.dev.predictions', 'vanilla.pretrain.test.predictions',
                    'synthesizer.pretrain.params', 'synthesizer.finetune.params',
                    'synthesizer.pretrain.dev.predictions', 'synthesizer.pretrain.test.predictions']


def run_pipeline(*args, timeout=900):
    """pipeline.py with these arguments, on the CPU with one thread."""
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    return subprocess.run([sys.executable, os.path.join(ROOT, 'pipeline.py'), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def read(name):
    with open(os.path.join(ROOT, name), encoding='utf-8') as f:
        return f.read()


@pytest.fixture
def single_thread():
    """One intra-op thread for the duration of a test (the modules here opt in with pytestmark).

    These tests run tiny ops on a small, shared CPU: with several threads they
    spend most of their time spinning (measured: 6 min of CPU instead of 1.3).
    The previous setting is restored so other test files are unaffected.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope='session')
def root():
    return ROOT


@pytest.fixture(scope='session')
def wiki_text():
    return read('wiki.txt')


@pytest.fixture(scope='session')
def train_tsv_text():
    return read('birth_places_train.tsv')


@pytest.fixture(scope='session')
def dev_tsv_text():
    return read('birth_dev.tsv')


@pytest.fixture(scope='session')
def char_dataset(wiki_text):
    import dataset
    return dataset.CharCorruptionDataset(wiki_text, 128)


@pytest.fixture(scope='session')
def name_dataset(char_dataset, train_tsv_text):
    import dataset
    return dataset.NameDataset(char_dataset, train_tsv_text)


def synthetic_corpus(seed=1234, n_docs=60):
    """Documents the repo never saw: random strings over an alphabet with non-ASCII letters.

    Lengths vary from 0 (empty line) through 1..3 (shorter than the minimum
    truncation) to several hundred characters (longer than any block).
    """
    rng = random.Random(seed)
    alphabet = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?()-\'"' \
               '\u00e9\u00fc\u00df\u03bb\u0436\u4e2d\u00c5\u0151\t'
    lengths = [0, 1, 2, 3, 4, 5, 7] + [rng.choice([rng.randint(1, 40), rng.randint(100, 600)])
                                       for _ in range(n_docs - 7)]
    docs = [''.join(rng.choice(alphabet) for _ in range(n)) for n in lengths]
    return '\n'.join(docs) + '\n', docs


@pytest.fixture(scope='session')
def synthetic():
    return synthetic_corpus()


def small_config(synthesizer, fused=True, block_size=16, n_embd=32, n_head=4, n_layer=2,
                 vocab_size=50, pdrop=0.0, **kw):
    import model
    return model.GPTConfig(vocab_size, block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                           embd_pdrop=pdrop, resid_pdrop=pdrop, attn_pdrop=pdrop,
                           synthesizer=synthesizer, fused_attention=fused, **kw)


def decode(ds, ids):
    return ''.join(ds.itos[int(i)] for i in ids)


def toy_dataset(n=14, T=12, vocab=30, seed=0):
    """(x, y) rows with trailing pad targets of varied length, like span corruption."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (n, T), generator=g)
    y = torch.randint(1, vocab, (n, T), generator=g)
    for i in range(n):
        cut = int(torch.randint(1, T + 1, (1,), generator=g))
        y[i, cut:] = 0
        x[i, cut + 1:] = 0
    return TensorDataset(x, y)


def tiny_model(synthesizer=False, seed=0, pdrop=0.0, block_size=16, vocab=30):
    torch.manual_seed(seed)
    return model.GPT(small_config(synthesizer, block_size=block_size, n_embd=16, n_head=2, n_layer=1,
                                  vocab_size=vocab, pdrop=pdrop))


# --- the bad-input tests (test_bad_flags.py, test_bad_files.py, test_robustness.py) ----------------------------

WIKI = os.path.join(ROOT, 'wiki.txt')
TRAIN_TSV = os.path.join(ROOT, 'birth_places_train.tsv')
DEV_TSV = os.path.join(ROOT, 'birth_dev.tsv')
TINY = ['--n_layer', '1', '--n_head', '2', '--n_embd', '16', '--max_steps', '2', '--batch_size', '8', '--quiet']


def call(argv, capsys):
    """run.main(argv) in this process: (exit status, stdout, stderr)."""
    try:
        run.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def run_script(argv):
    """`python src/run.py argv` in a subprocess: (exit status, stdout, stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    p = subprocess.run([sys.executable, os.path.join(SRC, 'run.py')] + [str(a) for a in argv],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    return p.returncode, p.stdout, p.stderr


def assert_one_error_line(code, err, status, *words):
    assert code == status, err
    assert 'Traceback' not in err
    lines = err.strip().split('\n')
    assert len(lines) == 1, err
    assert lines[0].startswith('run.py: error: '), err
    for word in words:
        assert word in lines[0], (word, lines[0])


def listing(folder):
    return sorted(os.listdir(folder))


def write(path, text, newline=None):
    with open(path, 'w', encoding='utf-8', newline=newline) as f:
        f.write(text)
    return str(path)


@pytest.fixture(scope='module')
def wiki_vocab():
    with open(WIKI, encoding='utf-8') as f:
        return dataset.CharCorruptionDataset(f.read(), run.BLOCK_SIZE)


def tiny_params(folder, vocab_size, synthesizer=False, name=None, **sizes):
    """A params file of the TINY model (or other `sizes`), freshly initialised."""
    settings = dict(n_layer=1, n_head=2, n_embd=16)
    settings.update(sizes)
    torch.manual_seed(0)  # the same file every time: an untrained model's predictions may hold any character
    gpt = model.GPT(model.GPTConfig(vocab_size, run.BLOCK_SIZE, synthesizer=synthesizer, **settings))
    path = os.path.join(folder, name or ('synthesizer.params' if synthesizer else 'vanilla.params'))
    torch.save(gpt.state_dict(), path)
    return path


@pytest.fixture
def params(tmp_path, wiki_vocab):
    return tiny_params(tmp_path, wiki_vocab.vocab_size)


@pytest.fixture
def dev_small(tmp_path):
    with open(DEV_TSV, encoding='utf-8') as f:
        lines = f.read().split('\n')[:6]
    return write(tmp_path / 'dev.tsv', '\n'.join(lines) + '\n')


@pytest.fixture
def train_small(tmp_path):
    with open(TRAIN_TSV, encoding='utf-8') as f:
        lines = f.read().split('\n')[:16]
    return write(tmp_path / 'train.tsv', '\n'.join(lines) + '\n')


def evaluate_argv(params_path, folder, variant='vanilla', eval_path=DEV_TSV):
    return ['evaluate', variant, WIKI, '--reading_params_path', params_path, '--eval_corpus_path', eval_path,
            '--outputs_path', os.path.join(folder, 'out.pred')] + TINY
