"""Bad params files, TSV files and output paths get one clear line, a non-zero exit and no traceback, before
anything is trained or written; line endings that differ read alike (test_bad_flags.py: flags, corpora)."""
import os

import pytest
import torch

import checks
import dataset
import model
import utils
from conftest import TINY, WIKI, assert_one_error_line, call, evaluate_argv, listing, tiny_params, write

pytestmark = pytest.mark.usefixtures('single_thread')  # conftest: tiny models, one thread


# --- params files ------------------------------------------------------------------------------------

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
