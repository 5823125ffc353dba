"""Checks of the command line's inputs, all made before anything is trained or written.

Each problem raises BadInput carrying one line that says what is wrong and
what to do; run.py prints it and exits with its code: USAGE (2) for a mistake
in the flags, BAD_FILE (1) for a file that cannot be used.
"""
import math
import os
import re
import warnings

import torch

import checkpoint
import dataset
import distributed
import model
import utils

USAGE = 2
BAD_FILE = 1
MAX_SEED = 2 ** 32 - 1  # np.random.seed's limit (utils.set_seed seeds numpy too)

# The flags each function needs.
REQUIRED = {
    'pretrain': ['writing_params_path'],
    'finetune': ['finetune_corpus_path', 'writing_params_path'],
    'evaluate': ['reading_params_path', 'eval_corpus_path', 'outputs_path'],
}


class BadInput(Exception):
    """A bad input: the message is one line for the user, `code` the exit status."""

    def __init__(self, message, code=BAD_FILE):
        super().__init__(' '.join(str(message).split('\n')))
        self.code = code


def first_line(error):
    """The first non-empty line of an exception's message."""
    lines = [line.strip() for line in str(error).split('\n') if line.strip()]
    return lines[0] if lines else type(error).__name__


# --- flags and settings ---------------------------------------------------

def check_flags(args):
    """The flags the chosen function needs are there, and --resume only where it means something."""
    missing = ['--' + name for name in REQUIRED[args.function] if not getattr(args, name)]
    if missing:
        raise BadInput(f"{args.function} needs {' and '.join(missing)}; see --help", USAGE)
    if args.function == 'evaluate' and args.resume:
        raise BadInput('--resume continues an interrupted pretrain or finetune run; evaluate has nothing to resume',
                       USAGE)
    if args.checkpoint_minutes is not None and not (math.isfinite(args.checkpoint_minutes)
                                                    and args.checkpoint_minutes >= 0):
        raise BadInput(f'--checkpoint_minutes must be a finite number, 0 or more, got {args.checkpoint_minutes}',
                       USAGE)
    if args.compile and args.train_step == 'graph':
        raise BadInput("--compile and --train_step graph do not go together: the CUDA graph records the step's "
                       "kernels itself; drop --compile, or use --train_step fixed with it", USAGE)
    if not 0 <= args.seed <= MAX_SEED:
        raise BadInput(f'--seed must be a whole number from 0 to {MAX_SEED} (2**32 - 1, what numpy accepts), '
                       f'got {args.seed}', USAGE)


def check_settings(model_settings, train_settings, block_size, processes=1):
    """The recipe with its overrides describes a model and a run that can exist in `processes` processes."""
    settings = {**model_settings, **train_settings}
    if 'bottleneck_dim' in settings:  # the perceiver: the model's own rules, worded as the flags they name
        try:
            model.check_variant(model.GPTConfig(None, block_size, perceiver=True, **model_settings))
        except ValueError as e:
            raise BadInput(f'--{e}', USAGE)
    for name in ('n_layer', 'n_head', 'n_embd', 'batch_size', 'max_epochs', 'max_steps', 'chunks'):
        value = settings.get(name)
        if value is not None and value < 1:
            raise BadInput(f'--{name} must be at least 1, got {value}', USAGE)
    if settings['n_embd'] % settings['n_head'] != 0:
        raise BadInput(f"--n_embd {settings['n_embd']} is not divisible by --n_head {settings['n_head']}: "
                       f"each head gets n_embd / n_head dimensions", USAGE)
    # `not (ok)` so that nan, which fails every comparison, is refused too
    if not (math.isfinite(settings.get('learning_rate', 1)) and settings.get('learning_rate', 1) > 0):
        raise BadInput(f"--learning_rate must be a finite number above 0, got {settings['learning_rate']}", USAGE)
    if not (math.isfinite(settings.get('weight_decay', 0)) and settings.get('weight_decay', 0) >= 0):
        raise BadInput(f"--weight_decay must be a finite number, 0 or more, got {settings['weight_decay']}", USAGE)
    if settings.get('num_workers', 0) < 0:
        raise BadInput(f"--num_workers must be 0 or more, got {settings['num_workers']}", USAGE)
    for name in ('embd_pdrop', 'resid_pdrop', 'attn_pdrop'):
        if not 0 <= settings.get(name, 0) < 1:
            raise BadInput(f'--dropout must be in [0, 1), got {settings[name]}', USAGE)
    if settings.get('optimizer') == 'muon' and settings.get('train_step', 'default') != 'default':
        raise BadInput("--optimizer muon runs with the default training step only (--train_step fixed|graph "
                       "needs fused AdamW to skip a diverged step); leave --train_step out", USAGE)
    if processes > 1:
        if settings.get('batching') == 'stratified':
            raise BadInput('--batching stratified (the laptop recipe\'s) runs in one process only; '
                           'pass --batching random under torchrun', USAGE)
        if settings.get('data_path', 'loader') != 'loader' or settings.get('train_step', 'default') != 'default':
            raise BadInput('--data_path device and --train_step fixed|graph run in one process only; '
                           'leave them out under torchrun', USAGE)


