"""Bad inputs get one clear line, a non-zero exit and no traceback, before anything is trained or written.

Most cases call run.main(argv) in-process (SystemExit carries the status); a
few go through a real `python src/run.py` subprocess. Every failing case also
checks that no file appeared in the folder it would have written to.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import checks
import dataset
import evaluation
import model
import run
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, 'src')  # on sys.path through conftest

WIKI = os.path.join(ROOT, 'wiki.txt')
TRAIN_TSV = os.path.join(ROOT, 'birth_places_train.tsv')
DEV_TSV = os.path.join(ROOT, 'birth_dev.tsv')
TINY = ['--n_layer', '1', '--n_head', '2', '--n_embd', '16', '--max_steps', '2', '--batch_size', '8', '--quiet']


pytestmark = pytest.mark.usefixtures('single_thread')  # conftest: tiny models, one thread


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


# --- real subprocesses ---------------------------------------------------------

def test_subprocess_missing_corpus(tmp_path):
    before = listing(tmp_path)
    code, out, err = run_script(['pretrain', 'vanilla', tmp_path / 'nope.txt',
                                 '--writing_params_path', tmp_path / 'x.params'] + TINY)
    assert_one_error_line(code, err, 1, 'PRETRAIN_CORPUS_PATH', 'nope.txt', 'no such file')
    assert listing(tmp_path) == before


def test_subprocess_bad_choice_is_one_line(tmp_path):
    code, out, err = run_script(['pretrain', 'vanila', WIKI, '--writing_params_path', tmp_path / 'x.params'])
    assert_one_error_line(code, err, 2, "invalid choice: 'vanila'", '--help')
    assert listing(tmp_path) == []


def test_subprocess_unknown_characters_warn_and_continue(tmp_path, params):
    eval_path = write(tmp_path / 'eval.tsv', 'Where was Ada born?\tLondon\nWhere was ~Bob~ born?\tParis\n'
                                             'Where was Cy born?\tRome\n')
    out_path = tmp_path / 'out.pred'
    code, out, err = run_script(['evaluate', 'vanilla', WIKI, '--reading_params_path', params,
                                 '--eval_corpus_path', eval_path, '--outputs_path', out_path] + TINY)
    assert code == 0, err
    assert 'Traceback' not in err
    warnings = [line for line in err.split('\n') if line.startswith('warning:')]
    assert len(warnings) == 1 and 'eval.tsv line 2' in warnings[0] and "'~'" in warnings[0]
    predictions = out_path.read_text(encoding='utf-8').split('\n')
    assert len(predictions) == 4 and predictions[1] == '' and predictions[3] == ''
    assert 'Correct:' in out and 'out of 3.0' in out


# --- flags and settings ------------------------------------------------------------

@pytest.mark.parametrize('argv, words', [
    (['pretrain', 'vanilla', WIKI], ['pretrain needs --writing_params_path']),
    (['finetune', 'vanilla', WIKI, '--writing_params_path', 'PLACEHOLDER'], ['finetune needs --finetune_corpus_path']),
    (['finetune', 'vanilla', WIKI, '--finetune_corpus_path', TRAIN_TSV], ['finetune needs --writing_params_path']),
    (['finetune', 'vanilla', WIKI], ['--finetune_corpus_path and --writing_params_path']),
    (['evaluate', 'vanilla', WIKI, '--reading_params_path', 'x', '--eval_corpus_path', DEV_TSV],
     ['evaluate needs --outputs_path']),
    (['evaluate', 'vanilla', WIKI, '--reading_params_path', 'x', '--outputs_path', 'PLACEHOLDER'],
     ['evaluate needs --eval_corpus_path']),
    (['evaluate', 'vanilla', WIKI, '--eval_corpus_path', DEV_TSV, '--outputs_path', 'PLACEHOLDER'],
     ['evaluate needs --reading_params_path']),
])
def test_missing_flag(tmp_path, capsys, argv, words):
    argv = [str(tmp_path / 'out') if a == 'PLACEHOLDER' else a for a in argv]
    code, out, err = call(argv + TINY, capsys)
    assert_one_error_line(code, err, 2, *words)
    assert listing(tmp_path) == []


@pytest.mark.parametrize('extra, words', [
    (['--n_embd', '15'], ['--n_embd 15 is not divisible by --n_head 2']),
    (['--batch_size', '0'], ['--batch_size must be at least 1']),
    (['--learning_rate', '-1'], ['--learning_rate must be a finite number above 0, got -1.0']),
    (['--learning_rate', 'nan'], ['--learning_rate must be a finite number above 0, got nan']),
    (['--learning_rate', 'inf'], ['--learning_rate must be a finite number above 0, got inf']),
    (['--learning_rate', '0'], ['--learning_rate must be a finite number above 0, got 0.0']),
    (['--weight_decay', '-0.1'], ['--weight_decay must be a finite number, 0 or more, got -0.1']),
    (['--weight_decay', 'nan'], ['--weight_decay must be a finite number, 0 or more, got nan']),
    (['--weight_decay', '1e999'], ['--weight_decay must be a finite number, 0 or more, got inf']),
    (['--dropout', '1.5'], ['--dropout must be in [0, 1)']),
    (['--dropout', 'nan'], ['--dropout must be in [0, 1), got nan']),
    (['--dropout=-inf'], ['--dropout must be in [0, 1), got -inf']),
    (['--checkpoint_minutes', 'nan'], ['--checkpoint_minutes must be a finite number, 0 or more, got nan']),
    (['--checkpoint_minutes', 'inf'], ['--checkpoint_minutes must be a finite number, 0 or more, got inf']),
    (['--max_epochs', '0'], ['--max_epochs must be at least 1']),
    (['--max_steps', '-3'], ['--max_steps must be at least 1']),
    (['--chunks', '0'], ['--chunks must be at least 1']),
    (['--n_layer', '0'], ['--n_layer must be at least 1']),
    (['--n_head', '0'], ['--n_head must be at least 1']),
    (['--num_workers', '-1'], ['--num_workers must be 0 or more']),
    (['--seed', '-1'], ['--seed must be a whole number from 0 to 4294967295', 'got -1']),
    (['--seed', str(2 ** 32)], ['--seed must be a whole number from 0 to 4294967295']),
    (['--n_layer', '1000000000'], ['the model has at least', 'GiB', 'use a smaller --n_layer or --n_embd']),
    (['--n_embd', '100000000', '--n_head', '1'], ['the model has at least', 'use a smaller --n_layer or --n_embd']),
    (['--learning_rate', 'fast'], ["argument --learning_rate: invalid float value: 'fast'"]),
    (['--precision', 'fp16'], ["argument --precision: invalid choice: 'fp16'", "'fp32', 'bf16', 'auto'"]),
    (['--batching', 'sorted'], ["argument --batching: invalid choice: 'sorted'", "'random', 'stratified'"]),
    (['--weight_decay_on', 'norms'], ["argument --weight_decay_on: invalid choice: 'norms'", "'all', 'matrices'"]),
    (['--checkpoint_minutes', '-1'], ['--checkpoint_minutes must be a finite number, 0 or more']),
    (['--device', 'no-such-device'], ['--device no-such-device: not usable here']),
    (['--resume'], []),  # checked below: pretrain --resume without a checkpoint is a file error
])
def test_bad_settings(tmp_path, capsys, extra, words):
    code, out, err = call(['pretrain', 'vanilla', WIKI, '--writing_params_path', tmp_path / 'x.params']
                          + TINY + extra, capsys)
    if extra == ['--resume']:
        assert_one_error_line(code, err, 1, 'no checkpoint at', 'run without --resume')
    else:
        assert_one_error_line(code, err, 2, *words)
    assert listing(tmp_path) == []


@pytest.mark.parametrize('extra, words', [
    (['--batching', 'stratified'], ['--batching stratified runs in one process only; leave it out under torchrun']),
    (['--data_path', 'device'], ['--data_path device and --train_step fixed|graph run in one process only']),
    (['--train_step', 'fixed'], ['--data_path device and --train_step fixed|graph run in one process only']),
])
def test_one_process_settings_refused_under_torchrun(tmp_path, capsys, monkeypatch, extra, words):
    monkeypatch.setenv('WORLD_SIZE', '2')  # as torchrun sets it; rank 0, so no wait for another rank to exit
    monkeypatch.setenv('RANK', '0')
    code, out, err = call(['pretrain', 'vanilla', WIKI, '--writing_params_path', tmp_path / 'x.params']
                          + TINY + extra, capsys)
    assert_one_error_line(code, err, 2, *words)
    assert listing(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason='CUDA is present here')
def test_cuda_without_gpu(tmp_path, capsys):
    code, out, err = call(['pretrain', 'vanilla', WIKI, '--writing_params_path', tmp_path / 'x.params',
                           '--device', 'cuda'] + TINY, capsys)
    assert_one_error_line(code, err, 2, '--device cuda: not usable here', '--device cpu')


def test_resume_with_evaluate(tmp_path, capsys, params):
    code, out, err = call(['evaluate', 'vanilla', WIKI, '--reading_params_path', params, '--eval_corpus_path',
                           DEV_TSV, '--outputs_path', tmp_path / 'o', '--resume'] + TINY, capsys)
    assert_one_error_line(code, err, 2, 'evaluate has nothing to resume')


# --- the pretraining corpus -------------------------------------------------------------

def pretrain_argv(corpus, folder):
    return ['pretrain', 'vanilla', corpus, '--writing_params_path', os.path.join(folder, 'x.params')] + TINY


@pytest.mark.parametrize('content, words', [
    ('', ['is empty']),
    ('\n\n  \n', ['is empty']),
    ('first line\nsecond \u25A1 line\n', ['line 2', 'pad character U+25A1']),
    ('a\nb\nc \u2047\n', ['line 3', 'mask character U+2047']),
])
def test_bad_corpus_text(tmp_path, capsys, content, words):
    corpus = write(tmp_path / 'corpus.txt', content)
    before = listing(tmp_path)
    code, out, err = call(pretrain_argv(corpus, tmp_path), capsys)
    assert_one_error_line(code, err, 1, 'PRETRAIN_CORPUS_PATH', 'corpus.txt', *words)
    assert listing(tmp_path) == before


def test_corpus_not_utf8(tmp_path, capsys):
    corpus = tmp_path / 'latin1.txt'
    corpus.write_bytes('caf\xe9 au lait\n'.encode('latin-1'))
    code, out, err = call(pretrain_argv(corpus, tmp_path), capsys)
    assert_one_error_line(code, err, 1, 'is not UTF-8 text', 'byte 0xe9 at offset 3')
    assert listing(tmp_path) == ['latin1.txt']


def test_corpus_is_a_folder(tmp_path, capsys):
    code, out, err = call(pretrain_argv(tmp_path, tmp_path), capsys)
    assert_one_error_line(code, err, 1, 'is a folder')
    assert listing(tmp_path) == []


def test_corpus_unreadable(tmp_path, capsys, monkeypatch):
    corpus = write(tmp_path / 'secret.txt', 'text\n')

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, 'Permission denied', str(path))
    monkeypatch.setattr(checks, 'open', refuse, raising=False)
    code, out, err = call(pretrain_argv(corpus, tmp_path), capsys)
    assert_one_error_line(code, err, 1, 'secret.txt', 'permission denied')
    assert listing(tmp_path) == ['secret.txt']


# --- params files ------------------------------------------------------------------------------------

def evaluate_argv(params_path, folder, variant='vanilla', eval_path=DEV_TSV):
    return ['evaluate', variant, WIKI, '--reading_params_path', params_path, '--eval_corpus_path', eval_path,
            '--outputs_path', os.path.join(folder, 'out.pred')] + TINY


class Exploit:
    """Unpickling this would create a folder: proof that code ran."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_params_missing(tmp_path, capsys):
    code, out, err = call(evaluate_argv(tmp_path / 'nope.params', tmp_path), capsys)
    assert_one_error_line(code, err, 1, '--reading_params_path', 'nope.params: no such file')
    assert listing(tmp_path) == []


