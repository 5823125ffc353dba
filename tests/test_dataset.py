"""SPEC §2, §4: the vocabulary and CharCorruptionDataset (span corruption); test_name_dataset.py: NameDataset.

The span-corruption properties are checked statistically over thousands of
draws, on wiki.txt and on a synthetic corpus the repo never saw, at two block
sizes, the way an autograder that samples the dataset on its own data would.
"""
import os
import random
import statistics
import subprocess
import sys

import pytest
import torch

import dataset
from conftest import MASK_CHAR, PAD_CHAR, SRC, decode, synthetic_corpus

pytestmark = pytest.mark.usefixtures('single_thread')

N_DRAWS = 3000


# ---------------------------------------------------------------- vocabulary

def test_special_characters_are_the_contract_ones():
    assert dataset.PAD_CHAR == PAD_CHAR == '\u25A1'
    assert dataset.MASK_CHAR == MASK_CHAR == '\u2047'


def test_wiki_vocabulary(wiki_text, char_dataset):
    ds = char_dataset
    assert ds.vocab_size == 256
    assert len(ds.stoi) == len(ds.itos) == 256
    assert ds.block_size == 128
    assert ds.stoi[PAD_CHAR] == 0 and ds.itos[0] == PAD_CHAR
    assert ds.stoi[MASK_CHAR] == 1 and ds.itos[1] == MASK_CHAR
    assert ds.PAD_CHAR == PAD_CHAR and ds.MASK_CHAR == MASK_CHAR
    expected = [PAD_CHAR, MASK_CHAR] + sorted(set(wiki_text))
    assert [ds.itos[i] for i in range(256)] == expected
    assert all(ds.stoi[c] == i for i, c in enumerate(expected))
    # ids 2.. strictly increasing in code point
    assert all(ord(ds.itos[i]) < ord(ds.itos[i + 1]) for i in range(2, 255))


def test_synthetic_vocabulary_and_stability(synthetic):
    text, docs = synthetic
    ds = dataset.CharCorruptionDataset(text, 64)
    expected = [PAD_CHAR, MASK_CHAR] + sorted(set(text))
    assert ds.vocab_size == len(expected)
    assert ds.itos == dict(enumerate(expected))
    assert ds.stoi == {c: i for i, c in enumerate(expected)}
    # same corpus -> same ids; the ids do not depend on document order either
    again = dataset.CharCorruptionDataset(text, 128)
    assert again.stoi == ds.stoi and again.itos == ds.itos
    shuffled = docs[:]
    random.Random(5).shuffle(shuffled)
    other_order = dataset.CharCorruptionDataset('\n'.join(shuffled) + '\n', 64)
    assert other_order.stoi == ds.stoi


@pytest.mark.parametrize('special', [PAD_CHAR, MASK_CHAR])
def test_corpus_with_special_character_is_rejected(special):
    with pytest.raises(ValueError):
        dataset.CharCorruptionDataset('hello world\nfoo' + special + 'bar\n', 32)


@pytest.mark.parametrize('text, expected', [
    ('abcd\nefgh\n', 2),
    ('abcd\nefgh', 2),
    ('abcd\n\nefgh\n', 3),      # an empty document in the middle counts
    ('abcd\n\n', 2),            # only the very last empty string is dropped
    ('abcd', 1),
    ('\n', 1),
])
def test_char_dataset_length(text, expected):
    assert len(dataset.CharCorruptionDataset(text, 32)) == expected


def test_import_has_no_side_effects(tmp_path):
    """`import dataset` from an empty directory: no output, no data files opened, no sockets."""
    code = (
        "import sys, os\n"
        f"sys.path.insert(0, {SRC!r})\n"
        "import torch, torch.utils.data, argparse, random\n"   # pre-import dependencies
        "events = []\n"
        "def hook(name, args):\n"
        "    if name == 'open':\n"
        "        path = str(args[0])\n"
        "        if not path.endswith(('.py', '.pyc', '.so')) and not os.path.isdir(path):\n"
        "            events.append(('open', path))\n"
        "    elif name.startswith('socket.'):\n"
        "        events.append((name, ''))\n"
        "sys.addaudithook(hook)\n"
        "import dataset\n"
        "assert hasattr(dataset, 'CharCorruptionDataset') and hasattr(dataset, 'NameDataset')\n"
        "if events:\n"
        "    sys.stderr.write('SIDE EFFECTS: %r' % events)\n"
        "    sys.exit(3)\n"
    )
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE='1')
    result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ''
    assert result.stderr == ''
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------- span corruption

def parse_item(ds, x, y):
    """Check the structural properties of one item; return (prefix, masked, suffix)."""
    bs = ds.block_size
    assert x.dtype == torch.long and y.dtype == torch.long
    assert x.dim() == 1 and y.dim() == 1
    assert x.shape == (bs - 1,) and y.shape == (bs - 1,)
    assert torch.equal(y[:-1], x[1:])
    s = decode(ds, x) + ds.itos[int(y[-1])]
    assert len(s) == bs
    content = s.rstrip(PAD_CHAR)
    assert PAD_CHAR not in content, 'padding must only be at the end'
    assert content.count(MASK_CHAR) == 2, 'exactly two MASK characters before the padding'
    prefix, suffix, masked = content.split(MASK_CHAR)
    return prefix, masked, suffix


