"""Training from the command line: the data, the checkpoint to go on from, the trainer, the params written."""
import os
import sys

import torch

import checks
import dataset
import distributed
import trainer
import utils

THREADS_FILE = 'PIPELINE_THREADS_FILE'  # set by pipeline.py's runner: a file holding the threads this step may use


class FollowThreads:
    """After each step, the thread count pipeline.py's runner (scheduler.Runner) last wrote to `path`: a core
    that another sequence no longer needs goes to this run from its next step on. (Reading a few bytes a step
    costs microseconds.) Not with --compile: compiled CPU kernels keep the thread count they were built with."""

    def __init__(self, path):
        self.path = path

    def __call__(self, t):
        try:
            with open(self.path, encoding='utf-8') as f:
                threads = int(f.read())
        except (OSError, ValueError):  # not there, or not a number: look again after the next step
            return
        if threads > 0 and threads != torch.get_num_threads():
            print(f'threads: {torch.get_num_threads()} -> {threads} from step {t.step + 1}', flush=True)
            torch.set_num_threads(threads)


def training_data(args, corpus, pretrain_dataset):
    """(the dataset to train on, the texts it comes from): the corpus itself, or the checked finetuning TSV."""
    if args.function == 'pretrain':
        return pretrain_dataset, [corpus]
    finetune_text = checks.read_text(args.finetune_corpus_path, '--finetune_corpus_path')
    name_dataset = dataset.NameDataset(pretrain_dataset, finetune_text)
    checks.check_finetune(name_dataset, args.finetune_corpus_path, args.pretrain_corpus_path)
    return name_dataset, [corpus, finetune_text]


def resume_checkpoint(args, info):
    """With --resume, the checkpoint to continue from; without, None (and no checkpoint may be in the way)."""
    path = args.checkpoint_path
    if not args.resume:
        if os.path.exists(path):
            raise checks.BadInput(f'a checkpoint of an interrupted run is at {path}: add --resume to continue it, '
                                  f'or delete it to start afresh', checks.USAGE)
        return None
    saved, changed = checks.read_checkpoint(path, info)
    saved_processes = len(saved.get('rank_states') or [None])
    if saved_processes != distributed.world_size():
        raise checks.BadInput(f'checkpoint {path} was written by {saved_processes} process(es) and this run has '
                              f'{distributed.world_size()}; resume with as many (torchrun --nproc_per_node, '
                              f'--nnodes), since each keeps random states of its own', checks.USAGE)
    if changed and distributed.is_main():
        print(f"warning: resuming with training settings other than the checkpoint's: {'; '.join(changed)}",
              file=sys.stderr)
    return saved


def train(args, gpt, train_dataset, train_settings, device, info=None, saved=None):
    """Train (from the checkpoint `saved` when resuming), write the params, then delete the training checkpoint.

    With several processes (torchrun), rank 0 alone writes the metrics, checkpoints and params and shows
    the progress bar; every other rank reseeds its random states (dropout, span corruption) with
    seed + rank once the model and the data order, the same on every rank, are drawn.
    """
    main = distributed.is_main()
    config = trainer.TrainerConfig(metrics_path=args.metrics_path if main else None, compile=args.compile,
                                   show_progress=not args.quiet and main,
                                   checkpoint_path=args.checkpoint_path, checkpoint_minutes=args.checkpoint_minutes,
                                   checkpoint_info=info, **train_settings)
    t = trainer.Trainer(gpt, train_dataset, None, config, device=device)
    if os.environ.get(THREADS_FILE) and not args.compile:
        t.add_callback('on_batch_end', FollowThreads(os.environ[THREADS_FILE]))
    if distributed.rank() > 0:
        utils.set_seed(args.seed + distributed.rank())
    if saved is not None:
        t.resume(saved)
        if main:
            print(f'Resuming from {args.checkpoint_path}: epoch {t.state.epoch + 1}, step {t.state.step}', flush=True)
    t.train()
    if not main:
        return
    with utils.atomic_write(args.writing_params_path) as temporary:
        torch.save(gpt.state_dict(), temporary)
    if os.path.exists(args.checkpoint_path):
        os.remove(args.checkpoint_path)
    print(f'Params written to {args.writing_params_path}; metrics in {args.metrics_path}')
