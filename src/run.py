"""Command line: pretrain, finetune or evaluate a character GPT on the birthplace task.

    python src/run.py pretrain  vanilla wiki.txt --writing_params_path vanilla.pretrain.params
    python src/run.py finetune  vanilla wiki.txt --reading_params_path vanilla.pretrain.params \
        --writing_params_path vanilla.finetune.params --finetune_corpus_path birth_places_train.tsv
    python src/run.py evaluate  vanilla wiki.txt --reading_params_path vanilla.finetune.params \
        --eval_corpus_path birth_dev.tsv --outputs_path vanilla.pretrain.dev.predictions

The hyperparameters of every run live in src/recipes.py; `--recipe laptop`
picks a CPU-sized one, and the override flags change single settings.

Every input is checked (src/checks.py) before anything is trained or written:
a bad one ends the run with one line on stderr and exit status 2 (a flag
mistake) or 1 (a file that cannot be used). Output files are written whole or
not at all. Pretraining and finetuning keep a training checkpoint, saved every
--checkpoint_minutes and on Ctrl-C, which prints the command (this one plus
--resume) that continues the run.

The same command under torchrun trains data-parallel (src/distributed.py):
    torchrun --standalone --nproc_per_node N src/run.py pretrain ...
"""
import argparse
import os
import shlex
import shutil
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import batching  # noqa: E402
import checkpoint  # noqa: E402
import checks  # noqa: E402
import dataset  # noqa: E402
import distributed  # noqa: E402
import evaluation  # noqa: E402
import gpu_path  # noqa: E402
import model  # noqa: E402
import optim  # noqa: E402
import recipes  # noqa: E402
import steps  # noqa: E402
import trainer  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402

BLOCK_SIZE = recipes.BLOCK_SIZE