def check_model_size(model_settings, vocab_size, block_size, training):
    """The model's parameters (with gradients and AdamW's two moments when training) fit in this machine's memory.

    A model far too large for the memory would otherwise fail with the
    allocator's traceback, or fill the memory layer by layer first. The count
    is a lower bound for both variants, so no model that fits is refused.
    """
    d, layers = model_settings['n_embd'], model_settings['n_layer']
    positions = 0 if model_settings.get('rope') else block_size  # RoPE has no position embedding
    count = 2 * vocab_size * d + positions * d + 2 * d + layers * (11 * d * d + 12 * d)
    needed = 4 * count * (4 if training else 1)  # float32 bytes
    try:
        memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return
    if needed > memory:
        what = 'to train (params, gradients and AdamW moments)' if training else 'for its params'
        raise BadInput(f'--n_layer {layers} --n_embd {d}: the model has at least {count:,} parameters and needs '
                       f'{needed / 2 ** 30:,.1f} GiB {what}, more than the {memory / 2 ** 30:,.1f} GiB of memory '
                       f'here; use a smaller --n_layer or --n_embd', USAGE)


def check_device(name):
    """The torch device to run on (CUDA when present if `name` is None), checked to be usable.

    Under torchrun on GPUs it is this process's GPU (distributed.rank_device),
    chosen before the check touches CUDA.
    """
    try:
        device = distributed.rank_device(utils.resolve_device(name))
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        raise BadInput(f"--device {name}: not usable here ({first_line(e)}); "
                       f"use --device cpu, or leave --device out to use CUDA when present", USAGE)
    return device


# --- input files -------------------------------------------------------------

def read_text(path, flag, encoding='utf-8'):
    """The text of the file at `path` (text mode: CRLF reads as LF)."""
    try:
        with open(path, encoding=encoding) as f:
            return f.read()
    except FileNotFoundError:
        raise BadInput(f'{flag} {path}: no such file; check the path')
    except IsADirectoryError:
        raise BadInput(f'{flag} {path} is a folder; give the path of a file')
    except PermissionError:
        raise BadInput(f'{flag} {path}: permission denied; make the file readable')
    except UnicodeDecodeError as e:
        raise BadInput(f'{flag} {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); '
                       f'convert it to UTF-8')
    except OSError as e:
        raise BadInput(f'{flag} {path}: cannot read it ({e.strerror or first_line(e)})')


def check_corpus(text, path):
    """The pretraining text is not empty and holds neither special character (dataset.check_reserved)."""
    if not text.strip():
        raise BadInput(f'PRETRAIN_CORPUS_PATH {path} is empty; it must hold the pretraining text '
                       f'(which also defines the vocabulary)')
    try:
        dataset.check_reserved(text)
    except ValueError as e:
        raise BadInput(f'PRETRAIN_CORPUS_PATH {path} {e}')


def check_finetune(name_dataset, path, corpus_path):
    """Every line of a NameDataset is question<TAB>place, fits the block and uses only known characters."""
    flag = '--finetune_corpus_path'
    if len(name_dataset) == 0:
        raise BadInput(f'{flag} {path} has no lines; it needs question<TAB>place lines')
    block_size = name_dataset.block_size
    for number, line in enumerate(name_dataset.data, 1):
        where = f'{flag} {path} line {number}'
        fields = line.split('\t')
        if len(fields) != 2:
            problem = 'is empty' if not line else 'has no tab' if len(fields) == 1 else f'has {len(fields) - 1} tabs'
            raise BadInput(f'{where} {problem}; every line must be question<TAB>place')
        question, place = fields
        if len(question) + len(place) + 2 > block_size:
            raise BadInput(f'{where} is too long: question and place have {len(question) + len(place)} characters, '
                           f'and NameDataset needs len(question) + len(place) + 2 <= block size {block_size}; '
                           f'shorten or remove the line')
        unknown = sorted(set(question + place) - set(name_dataset.stoi))
        if unknown:
            raise BadInput(f'{where} has characters the vocabulary of {corpus_path} lacks '
                           f'({", ".join(map(repr, unknown))}); remove them or add them to the pretraining corpus')


