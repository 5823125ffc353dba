"""Shared fixtures: src/ on sys.path (flat imports, as run.py uses), the corpora, small configs."""
import os
import random
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, 'src')
if SRC not in sys.path:
    sys.path.insert(0, SRC)

PAD_CHAR = '\u25A1'
MASK_CHAR = '\u2047'


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
