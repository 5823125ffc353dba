"""SPEC §9 evaluate: the prompts are the original's, built here by hand as the original builds them.

The original evaluation reads the eval file in text mode and prompts with
`line.split('\\t')[0] + MASK`, so a line without a tab (every line of
birth_test_inputs.tsv) keeps its newline in the prompt and a dev line does
not. `--eval_prompt stripped` drops the newline everywhere (docs/test-prompts.md).
"""
import os

import pytest
import torch

import checks
import dataset
import model
import run
import utils
from conftest import MASK_CHAR, ROOT

pytestmark = pytest.mark.usefixtures('single_thread')

TEST_TSV = os.path.join(ROOT, 'birth_test_inputs.tsv')
DEV_TSV = os.path.join(ROOT, 'birth_dev.tsv')
WIKI = os.path.join(ROOT, 'wiki.txt')


def original_questions(path):
    """What the original's loop gives: `for line in open(path): line.split('\\t')[0]`."""
    with open(path, encoding='utf-8') as f:
        return [line.split('\t')[0] for line in f]


@pytest.fixture(scope='module')
def vocab():
    with open(WIKI, encoding='utf-8') as f:
        return dataset.CharCorruptionDataset(f.read(), run.BLOCK_SIZE)


def test_the_test_file_has_no_tabs_so_the_original_keeps_every_newline():
    questions = original_questions(TEST_TSV)
    assert len(questions) == 437 and all(q.endswith('born?\n') for q in questions)
    assert not any(q.endswith('\n') for q in original_questions(DEV_TSV))


@pytest.mark.parametrize('path', [TEST_TSV, DEV_TSV])
def test_read_questions_gives_the_originals_questions(vocab, path):
    by_hand = original_questions(path)
    questions, unknown = checks.read_questions(path, vocab.stoi)
    assert questions == by_hand and unknown == {}
    stripped, _ = checks.read_questions(path, vocab.stoi, prompt='stripped')
    assert stripped == [q.rstrip('\n') for q in by_hand]


@pytest.mark.parametrize('text', [
    'Where was A born?\nWhere was B born?',            # no final newline: the last line has none
    'Where was A born?\r\nWhere was B born?\r\n',      # CRLF: text mode reads it as LF
    'Where was A born?\n\nWhere was B born?\n',        # an empty line is a prompt of one newline
    'Where was A born?\tParis\nWhere was B born?\tRome',
    'Where was A born?\nWhere was B born?\n\n',       # a final empty line too
])
def test_read_questions_follows_text_mode_lines(tmp_path, vocab, text):
    path = tmp_path / 'eval.tsv'
    path.write_bytes(text.encode('utf-8'))
    questions, unknown = checks.read_questions(str(path), vocab.stoi)
    assert questions == original_questions(path) and unknown == {}
    stripped, _ = checks.read_questions(str(path), vocab.stoi, prompt='stripped')
    assert stripped == [q.rstrip('\n') for q in original_questions(path)]


def test_lines_as_read_is_text_mode_iteration(tmp_path):
    for text in ['', 'a', 'a\n', 'a\nb', 'a\n\n', '\n', 'a\tb\nc\td\n']:
        path = tmp_path / 'f.txt'
        path.write_text(text, encoding='utf-8')
        with open(path, encoding='utf-8') as f:
            assert checks.lines_as_read(text) == list(f), repr(text)


def tiny_params(tmp_path, vocab_size, synthesizer=False):
    utils.set_seed(0)
    config = model.GPTConfig(vocab_size, run.BLOCK_SIZE, n_layer=1, n_head=2, n_embd=16, synthesizer=synthesizer)
    path = tmp_path / 'tiny.params'
    torch.save(model.GPT(config).state_dict(), path)
    return path


@pytest.mark.parametrize('prompt', [None, 'original', 'stripped'])
def test_evaluate_feeds_the_originals_prompts(tmp_path, vocab, monkeypatch, capsys, prompt):
    """run.py evaluate on the test file: the token ids the decoder gets are the hand-built prompts' (in order)."""
    params = tiny_params(tmp_path, vocab.vocab_size)
    seen = []
    decode = utils.greedy_decode

    def spy(gpt, prompts, steps, **kwargs):
        seen.extend(prompts)
        return decode(gpt, prompts, steps, **kwargs)
    monkeypatch.setattr(utils, 'greedy_decode', spy)
    argv = ['evaluate', 'vanilla', WIKI, '--reading_params_path', params, '--eval_corpus_path', TEST_TSV,
            '--outputs_path', tmp_path / 'test.predictions', '--n_layer', '1', '--n_head', '2', '--n_embd', '16',
            '--device', 'cpu', '--quiet'] + (['--eval_prompt', prompt] if prompt else [])
    run.main([str(a) for a in argv])
    capsys.readouterr()
    questions = original_questions(TEST_TSV)
    if prompt == 'stripped':
        questions = [q.rstrip('\n') for q in questions]
    by_hand = [[vocab.stoi[c] for c in q + MASK_CHAR] for q in questions]
    assert sorted(seen) == sorted(by_hand)     # greedy_decode groups them by length
    assert len(seen) == 437
    ends = {tuple(p[-2:]) for p in seen}
    newline = vocab.stoi['\n']
    assert ends == ({(newline, vocab.stoi[MASK_CHAR])} if prompt != 'stripped' else {(vocab.stoi['?'],
                                                                                     vocab.stoi[MASK_CHAR])})


def test_eval_prompt_refuses_other_values(tmp_path, vocab, capsys):
    with pytest.raises(SystemExit) as info:
        run.main(['evaluate', 'vanilla', WIKI, '--reading_params_path', 'x', '--eval_corpus_path', TEST_TSV,
                  '--outputs_path', str(tmp_path / 'p'), '--eval_prompt', 'newline'])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().split('\n')) == 1 and '--eval_prompt' in err
    assert os.listdir(tmp_path) == []