# Command-line overrides: flag -> (where it goes, add_argument keywords).
OVERRIDES = {
    'max_epochs': ('train', dict(type=int, help='number of training epochs')),
    'max_steps': ('train', dict(type=int, help='stop after this many optimizer steps')),
    'batch_size': ('train', dict(type=int, help='batch size')),
    'learning_rate': ('train', dict(type=float, help='peak learning rate')),
    'lr_floor': ('train', dict(type=float, help="where the cosine stops falling, a fraction of the peak rate "
                                                "(the original: 0.1)")),
    'weight_decay': ('train', dict(type=float, help='AdamW weight decay (on the parameters --weight_decay_on picks)')),
    'precision': ('train', dict(choices=steps.PRECISIONS,
                                help="'bf16': autocast; 'auto': bf16 on a capable GPU, else fp32; "
                                     "'tf32': fp32 with TF32 matrix products on a CUDA GPU")),
    'chunks': ('train', dict(type=int, help='run each batch as this many length-sorted, trimmed pieces (same math)')),
    'batching': ('train', dict(choices=batching.BATCHINGS,
                               help="'random' (the original) or 'stratified': each batch made of CHUNKS pieces "
                                    "of similar length, dealt from the whole epoch sorted by length")),
    'weight_decay_on': ('train', dict(choices=optim.WEIGHT_DECAY_ON,
                                      help="'all' (the original: every parameter but biases) or 'matrices' "
                                           "(Linear weights and the Synthesizer's w2 only)")),
    'optimizer': ('train', dict(choices=optim.OPTIMIZERS,
                                help="'adamw' (the original) or 'muon': Muon for the 2-D weights inside the "
                                     "network, AdamW for the rest, at the same learning rate")),
    'first_step_lr': ('train', dict(choices=trainer.FIRST_STEP_LRS,
                                    help="'full' (the original: the schedule is applied after each step, so the "
                                         "first step runs at the full learning rate) or 'scheduled' (every step, "
                                         "the first included, at the scheduled rate: warmup starts from step 1)")),
    'num_workers': ('train', dict(type=int, help='DataLoader worker processes')),
    'data_path': ('train', dict(choices=gpu_path.DATA_PATHS,
                                help="'loader' (the original: DataLoader over the dataset) or 'device': each epoch "
                                     "built on the device at once (span corruption on tensors, same distribution)")),
    'train_step': ('train', dict(choices=gpu_path.TRAIN_STEPS,
                                 help="'default', 'fixed' (whole batches padded to one shape, the loss synced once "
                                      "per epoch; same math) or 'graph' ('fixed' captured as a CUDA graph on a GPU)")),
    'n_layer': ('model', dict(type=int, help='number of Transformer blocks')),
    'n_head': ('model', dict(type=int, help='attention heads per block')),
    'n_embd': ('model', dict(type=int, help='embedding width')),
    'dropout': ('model', dict(type=float, help='embd_pdrop, resid_pdrop and attn_pdrop at once')),
    'bottleneck_dim': ('model', dict(type=int, help=f'the perceiver only: positions m of its middle blocks '
                                                    f'(default {recipes.BOTTLENECK_DIM})')),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit status 2), not the usage text."""

    def error(self, message):
        self.exit(checks.USAGE, f'{self.prog}: error: {message}; see --help\n')


def build_parser():
    parser = ArgumentParser(prog='run.py', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('function', choices=['pretrain', 'finetune', 'evaluate'],
                        help='whether to pretrain, finetune or evaluate a model')
    parser.add_argument('variant', choices=list(recipes.VARIANTS),
                        help='the model: vanilla, synthesizer (2021), perceiver (2023) or rope (2024)')
    parser.add_argument('pretrain_corpus_path', help='pretraining text; it also defines the vocabulary')
    parser.add_argument('--reading_params_path', help='params file to load first')
    parser.add_argument('--writing_params_path', help='where to save the trained params')
    parser.add_argument('--finetune_corpus_path', help='TSV of questions and places to finetune on')
    parser.add_argument('--eval_corpus_path', help='TSV of questions (and places) to evaluate on')
    parser.add_argument('--outputs_path', help='where to write one prediction per line')
    parser.add_argument('--eval_prompt', choices=checks.EVAL_PROMPTS, default='original',
                        help="'original' (default): each prompt is the line's first tab field as the original "
                             "reads it, so a line without a tab (birth_test_inputs.tsv) keeps its newline; "
                             "'stripped': no newline in any prompt (docs/test-prompts.md)")
    extra = parser.add_argument_group('recipe and overrides (defaults: the original settings)')
    extra.add_argument('--recipe', choices=sorted(recipes.RECIPES), default='faithful',
                       help="hyperparameter set: 'faithful' (the original, and each later variant's year), "
                            "'faithful-2024' (with 2024's pretraining schedule for every variant) or "
                            "'laptop' (sized for a CPU)")
    for name, (_, keywords) in OVERRIDES.items():
        extra.add_argument('--' + name, **keywords)
    extra.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    extra.add_argument('--device', help="torch device, e.g. 'cpu' or 'cuda' (default: CUDA when present)")
    extra.add_argument('--compile', action='store_true', help='torch.compile the model')
    extra.add_argument('--metrics_path', help='JSONL of per-step metrics (default: WRITING_PARAMS_PATH.metrics.jsonl; '
                                              'rewritten by a fresh run, appended to by a resumed one)')
    extra.add_argument('--quiet', action='store_true', help='no progress bars')
    resume = parser.add_argument_group('interruption and resume (pretrain and finetune)')
    resume.add_argument('--resume', action='store_true',
                        help='continue the interrupted run whose training checkpoint is at --checkpoint_path; '
                             'give the same arguments as that run (Ctrl-C prints the exact command)')
    resume.add_argument('--checkpoint_path',
                        help='training checkpoint: model, optimizer, counters and RNG states (default: '
                             'WRITING_PARAMS_PATH.ckpt); it is deleted once the params are written')
    resume.add_argument('--checkpoint_minutes', type=float, default=10,
                        help='minutes between training checkpoints (default 10; 0: after every step); '
                             'Ctrl-C or SIGTERM also saves one, after the current step')
    return parser


def parse_args(argv):
    """The parsed command line, with the default paths of a training run's checkpoint and metrics filled in."""
    args = build_parser().parse_args(argv)
    if args.function != 'evaluate' and args.writing_params_path:
        args.checkpoint_path = args.checkpoint_path or args.writing_params_path + '.ckpt'
        args.metrics_path = args.metrics_path or args.writing_params_path + '.metrics.jsonl'
    return args