EVAL_PROMPTS = ('original', 'stripped')  # see read_questions and docs/test-prompts.md


def lines_as_read(text):
    """The lines of `text` as iterating over a file in text mode gives them: each with its '\n', the last
    without one when the text does not end in a newline."""
    lines = [line + '\n' for line in text.split('\n')]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def read_questions(path, stoi, max_positions=None, steps=32, prompt='original'):
    """The evaluation questions (first tab field of each line) and {line index: unknown characters}.

    With prompt 'original' each question is what the original's
    `line.split('\t')[0]` gives for a line read in text mode: a line without
    a tab (birth_test_inputs.tsv) keeps its newline, so its prompt is
    `...born?\n` + MASK, while the question of a `question<TAB>place` line
    has none. 'stripped' drops the newline from every line (docs/test-prompts.md).
    A question with characters the vocabulary lacks is only reported back; one
    whose decoding needs more than max_positions positions (the Synthesizer's
    limit) is an error.
    """
    flag = '--eval_corpus_path'
    utils.check_choice('prompt', prompt, EVAL_PROMPTS)
    text = read_text(path, flag, encoding='utf-8-sig')
    lines = lines_as_read(text) if prompt == 'original' else dataset.split_documents(text)
    questions = [line.split('\t')[0] for line in lines]
    if not questions:
        raise BadInput(f'{flag} {path} has no lines; it needs one question (or question<TAB>place) per line')
    try:
        utils.read_gold_places(path)
    except ValueError as e:
        raise BadInput(f'{flag} {e}; give every line a place, or none')
    unknown = {}
    for index, question in enumerate(questions):
        missing = sorted(set(question) - set(stoi))
        # The question and its mask are fed, then every decoded character but the last.
        needed = len(question) + steps
        if missing:
            unknown[index] = missing
        elif max_positions is not None and needed > max_positions:
            raise BadInput(f'{flag} {path} line {index + 1}: the question has {len(question)} characters, so with '
                           f'its mask and {steps} decoded characters the synthesizer would attend over {needed} '
                           f'positions, more than the {max_positions} it supports; shorten it to '
                           f'{max_positions - steps} characters or fewer')
    return questions, unknown


# --- output paths --------------------------------------------------------------

