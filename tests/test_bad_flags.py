"""Bad flags, settings and corpora get one clear line, a non-zero exit and no traceback, before anything is
trained or written (test_bad_files.py: params and TSV files, output paths).

Most cases call run.main(argv) in-process (SystemExit carries the status); a
few go through a real `python src/run.py` subprocess. Every failing case also
checks that no file appeared in the folder it would have written to.
"""
import os

import pytest
import torch

import checks
from conftest import DEV_TSV, TINY, TRAIN_TSV, WIKI, assert_one_error_line, call, listing, run_script, write

pytestmark = pytest.mark.usefixtures('single_thread')  # conftest: tiny models, one thread


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
    (['--optimizer', 'sgd'], ["argument --optimizer: invalid choice: 'sgd'", "'adamw', 'muon'"]),
    (['--optimizer', 'muon', '--train_step', 'fixed'], ['--optimizer muon runs with the default training step only',
                                                         'leave --train_step out']),
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
    (['--batching', 'stratified'], ["--batching stratified (the laptop recipe's) runs in one process only",
                                 'pass --batching random under torchrun']),
    (['--recipe', 'laptop'], ["--batching stratified (the laptop recipe's) runs in one process only"]),
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
