"""SPEC §2-3: NameDataset (questions and places), and dataset.py's command line printing examples of both datasets."""
import os
import subprocess
import sys

import pytest
import torch

import dataset
from conftest import MASK_CHAR, PAD_CHAR, ROOT, decode

pytestmark = pytest.mark.usefixtures('single_thread')


# ------------------------------------------------------------- NameDataset

def test_name_dataset_first_example(name_dataset):
    ds = name_dataset
    assert ds.block_size == 128
    x, y = ds[0]
    assert x.dtype == torch.long and y.dtype == torch.long
    assert x.shape == (127,) and y.shape == (127,)
    q, a = 'Where was Khatchig Mouradian born?', 'Lebanon'
    s = q + MASK_CHAR + a + MASK_CHAR
    s = s + PAD_CHAR * (128 - len(s))
    assert decode(ds, x) == s[:-1]
    assert decode(ds, y) == PAD_CHAR * (len(q) - 1) + s[len(q):]
    assert decode(ds, x).startswith('Where was Khatchig Mouradian born?\u2047Lebanon\u2047\u25A1')
    assert decode(ds, y) == PAD_CHAR * 33 + '\u2047Lebanon\u2047' + PAD_CHAR * (127 - 33 - 9)


def test_name_dataset_shares_vocabulary(name_dataset, char_dataset):
    assert name_dataset.stoi == char_dataset.stoi
    assert name_dataset.itos == char_dataset.itos
    assert name_dataset.PAD_CHAR == PAD_CHAR and name_dataset.MASK_CHAR == MASK_CHAR


def test_name_dataset_every_item(name_dataset, train_tsv_text):
    ds = name_dataset
    lines = train_tsv_text.split('\n')
    assert lines[-1] == ''
    lines = lines[:-1]
    assert len(ds) == len(lines) == 2000
    for i in range(len(ds)):
        q, a = lines[i].encode('ascii', 'ignore').decode().split('\t')
        x, y = ds[i]
        assert x.shape == (127,) and y.shape == (127,)
        nonpad = (y != 0).nonzero().flatten().tolist()
        start = len(q) - 1
        assert nonpad == list(range(start, start + len(a) + 2)), i
        assert decode(ds, y[start:start + len(a) + 2]) == MASK_CHAR + a + MASK_CHAR
        xs = decode(ds, x)
        assert xs.rstrip(PAD_CHAR) == q + MASK_CHAR + a + MASK_CHAR
        # y is the next character of s wherever it is not pad
        assert torch.equal(y[start:-1], x[start + 1:])


@pytest.mark.parametrize('text, expected', [
    ('Where was A born?\tParis\nWhere was B born?\tRome\n', 2),
    ('Where was A born?\tParis\nWhere was B born?\tRome', 2),
    ('Where was A born?\tParis\r\nWhere was B born?\tRome\r\n', 2),
    ('Where was A born?\tParis\n', 1),
])
def test_name_dataset_length_and_line_endings(char_dataset, text, expected):
    ds = dataset.NameDataset(char_dataset, text)
    assert len(ds) == expected
    x, y = ds[len(ds) - 1]
    last_answer = 'Rome' if expected == 2 else 'Paris'
    assert decode(ds, y).strip(PAD_CHAR) == MASK_CHAR + last_answer + MASK_CHAR
    assert '\r' not in decode(ds, x)


def test_name_dataset_drops_non_ascii(char_dataset):
    text = 'Where was Zo\u00eb M\u00fcller born?\tM\u00fcnchen\nWhere was \u4e2dX born?\tK\u00f8ge\n'
    ds = dataset.NameDataset(char_dataset, text)
    assert len(ds) == 2
    x, y = ds[0]
    assert decode(ds, x).rstrip(PAD_CHAR) == 'Where was Zo Mller born?' + MASK_CHAR + 'Mnchen' + MASK_CHAR
    assert decode(ds, y).strip(PAD_CHAR) == MASK_CHAR + 'Mnchen' + MASK_CHAR
    x, y = ds[1]
    assert decode(ds, x).rstrip(PAD_CHAR) == 'Where was X born?' + MASK_CHAR + 'Kge' + MASK_CHAR
    assert (y != 0).nonzero().flatten().tolist()[0] == len('Where was X born?') - 1


# ------------------------------------------------------------ command line

@pytest.fixture(scope='module')
def dataset_cli_output():
    """Both `python src/dataset.py ...` commands, started together to save wall time."""
    procs = {kind: subprocess.Popen([sys.executable, os.path.join('src', 'dataset.py'), kind], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    encoding='utf-8')
             for kind in ('namedata', 'charcorruption')}
    out = {}
    for kind, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[kind] = (p.returncode, stdout, stderr)
    return out


def xy_pairs(stdout):
    lines = stdout.splitlines()
    assert len(lines) >= 2 and len(lines) % 2 == 0, stdout
    pairs = []
    for xl, yl in zip(lines[::2], lines[1::2]):
        assert xl.startswith('x: ') and yl.startswith('y: '), (xl, yl)
        pairs.append((xl[3:], yl[3:]))
    return pairs


def test_namedata_command(dataset_cli_output):
    rc, stdout, stderr = dataset_cli_output['namedata']
    assert rc == 0, stderr
    pairs = xy_pairs(stdout)
    x, y = pairs[0]
    assert x.startswith('Where was Khatchig Mouradian born?' + MASK_CHAR + 'Lebanon' + MASK_CHAR + PAD_CHAR)
    assert y.startswith(PAD_CHAR * 33 + MASK_CHAR + 'Lebanon' + MASK_CHAR + PAD_CHAR)
    for x, y in pairs:
        assert len(x) == len(y) == 127


def test_charcorruption_command(dataset_cli_output, wiki_text):
    rc, stdout, stderr = dataset_cli_output['charcorruption']
    assert rc == 0, stderr
    pairs = xy_pairs(stdout)
    docs = wiki_text.split('\n')
    for x, y in pairs:
        assert len(x) == len(y) == 127
        assert x[1:] == y[:-1]
        content = (x + y[-1]).rstrip(PAD_CHAR)
        assert content.count(MASK_CHAR) == 2
        prefix, suffix, masked = content.split(MASK_CHAR)
        assert any(d.startswith(prefix + masked + suffix) for d in docs)