def settings_for(args, n_documents, device, n_examples=None):
    """(model settings, trainer settings) of this run: the recipe, then the overrides (recipes.settings)."""
    function = 'pretrain' if args.function == 'pretrain' else 'finetune'  # evaluate: the finetuning's model settings
    stage = recipes.stage_of(function, args.reading_params_path is not None)
    model_settings, train_settings = recipes.settings(args.recipe, args.variant, stage, n_documents, device,
                                                      args.max_epochs, n_examples)
    if args.bottleneck_dim is not None and 'bottleneck_dim' not in model_settings:
        raise checks.BadInput(f'--bottleneck_dim is a setting of the perceiver only, not of {args.variant}',
                              checks.USAGE)
    for name, (where, _) in OVERRIDES.items():
        value = getattr(args, name)
        if value is None:
            continue
        if name == 'dropout':
            model_settings.update(embd_pdrop=value, resid_pdrop=value, attn_pdrop=value)
        else:
            (model_settings if where == 'model' else train_settings)[name] = value
    return model_settings, train_settings


def output_paths(args):
    """(flag, path) for every file this run writes."""
    if args.function == 'evaluate':
        return [('--outputs_path', args.outputs_path)]
    return [('--writing_params_path', args.writing_params_path), ('--metrics_path', args.metrics_path),
            ('--checkpoint_path', args.checkpoint_path)]


def input_paths(args):
    """(flag, path) for every file this run reads."""
    used = {'PRETRAIN_CORPUS_PATH': args.pretrain_corpus_path, '--reading_params_path': args.reading_params_path,
            '--finetune_corpus_path': args.finetune_corpus_path if args.function == 'finetune' else None,
            '--eval_corpus_path': args.eval_corpus_path if args.function == 'evaluate' else None}
    return [(flag, path) for flag, path in used.items() if path]


def build_model(args, vocab_size, model_settings, device):
    """The GPT of this run, with the --reading_params_path params (checked to fit) when given."""
    settings = dict(recipes.VARIANTS[args.variant], **model_settings)  # a recipe's or a flag's setting wins
    checks.check_model_size(settings, vocab_size, BLOCK_SIZE, training=args.function != 'evaluate')
    config = model.GPTConfig(vocab_size, BLOCK_SIZE, **settings)
    gpt = model.GPT(config)
    if args.reading_params_path:
        state = checks.load_tensors(args.reading_params_path, '--reading_params_path')
        checks.check_params(state, gpt, args.variant, args.reading_params_path, args.pretrain_corpus_path)
        gpt.load_state_dict(state)
    return gpt.to(device)


def describe(args, device, model_settings, train_settings):
    items = [f'recipe={args.recipe}', f'device={device}', f'seed={args.seed}']
    if distributed.active() and args.function != 'evaluate':
        items.append(f'processes={distributed.world_size()}')
    items += [f'{k}={v}' for k, v in model_settings.items()]
    if args.function != 'evaluate':
        items += [f'{k}={v}' for k, v in train_settings.items()]
    return f'{args.function} {args.variant}: ' + ' '.join(items)


@utils.flush_denormals()  # before any computation, so that every CPU thread flushes (utils.flush_denormals)
def run(args):
    """Check every input, then pretrain, finetune or evaluate as `args` say."""
    checks.check_flags(args)
    device = checks.check_device(args.device)
    corpus = checks.read_text(args.pretrain_corpus_path, 'PRETRAIN_CORPUS_PATH')
    checks.check_corpus(corpus, args.pretrain_corpus_path)
    pretrain_dataset = dataset.CharCorruptionDataset(corpus, BLOCK_SIZE)
    n_examples = None  # a training run's cosine may count its own examples (recipes.settings)
    if args.function != 'evaluate':
        train_dataset, texts = training.training_data(args, corpus, pretrain_dataset)
        n_examples = len(train_dataset)
    model_settings, train_settings = settings_for(args, len(pretrain_dataset), device, n_examples)
    checks.check_settings(model_settings, train_settings, BLOCK_SIZE, processes=distributed.world_size())
    checks.check_outputs(output_paths(args), input_paths(args))

    if args.function == 'evaluate':
        questions, unknown = evaluation.read_questions(args, pretrain_dataset)
    else:
        info = checkpoint.run_info(args.function, args.variant, texts, model_settings, train_settings)
        saved = training.resume_checkpoint(args, info)

    if args.function == 'evaluate':
        if not distributed.is_main():
            return  # under torchrun rank 0 evaluates alone, joining no process group: one process's predictions
    else:
        # Every input is fine on this process: only now join the others (a no-op in one process).
        device = distributed.init(device)
    utils.set_seed(args.seed)
    gpt = build_model(args, pretrain_dataset.vocab_size, model_settings, device)
    if distributed.is_main():
        print(describe(args, device, model_settings, train_settings), flush=True)
    if args.function == 'evaluate':
        evaluation.evaluate(args, gpt, pretrain_dataset, device, questions, unknown)
    else:
        training.train(args, gpt, train_dataset, train_settings, device, info, saved)