def draw(ds, idx, n):
    out = []
    for _ in range(n):
        x, y = ds[idx]
        out.append(parse_item(ds, x, y))
    return out


def corpora():
    return ['wiki-128', 'synthetic-128', 'synthetic-64', 'wiki-64', 'synthetic-20']


@pytest.fixture(scope='module', params=corpora())
def corpus(request, wiki_text):
    name, bs = request.param.split('-')
    if name == 'wiki':
        text = wiki_text
        docs = text.split('\n')[:-1]
    else:
        text, docs = synthetic_corpus()
    return dataset.CharCorruptionDataset(text, int(bs)), docs


def test_every_document_reconstructs(corpus):
    """Random items over the whole corpus: prefix+masked+suffix is a bounded prefix of the document."""
    ds, docs = corpus
    assert len(ds) == len(docs)
    cap = int(ds.block_size * 7 / 8)
    rng = random.Random(0)
    random.seed(1)
    for _ in range(N_DRAWS):
        idx = rng.randrange(len(ds))
        prefix, masked, suffix = draw(ds, idx, 1)[0]
        kept = prefix + masked + suffix
        doc = docs[idx]
        assert doc.startswith(kept)
        assert len(kept) <= cap
        assert len(kept) >= min(4, len(doc)), 'truncation length is at least 4'


def test_short_documents(synthetic):
    """Documents shorter than 4 characters are kept whole."""
    text, docs = synthetic
    for bs in (64, 128):
        ds = dataset.CharCorruptionDataset(text, bs)
        random.seed(2)
        for idx, doc in enumerate(docs):
            if len(doc) >= 4:
                continue
            for prefix, masked, suffix in draw(ds, idx, 200):
                assert prefix + masked + suffix == doc


def test_span_statistics_on_long_document(corpus):
    """Truncation covers 4..int(bs*7/8); the masked span averages ~1/4 and varies; its position is random."""
    ds, docs = corpus
    cap = int(ds.block_size * 7 / 8)
    long_docs = [i for i, d in enumerate(docs) if len(d) >= 2 * ds.block_size]
    assert long_docs
    idx = long_docs[0]
    random.seed(3)
    items = draw(ds, idx, N_DRAWS)
    kept_lengths = [len(p) + len(m) + len(s) for p, m, s in items]
    for (p, m, s), n in zip(items, kept_lengths):
        assert docs[idx][:n] == p + m + s
    # every truncation length 4..cap is possible, nothing outside
    assert set(kept_lengths) == set(range(4, cap + 1))
    # roughly uniform: each length appears (expected N/(cap-3) times)
    expected = N_DRAWS / (cap - 3)
    counts = [kept_lengths.count(n) for n in range(4, cap + 1)]
    assert max(counts) < 3 * expected
    assert abs(statistics.mean(kept_lengths) - (4 + cap) / 2) < 0.08 * cap

    masked = [len(m) for _, m, _ in items]
    ratio = sum(masked) / sum(kept_lengths)
    assert 0.2 < ratio < 0.3, f'masked length averages {ratio:.3f} of the kept length, not ~1/4'
    rel = [m / n for m, n in zip(masked, kept_lengths)]
    assert statistics.pstdev(masked) > cap / 20
    assert any(r < 0.2 for r in rel) and any(r > 0.3 for r in rel), 'masked length must vary'
    # for a fixed kept length the masked length still varies
    at_cap = [m for m, n in zip(masked, kept_lengths) if n == cap // 2 + 4]
    assert len(set(at_cap)) > 3

    # position: prefix length relative to the room available, ~uniform on [0, 1]
    room = max(4, cap // 8)
    pos = [len(p) / (n - m) for (p, m_, s), n, m in zip(items, kept_lengths, masked) if n - m >= room]
    assert len(pos) > N_DRAWS // 3
    assert abs(statistics.mean(pos) - 0.5) < 0.05
    assert 0.22 < statistics.pstdev(pos) < 0.37
    assert min(pos) < 0.05 and max(pos) > 0.95
    starts = {len(p) for p, _, _ in items}
    assert len(starts) > cap // 2


def test_fresh_randomness_each_call(char_dataset):
    random.seed(4)
    items = {tuple(char_dataset[0][0].tolist()) for _ in range(50)}
    assert len(items) > 40


def test_randomness_comes_from_python_random(char_dataset):
    random.seed(5)
    torch.manual_seed(0)
    a = [char_dataset[i] for i in range(20)]
    random.seed(5)
    torch.manual_seed(1)
    b = [char_dataset[i] for i in range(20)]
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    random.seed(6)
    c = [char_dataset[i] for i in range(20)]
    assert any(not torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


def test_spec_example_structure(char_dataset):
    """The SPEC §4 example decomposes as prefix + MASK + suffix + MASK + masked + pads."""
    ds = char_dataset
    x_text = ('Khatchig Mouradian. Khatchig Mouradian is a jour' + MASK_CHAR + 'and tran' + MASK_CHAR
              + 'nalist, writer ' + MASK_CHAR + PAD_CHAR * 4)
    prefix, suffix, masked = x_text.rstrip(PAD_CHAR).split(MASK_CHAR)[:3]
    doc = ds.data[0]
    assert doc.startswith('Khatchig Mouradian.')
    assert doc.startswith(prefix + masked + suffix)