def test_params_is_a_folder(tmp_path, capsys):
    os.mkdir(tmp_path / 'dir.params')
    code, out, err = call(evaluate_argv(tmp_path / 'dir.params', tmp_path), capsys)
    assert_one_error_line(code, err, 1, 'is a folder')


@pytest.mark.parametrize('kind', ['text', 'empty', 'truncated'])
def test_params_corrupt(tmp_path, capsys, params, kind):
    path = tmp_path / 'bad.params'
    if kind == 'text':
        path.write_text('these are not weights\n')
    elif kind == 'empty':
        path.write_bytes(b'')
    else:
        data = open(params, 'rb').read()
        path.write_bytes(data[:len(data) // 2])
    before = listing(tmp_path)
    code, out, err = call(evaluate_argv(path, tmp_path), capsys)
    assert_one_error_line(code, err, 1, 'bad.params is not a params file or is corrupt')
    assert listing(tmp_path) == before


def test_params_needing_unpickling_are_refused(tmp_path, capsys):
    target = tmp_path / 'code-ran'
    path = tmp_path / 'evil.params'
    torch.save({'tok_emb.weight': torch.zeros(2, 2), 'payload': Exploit(str(target))}, path)
    code, out, err = call(evaluate_argv(path, tmp_path), capsys)
    assert_one_error_line(code, err, 1, 'evil.params refused', 'arbitrary unpickling', 'makedirs')
    assert not target.exists()


def test_params_not_a_state_dict(tmp_path, capsys):
    path = tmp_path / 'list.params'
    torch.save([torch.zeros(3)], path)
    code, out, err = call(evaluate_argv(path, tmp_path), capsys)
    assert_one_error_line(code, err, 1, 'holds a list, not a params file')


@pytest.mark.parametrize('held, asked', [('vanilla', 'synthesizer'), ('synthesizer', 'vanilla')])
def test_params_of_the_other_variant(tmp_path, capsys, wiki_vocab, held, asked):
    path = tiny_params(tmp_path, wiki_vocab.vocab_size, synthesizer=held == 'synthesizer')
    code, out, err = call(evaluate_argv(path, tmp_path, variant=asked), capsys)
    assert_one_error_line(code, err, 1, f'holds {held} params, but the variant is {asked}')
    assert not os.path.exists(tmp_path / 'out.pred')


def test_params_with_another_vocabulary(tmp_path, capsys):
    path = tiny_params(tmp_path, 300)
    code, out, err = call(evaluate_argv(path, tmp_path), capsys)
    assert_one_error_line(code, err, 1, 'vocabulary of 300 characters', '300 x 16', 'gives 256', '256 x 16')


def test_params_with_another_width(tmp_path, capsys, wiki_vocab):
    path = tiny_params(tmp_path, wiki_vocab.vocab_size, n_embd=32)
    code, out, err = call(evaluate_argv(path, tmp_path), capsys)
    assert_one_error_line(code, err, 1, '256 x 32 in the file but 256 x 16 in the model', '--n_embd')


def test_params_with_more_layers(tmp_path, capsys, wiki_vocab):
    path = tiny_params(tmp_path, wiki_vocab.vocab_size, n_layer=2)
    code, out, err = call(evaluate_argv(path, tmp_path), capsys)
    assert_one_error_line(code, err, 1, 'has 2 Transformer blocks but the model has 1', '--n_layer')


def test_synthesizer_params_with_other_heads(tmp_path, capsys, wiki_vocab):
    path = tiny_params(tmp_path, wiki_vocab.vocab_size, synthesizer=True, n_head=4)
    code, out, err = call(evaluate_argv(path, tmp_path, variant='synthesizer'), capsys)
    assert_one_error_line(code, err, 1, 'blocks.0.attn.w2 is 4 x 127 in the file but 8 x 127', '--n_head')


def test_training_checkpoint_is_not_params(tmp_path, capsys, params):
    path = tmp_path / 'run.ckpt'
    torch.save({'format': 'birthplace training checkpoint v1', 'model': torch.load(params, map_location='cpu')}, path)
    code, out, err = call(evaluate_argv(path, tmp_path), capsys)
    assert_one_error_line(code, err, 1, 'is a training checkpoint, not a params file', '--resume')


# --- the finetuning TSV -------------------------------------------------------------------------------

def finetune_argv(tsv, folder):
    return ['finetune', 'vanilla', WIKI, '--finetune_corpus_path', tsv,
            '--writing_params_path', os.path.join(folder, 'ft.params')] + TINY


@pytest.mark.parametrize('content, words', [
    ('Where was A born?\tRome\nWhere was B born? Paris\n', ['line 2 has no tab', 'question<TAB>place']),
    ('Where was A born?\tRome\tItaly\n', ['line 1 has 2 tabs']),
    ('Where was A born?\tRome\n\nWhere was B born?\tOslo\n', ['line 2 is empty']),
    ('Where was A born?\tRome\n' + 'Where was ' + 'X' * 100 + ' born?\tBuenos Aires\n',
     ['line 2 is too long', 'len(question) + len(place) + 2 <= block size 128']),
    ('Where was A born?\tRome\nWhere was A~B born?\tRome\n', ['line 2 has characters', "'~'", 'wiki.txt']),
    ('', ['has no lines']),
])
def test_bad_finetune_tsv(tmp_path, capsys, content, words):
    tsv = write(tmp_path / 'train.tsv', content)
    before = listing(tmp_path)
    code, out, err = call(finetune_argv(tsv, tmp_path), capsys)
    assert_one_error_line(code, err, 1, '--finetune_corpus_path', 'train.tsv', *words)
    assert listing(tmp_path) == before


def test_finetune_tsv_missing(tmp_path, capsys):
    code, out, err = call(finetune_argv(tmp_path / 'nope.tsv', tmp_path), capsys)
    assert_one_error_line(code, err, 1, '--finetune_corpus_path', 'no such file')
    assert listing(tmp_path) == []


def test_longest_finetune_line_that_fits_is_accepted(tmp_path, wiki_vocab):
    question = 'Where was ' + 'X' * 90 + ' born?'
    place = 'P' * (128 - 2 - len(question))
    ok = dataset.NameDataset(wiki_vocab, f'{question}\t{place}\n')
    checks.check_finetune(ok, 'ok.tsv', 'wiki.txt')
    x, y = ok[0]
    assert len(x) == len(y) == 127
    too_long = dataset.NameDataset(wiki_vocab, f'{question}\t{place}P\n')
    with pytest.raises(checks.BadInput, match='line 1 is too long'):
        checks.check_finetune(too_long, 'long.tsv', 'wiki.txt')


# --- the evaluation TSV ------------------------------------------------------------------------------------

def test_eval_file_missing(tmp_path, capsys, params):
    code, out, err = call(evaluate_argv(params, tmp_path, eval_path=tmp_path / 'nope.tsv'), capsys)
    assert_one_error_line(code, err, 1, '--eval_corpus_path', 'nope.tsv: no such file')
    assert not os.path.exists(tmp_path / 'out.pred')


def test_eval_file_empty(tmp_path, capsys, params):
    code, out, err = call(evaluate_argv(params, tmp_path, eval_path=write(tmp_path / 'e.tsv', '')), capsys)
    assert_one_error_line(code, err, 1, 'e.tsv has no lines')
    assert not os.path.exists(tmp_path / 'out.pred')


def test_eval_file_with_a_line_missing_its_place(tmp_path, capsys, params):
    eval_path = write(tmp_path / 'e.tsv', 'Where was A born?\tRome\nWhere was B born?\nWhere was C born?\tOslo\n')
    code, out, err = call(evaluate_argv(params, tmp_path, eval_path=eval_path), capsys)
    assert_one_error_line(code, err, 1, 'e.tsv line 2 has no place after a tab')
    assert not os.path.exists(tmp_path / 'out.pred')


def test_synthesizer_question_too_long(tmp_path, capsys, wiki_vocab):
    path = tiny_params(tmp_path, wiki_vocab.vocab_size, synthesizer=True)
    fits, too_long = 'W' * 95, 'W' * 96
    eval_path = write(tmp_path / 'e.tsv', f'{fits}\tRome\n{too_long}\tOslo\n')
    code, out, err = call(evaluate_argv(path, tmp_path, variant='synthesizer', eval_path=eval_path), capsys)
    assert_one_error_line(code, err, 1, 'e.tsv line 2', '96 characters', '128 positions',
                          'more than the 127 it supports', '95 characters or fewer')
    assert not os.path.exists(tmp_path / 'out.pred')


def test_long_questions_decode_with_cropping_on_vanilla(tmp_path, capsys, params, wiki_vocab):
    """As in the original, vanilla crops the context of a question too long for the block."""
    eval_path = write(tmp_path / 'e.tsv', 'W' * 96 + '\tRome\n' + 'W' * 140 + '\tOslo\n')
    code, out, err = call(evaluate_argv(params, tmp_path, eval_path=eval_path), capsys)
    assert code == 0, err
    gpt = model.GPT(model.GPTConfig(wiki_vocab.vocab_size, 128, n_layer=1, n_head=2, n_embd=16))
    gpt.load_state_dict(torch.load(params, map_location='cpu'))
    expected = []
    for q in ('W' * 96, 'W' * 140):
        prompt = [wiki_vocab.stoi[c] for c in q + dataset.MASK_CHAR]
        decoded = utils.sample(gpt, torch.tensor([prompt]), 32)[0, len(prompt):].tolist()
        completion = q + dataset.MASK_CHAR + ''.join(wiki_vocab.itos[i] for i in decoded)
        expected.append(completion.split(dataset.MASK_CHAR)[1])
    assert (tmp_path / 'out.pred').read_text(encoding='utf-8').split('\n')[:2] == expected


# --- output paths --------------------------------------------------------------------------------------

@pytest.mark.parametrize('flag', ['--writing_params_path', '--metrics_path', '--checkpoint_path'])
def test_training_output_in_missing_folder(tmp_path, capsys, flag):
    argv = ['pretrain', 'vanilla', WIKI, '--writing_params_path', tmp_path / 'x.params'] + TINY
    argv += [flag, tmp_path / 'no' / 'such' / 'file']
    code, out, err = call(argv, capsys)
    assert_one_error_line(code, err, 1, flag, 'the folder', 'does not exist', 'create it first')
    assert listing(tmp_path) == []


def test_training_output_is_a_folder(tmp_path, capsys):
    os.mkdir(tmp_path / 'out')
    code, out, err = call(['pretrain', 'vanilla', WIKI, '--writing_params_path', tmp_path / 'out'] + TINY, capsys)
    assert_one_error_line(code, err, 1, '--writing_params_path', 'is a folder')
    assert listing(tmp_path) == ['out'] and listing(tmp_path / 'out') == []


def test_outputs_path_problems(tmp_path, capsys, params):
    os.mkdir(tmp_path / 'dir')
    for target, words in ((tmp_path / 'dir', ['is a folder']), (tmp_path / 'nope' / 'o.pred', ['does not exist'])):
        argv = evaluate_argv(params, tmp_path)
        argv[argv.index('--outputs_path') + 1] = str(target)
        code, out, err = call(argv, capsys)
        assert_one_error_line(code, err, 1, '--outputs_path', *words)
    assert listing(tmp_path) == ['dir', 'vanilla.params'] and listing(tmp_path / 'dir') == []


def test_outputs_never_overwrite_inputs(tmp_path, capsys, params, dev_small):
    original = open(dev_small, encoding='utf-8').read()
    argv = evaluate_argv(params, tmp_path, eval_path=dev_small)
    argv[argv.index('--outputs_path') + 1] = dev_small
    code, out, err = call(argv, capsys)
    assert_one_error_line(code, err, 1, '--outputs_path', 'is also --eval_corpus_path')
    assert open(dev_small, encoding='utf-8').read() == original
    corpus = write(tmp_path / 'corpus.txt', 'some text\n')
    code, out, err = call(['pretrain', 'vanilla', corpus, '--writing_params_path', corpus] + TINY, capsys)
    assert_one_error_line(code, err, 1, '--writing_params_path', 'is also PRETRAIN_CORPUS_PATH')
    assert open(corpus).read() == 'some text\n'


# --- line endings ---------------------------------------------------------------------------------------------

def test_crlf_and_missing_final_newline_finetune_identically(tmp_path, capsys, train_small):
    text = open(train_small, encoding='utf-8').read()
    crlf = write(tmp_path / 'crlf.tsv', text.rstrip('\n'), newline='\r\n')
    assert b'\r\n' in open(crlf, 'rb').read() and not open(crlf, 'rb').read().endswith(b'\n')
    results = []
    for name, tsv in (('lf', train_small), ('crlf', crlf)):
        argv = ['finetune', 'vanilla', WIKI, '--finetune_corpus_path', tsv,
                '--writing_params_path', tmp_path / f'{name}.params'] + TINY
        code, out, err = call(argv, capsys)
        assert code == 0, err
        results.append(torch.load(tmp_path / f'{name}.params', map_location='cpu'))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_crlf_and_missing_final_newline_evaluate_identically(tmp_path, capsys, params, dev_small):
    text = open(dev_small, encoding='utf-8').read()
    crlf = write(tmp_path / 'crlf.tsv', text.rstrip('\n'), newline='\r\n')
    outputs = []
    for name, tsv in (('lf', dev_small), ('crlf', crlf)):
        argv = evaluate_argv(params, tmp_path, eval_path=tsv)
        argv[argv.index('--outputs_path') + 1] = str(tmp_path / f'{name}.pred')
        code, out, err = call(argv, capsys)
        assert code == 0 and err == '', err
        assert 'out of 6.0' in out
        outputs.append((tmp_path / f'{name}.pred').read_text(encoding='utf-8'))
    assert outputs[0] == outputs[1] and outputs[0].count('\n') == 6


def test_evaluate_places_reads_crlf_and_no_final_newline(tmp_path):
    lf = write(tmp_path / 'lf.tsv', 'q1\tRome\nq2\tOslo\n')
    crlf = write(tmp_path / 'crlf.tsv', 'q1\tRome\r\nq2\tOslo', newline='')
    for path in (lf, crlf):
        assert utils.evaluate_places(path, ['Rome', 'Paris']) == (2.0, 1.0)
    assert utils.read_gold_places(write(tmp_path / 'q.tsv', 'q1\r\nq2', newline='')) is None


# --- files written whole or not at all -------------------------------------------------------------------------

def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = write(tmp_path / 'out.txt', 'old\n')
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error):
            with utils.atomic_write(path) as temporary:
                with open(temporary, 'w') as f:
                    f.write('half of the new')
                raise error()
        assert open(path).read() == 'old\n'
        assert listing(tmp_path) == ['out.txt']
    with utils.atomic_write(path) as temporary:
        with open(temporary, 'w') as f:
            f.write('new\n')
    assert open(path).read() == 'new\n' and listing(tmp_path) == ['out.txt']


def test_atomic_write_through_a_symlink(tmp_path):
    real = write(tmp_path / 'real.txt', 'old\n')
    os.symlink(real, tmp_path / 'link.txt')
    with utils.atomic_write(str(tmp_path / 'link.txt')) as temporary:
        with open(temporary, 'w') as f:
            f.write('new\n')
    assert os.path.islink(tmp_path / 'link.txt') and open(real).read() == 'new\n'


def test_interrupted_params_write_keeps_previous_params(tmp_path, capsys, monkeypatch):
    path = tmp_path / 'x.params'
    path.write_bytes(b'previous params')
    real_save = torch.save

    def save_then_interrupt(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', save_then_interrupt)
    code, out, err = call(['pretrain', 'vanilla', WIKI, '--writing_params_path', path, '--checkpoint_minutes', '60']
                          + TINY, capsys)
    assert code == 130 and 'Traceback' not in err and 'Interrupted' in err
    assert path.read_bytes() == b'previous params'
    assert sorted(os.listdir(tmp_path)) == ['x.params', 'x.params.metrics.jsonl']


def test_interrupted_predictions_write_keeps_previous_file(tmp_path, capsys, monkeypatch, params, dev_small):
    out_path = tmp_path / 'out.pred'
    out_path.write_text('previous predictions\n')

    class InterruptedFile:
        """A file whose third write meets a Ctrl-C."""

        def __init__(self, f):
            self.f, self.writes = f, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.writes += 1
            if self.writes == 3:
                raise KeyboardInterrupt
            self.f.write(text)

    monkeypatch.setattr(evaluation, 'open', lambda *args, **kwargs: InterruptedFile(open(*args, **kwargs)),
                        raising=False)
    code, out, err = call(evaluate_argv(params, tmp_path, eval_path=dev_small), capsys)
    assert code == 130 and 'Traceback' not in err and 'no predictions were written' in err
    assert out_path.read_text() == 'previous predictions\n'
    assert sorted(os.listdir(tmp_path)) == ['dev.tsv', 'out.pred', 'vanilla.params']


# --- a diverging run -------------------------------------------------------------

def test_diverging_run_stops_at_the_first_non_finite_loss(tmp_path, capsys):
    """lr 1e6: step 1 is finite, step 2's loss is nan; one line, exit 1, no params, the step-1 checkpoint kept."""
    out_path = tmp_path / 'x.params'
    argv = ['pretrain', 'vanilla', WIKI, '--writing_params_path', out_path, '--n_layer', '1', '--n_head', '2',
            '--n_embd', '16', '--batch_size', '8', '--max_steps', '50', '--quiet',
            '--learning_rate', '1e6', '--checkpoint_minutes', '0']
    code, out, err = call(argv, capsys)
    assert_one_error_line(code, err, 1, 'training diverged: the loss is nan at step 2 (epoch 1)',
                          'no params were written', 'Try a lower --learning_rate',
                          f'the last checkpoint, {out_path}.ckpt, is intact: delete it to start afresh',
                          '--resume --learning_rate LOWER')
    assert not out_path.exists()
    saved = torch.load(f'{out_path}.ckpt', map_location='cpu', weights_only=True)
    assert saved['step'] == 1
    assert all(bool(torch.isfinite(t).all()) for t in saved['model'].values())
    with open(f'{out_path}.metrics.jsonl') as f:
        assert [json.loads(line)['step'] for line in f] == [1]


def test_diverging_run_without_checkpoint(tmp_path, capsys):
    code, out, err = call(['pretrain', 'vanilla', WIKI, '--writing_params_path', tmp_path / 'x.params']
                          + ['--n_layer', '1', '--n_head', '2', '--n_embd', '16', '--batch_size', '8', '--quiet',
                             '--max_steps', '20', '--learning_rate', '1e6'], capsys)
    assert_one_error_line(code, err, 1, 'the loss is nan at step 2', 'no checkpoint was saved before it')
    assert listing(tmp_path) == ['x.params.metrics.jsonl']


def tiny_trainer(tmp_path, gpt):
    import trainer
    data = dataset.NameDataset(dataset.CharCorruptionDataset('abc def\nghi\n', run.BLOCK_SIZE), 'ab\tc\nde\tf\n')
    config = trainer.TrainerConfig(max_epochs=1, batch_size=2, show_progress=False, learning_rate=1e-3,
                                   checkpoint_path=str(tmp_path / 'x.ckpt'), checkpoint_minutes=0)
    return trainer.Trainer(gpt, data, None, config, device='cpu')


def test_non_finite_loss_changes_nothing(tmp_path):
    import trainer
    gpt = model.GPT(model.GPTConfig(12, run.BLOCK_SIZE, n_layer=1, n_head=2, n_embd=8))
    with torch.no_grad():
        gpt.head.weight[3, 0] = float('inf')
    before = {k: v.clone() for k, v in gpt.state_dict().items()}
    t = tiny_trainer(tmp_path, gpt)
    with pytest.raises(trainer.TrainingDiverged, match=r'the loss is (nan|inf) at step 1 \(epoch 1\)'):
        t.train()
    after = gpt.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert t.optimizer.state_dict()['state'] == {} and t.state.step == 0
    assert not os.path.exists(tmp_path / 'x.ckpt')


def test_resume_applies_the_new_learning_rate_and_weight_decay(tmp_path):
    """The optimizer state a checkpoint holds carries the old run's rate and decay; a resumed run uses its own."""
    import checkpoint
    gpt = model.GPT(model.GPTConfig(12, run.BLOCK_SIZE, n_layer=1, n_head=2, n_embd=8))
    first = tiny_trainer(tmp_path, gpt)
    first.config.batch_size, first.config.max_steps = 1, 2  # a checkpoint after step 1
    first.train()
    resumed = tiny_trainer(tmp_path, gpt)
    resumed.config.learning_rate, resumed.config.weight_decay = 5e-2, 0.25
    resumed.resume(checkpoint.load(str(tmp_path / 'x.ckpt')))
    resumed.prepare()
    assert [g['lr'] for g in resumed.optimizer.param_groups] == [5e-2, 5e-2]
    assert [g['weight_decay'] for g in resumed.optimizer.param_groups] == [0.25, 0.0]


def test_non_finite_gradient_norm_with_a_finite_loss(tmp_path, monkeypatch):
    import trainer
    gpt = model.GPT(model.GPTConfig(12, run.BLOCK_SIZE, n_layer=1, n_head=2, n_embd=8))
    before = {k: v.clone() for k, v in gpt.state_dict().items()}
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', lambda *a, **k: torch.tensor(float('inf')))
    with pytest.raises(trainer.TrainingDiverged, match='the gradient norm is inf at step 1'):
        tiny_trainer(tmp_path, gpt).train()
    assert all(torch.equal(before[k], v) for k, v in gpt.state_dict().items())


def test_fixed_step_stops_at_the_epoch_flush_on_a_non_finite_loss(tmp_path):
    """train_step 'fixed' keeps losses on the device until a flush: the flush raises, before any checkpoint."""
    import trainer
    gpt = model.GPT(model.GPTConfig(12, run.BLOCK_SIZE, n_layer=1, n_head=2, n_embd=8))
    with torch.no_grad():
        gpt.head.weight[3, 0] = float('inf')
    t = tiny_trainer(tmp_path, gpt)
    t.config.train_step = 'fixed'
    with pytest.raises(trainer.TrainingDiverged, match=r'the loss is (nan|inf) at step 1 \(epoch 1\)'):
        t.train()
    assert not os.path.exists(tmp_path / 'x.ckpt')


# --- denormal floats -------------------------------------------------------------

def denormal_model(vocab_size, **sizes):
    """A TINY model whose attention and MLP matrices are scaled into float32's denormal range (below 1.2e-38)."""
    settings = dict(n_layer=1, n_head=2, n_embd=16)
    settings.update(sizes)
    utils.set_seed(0)
    gpt = model.GPT(model.GPTConfig(vocab_size, run.BLOCK_SIZE, **settings))
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if p.dim() == 2 and ('.attn.' in name or '.mlp.' in name):
                p.mul_(1e-37)
    return gpt


def test_flush_denormals_sets_and_restores(wiki_vocab):
    assert not utils.denormals_flushed()
    with utils.flush_denormals():
        assert float(torch.full((1,), 1e-39) * 1.5) == 0.0
        with utils.flush_denormals():
            pass
        assert float(torch.full((1,), 1e-39) * 1.5) == 0.0  # an inner block restores the outer's setting
    assert float(torch.full((1,), 1e-39) * 1.5) > 0


def test_greedy_decode_flushes_and_predicts_as_the_reference(wiki_vocab, dev_small):
    """Denormals through the whole forward: greedy_decode (flushing) and sample (not) agree token for token."""
    gpt = denormal_model(wiki_vocab.vocab_size).eval()
    stoi = wiki_vocab.stoi
    with open(dev_small, encoding='utf-8') as f:
        questions = [line.split('\t')[0] for line in f.read().split('\n') if line]
    prompts = [[stoi[c] for c in q + wiki_vocab.MASK_CHAR] for q in questions]
    decoded = utils.greedy_decode(gpt, prompts, 32)
    assert not utils.denormals_flushed()  # restored
    for prompt, continuation in zip(prompts, decoded):
        reference = utils.sample(gpt, torch.tensor([prompt]), 32)[0, len(prompt):].tolist()
        assert continuation == reference


def test_run_flushes_denormals_on_every_thread(tmp_path, wiki_vocab, dev_small):
    """In a run.py process with two threads, every thread flushes while run() works, and importing changes nothing."""
    gpt = denormal_model(wiki_vocab.vocab_size)
    params_path = str(tmp_path / 'denormal.params')
    torch.save(gpt.state_dict(), params_path)
    script = f'''
import sys
sys.path.insert(0, {SRC!r})
import torch
import dataset, evaluation, model, run, trainer, utils
torch.set_num_threads(2)
print('imported', float(torch.full((1,), 1e-39) * 1.5) == 0)  # this thread only: it starts no worker threads
evaluate = evaluation.evaluate
def spy(*args):
    print('evaluate', utils.denormals_flushed())
    evaluate(*args)
evaluation.evaluate = spy
run.main(sys.argv[1:])
'''
    argv = ['evaluate', 'vanilla', WIKI, '--reading_params_path', params_path, '--eval_corpus_path', dev_small,
            '--outputs_path', tmp_path / 'flushed', '--n_layer', '1', '--n_head', '2', '--n_embd', '16', '--quiet']
    p = subprocess.run([sys.executable, '-c', script] + [str(a) for a in argv], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS='2', OMP_WAIT_POLICY='PASSIVE'), timeout=600)
    # (passive: two spinning threads on a busy machine made a run of under a second take minutes)
    assert p.returncode == 0, p.stderr
    assert 'imported False' in p.stdout and 'evaluate True' in p.stdout
    # the predictions are those of the reference decoder without flushing
    with open(tmp_path / 'flushed', encoding='utf-8') as f:
        predictions = f.read().split('\n')[:-1]
    mask = wiki_vocab.MASK_CHAR
    with open(dev_small, encoding='utf-8') as f:
        questions = [line.split('\t')[0] for line in f.read().split('\n') if line]
    for question, prediction in zip(questions, predictions):
        x = torch.tensor([[wiki_vocab.stoi[c] for c in question + mask]])
        out = ''.join(wiki_vocab.itos[int(i)] for i in utils.sample(gpt.eval(), x, 32)[0])
        assert out.split(mask)[1] == prediction
    assert len(predictions) == len(questions)