def resume_command(argv):
    """The shell command that continues this run: the same arguments plus --resume."""
    resume = [] if '--resume' in argv else ['--resume']
    script = os.path.relpath(os.path.abspath(__file__))
    if distributed.active():  # torchrun: its own flags are not ours to see, but on one node they are these
        if os.environ.get('LOCAL_WORLD_SIZE') != os.environ.get('WORLD_SIZE'):
            return 'the same torchrun command, with ' + shlex.join([script] + list(argv) + resume)
        return shlex.join(['torchrun', '--standalone', '--nproc_per_node', os.environ['WORLD_SIZE'], script]
                          + list(argv) + resume)
    python = sys.executable
    if shutil.which('python') and os.path.abspath(shutil.which('python')) == os.path.abspath(python):
        python = 'python'
    return shlex.join([python, script] + list(argv) + resume)


def main(argv=None):
    """The command line; a bad input ends in one line on stderr and exit status 2 (flags) or 1 (files).

    Under torchrun every rank checks every input before joining the others, so a bad one ends every
    rank the same way (rank N's line says `run.py (rank N)`), rank 0 first; an interruption is
    reported by rank 0.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    training = args.function != 'evaluate' and bool(args.writing_params_path)
    checkpoint_path = args.checkpoint_path if training else None
    try:
        run(args)
        distributed.shutdown()
    except checks.BadInput as e:
        prog = f'run.py (rank {distributed.rank()})' if distributed.rank() else 'run.py'
        sys.stderr.write(f'{prog}: error: {e}\n')  # one write: with several ranks, lines must not interleave
        sys.stderr.flush()
        distributed.let_main_exit_first()
        sys.exit(e.code)
    except checkpoint.TrainingInterrupted as e:
        if distributed.is_main():
            print(f'Interrupted ({e.signal_name}) at step {e.step}; checkpoint saved to {e.path}. '
                  f'Resume with: {resume_command(argv)}', file=sys.stderr)
        distributed.barrier()  # the message is out before any rank's exit has torchrun end the others
        distributed.shutdown()
        sys.exit(128 + signal.Signals[e.signal_name].value)
    except trainer.TrainingDiverged as e:
        kept = (f'the last checkpoint, {checkpoint_path}, is intact: delete it to start afresh, or go on from it '
                f'with {resume_command(argv)} --learning_rate LOWER' if os.path.exists(checkpoint_path)
                else 'no checkpoint was saved before it')
        print(f'run.py: error: training diverged: {e}, learning rate {e.learning_rate:g}; no params were written. '
              f'Try a lower --learning_rate; {kept}', file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if checkpoint_path and os.path.exists(checkpoint_path):
            print(f'Interrupted; the last checkpoint, {checkpoint_path}, is intact. '
                  f'Resume with: {resume_command(argv)}', file=sys.stderr)
        elif training:
            print('Interrupted before any checkpoint was saved; no params were written', file=sys.stderr)
        else:
            print('Interrupted; no predictions were written', file=sys.stderr)
        sys.exit(130)
    except Exception:
        if checkpoint_path and os.path.exists(checkpoint_path):
            print(f'The last training checkpoint is {checkpoint_path}; once the problem below is fixed, '
                  f'resume with: {resume_command(argv)}', file=sys.stderr)
        raise


if __name__ == '__main__':
    main()