def same_file(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(outputs, inputs):
    """Each (flag, path) in `outputs` can be written, and none overwrites another or an input file."""
    for i, (flag, path) in enumerate(outputs):
        if os.path.isdir(path):
            raise BadInput(f'{flag} {path} is a folder; give a file path (inside it, if you like)')
        folder = os.path.dirname(path) or '.'
        if not os.path.isdir(folder):
            raise BadInput(f'{flag} {path}: the folder {folder} does not exist; create it first')
        if not os.access(folder, os.W_OK | os.X_OK):
            raise BadInput(f'{flag} {path}: the folder {folder} is not writable; pick another place')
        for other_flag, other in list(inputs) + list(outputs[:i]):
            if other and same_file(path, other):
                raise BadInput(f'{flag} {path} is also {other_flag}; writing it would overwrite that file, '
                               f'so pick another path')


# --- params and checkpoints ------------------------------------------------

def load_tensors(path, flag):
    """torch.load(path, weights_only=True), every failure turned into a BadInput."""
    if not os.path.exists(path):
        raise BadInput(f'{flag} {path}: no such file; check the path')
    if os.path.isdir(path):
        raise BadInput(f'{flag} {path} is a folder; give the path of a params file')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return torch.load(path, map_location='cpu', weights_only=True)
    except PermissionError:
        raise BadInput(f'{flag} {path}: permission denied; make the file readable')
    except Exception as e:
        if 'Weights only load failed' in str(e):
            needs = re.search(r'GLOBAL ([\w.]+)', str(e))
            needs = f' (it needs {needs.group(1)})' if needs else ''
            raise BadInput(f'{flag} {path} refused: loading it would need arbitrary unpickling{needs}, which could '
                           f'run code; only files of plain tensors (torch.save of a state dict) are loaded')
        raise BadInput(f'{flag} {path} is not a params file or is corrupt ({type(e).__name__}: {first_line(e)}); '
                       f'give a file written by a pretrain or finetune run')


def params_variant(state):
    """The variant whose weights `state` holds: 'perceiver', 'synthesizer', 'rope' or 'vanilla'; or None."""
    if 'down_block.C' in state:
        return 'perceiver'
    if 'blocks.0.attn.w2' in state:
        return 'synthesizer'
    if 'blocks.0.attn.key.weight' in state:
        return 'vanilla' if 'pos_emb' in state else 'rope'
    return None


def shape(t):
    return ' x '.join(map(str, t.shape)) or 'scalar'


def check_params(state, gpt, variant, path, corpus_path):
    """`state` (a loaded params file) fits `gpt` exactly, or a BadInput says how it differs."""
    flag = '--reading_params_path'
    if checkpoint.is_checkpoint(state):
        raise BadInput(f'{flag} {path} is a training checkpoint, not a params file; continue its run with '
                       f'--resume --checkpoint_path {path}, or read the params file that run writes')
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise BadInput(f'{flag} {path} holds a {type(state).__name__}, not a params file (a state dict of tensors)')
    held = params_variant(state)
    if held is None:
        raise BadInput(f'{flag} {path} holds no GPT attention weights (none of blocks.0.attn.key.weight, '
                       f'blocks.0.attn.w2, down_block.C); it is not a params file of this model')
    if held != variant:
        raise BadInput(f'{flag} {path} holds {held} params, but the variant is {variant}; '
                       f'run with {held}, or read {variant} params')
    expected = gpt.state_dict()
    emb, model_emb = state.get('tok_emb.weight'), expected['tok_emb.weight']
    if emb is not None and emb.dim() == 2 and emb.shape[0] != model_emb.shape[0]:
        raise BadInput(f'{flag} {path} was trained with a vocabulary of {emb.shape[0]} characters '
                       f'(tok_emb.weight {shape(emb)}), but PRETRAIN_CORPUS_PATH {corpus_path} gives '
                       f'{model_emb.shape[0]} (model {shape(model_emb)}); use the corpus the params were trained with')
    basis, model_basis = state.get('down_block.C'), expected.get('down_block.C')
    if basis is not None and model_basis is not None and basis.shape[1:2] != model_basis.shape[1:2]:
        raise BadInput(f'{flag} {path} was trained with --bottleneck_dim {basis.shape[1]} (down_block.C '
                       f'{shape(basis)}), but this run has {model_basis.shape[1]}; give --bottleneck_dim '
                       f'{basis.shape[1]}')
    layers = len({k.split('.')[1] for k in state if k.startswith('blocks.')})
    if layers != len(gpt.blocks):
        raise BadInput(f'{flag} {path} has {layers} Transformer blocks but the model has {len(gpt.blocks)}; '
                       f'use the --recipe / --n_layer of the run that wrote it')
    for key in sorted(expected, key=lambda k: k != 'tok_emb.weight'):
        tensor = expected[key]
        if key in state and state[key].shape != tensor.shape:
            raise BadInput(f'{flag} {path}: {key} is {shape(state[key])} in the file but {shape(tensor)} in the '
                           f'model, so it was trained with another model size; use the --recipe / --n_embd / '
                           f'--n_head of the run that wrote it')
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BadInput(f'{flag} {path} does not match the model: missing {missing[:3] or "nothing"}, '
                       f'unexpected {unexpected[:3] or "nothing"}; it was written by different code')


def read_checkpoint(path, info):
    """The training checkpoint at `path` and the training settings that changed since (checkpoint.check_belongs)."""
    flag = 'checkpoint'
    if not os.path.exists(path):
        raise BadInput(f'--resume: there is no checkpoint at {path}; run without --resume to start afresh, '
                       f'or give its path with --checkpoint_path')
    saved = load_tensors(path, flag)
    try:
        return saved, checkpoint.check_belongs(saved, info)
    except ValueError as e:
        raise BadInput(f'{flag} {path} {e}')
