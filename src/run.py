"""Command line: pretrain, finetune or evaluate a character GPT on the birthplace task.

    python src/run.py pretrain  vanilla wiki.txt --writing_params_path vanilla.pretrain.params
    python src/run.py finetune  vanilla wiki.txt --reading_params_path vanilla.pretrain.params \
        --writing_params_path vanilla.finetune.params --finetune_corpus_path birth_places_train.tsv
    python src/run.py evaluate  vanilla wiki.txt --reading_params_path vanilla.finetune.params \
        --eval_corpus_path birth_dev.tsv --outputs_path vanilla.pretrain.dev.predictions

The hyperparameters of every run live in RECIPES below; `--recipe laptop`
picks a CPU-sized one, and the override flags change single settings.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dataset  # noqa: E402
import model  # noqa: E402
import trainer  # noqa: E402
import utils  # noqa: E402

BLOCK_SIZE = 128
EVAL_STEPS = 32  # characters greedily decoded per question


def faithful_recipe(n_documents):
    """The original assignment's settings."""
    final_tokens = 200 * n_documents * BLOCK_SIZE
    schedule = dict(lr_decay=True, warmup_tokens=512 * 20, final_tokens=final_tokens, num_workers=0)
    return {
        'model': dict(n_layer=4, n_head=8, n_embd=256),
        'pretrain': dict(max_epochs=650, batch_size=128, learning_rate=6e-3, **schedule),
        'finetune_scratch': dict(max_epochs=75, batch_size=256, learning_rate=6e-4, **schedule),
        'finetune_pretrained': dict(max_epochs=10, batch_size=256, learning_rate=6e-4, **schedule),
    }


def laptop_recipe(n_documents):
    """A recipe sized for a 2-core CPU: a narrower dropout-free model, bf16 and length-sorted chunks."""
    recipe = faithful_recipe(n_documents)
    pretrain_epochs = 300
    recipe['model'] = dict(n_layer=4, n_head=4, n_embd=128, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    recipe['pretrain'].update(max_epochs=pretrain_epochs, warmup_tokens=20 * 128 * 127,
                              final_tokens=pretrain_epochs * n_documents * (BLOCK_SIZE - 1),
                              precision='bf16', chunks=4)
    for key in ('finetune_scratch', 'finetune_pretrained'):
        recipe[key].update(precision='bf16', chunks=2)
    return recipe


RECIPES = {'faithful': faithful_recipe, 'laptop': laptop_recipe}

# Command-line overrides: flag -> (where it goes, type, help).
OVERRIDES = {
    'max_epochs': ('train', int, 'number of training epochs'),
    'max_steps': ('train', int, 'stop after this many optimizer steps'),
    'batch_size': ('train', int, 'batch size'),
    'learning_rate': ('train', float, 'peak learning rate'),
    'precision': ('train', str, "'fp32', 'bf16' (autocast) or 'auto' (bf16 on a capable GPU)"),
    'chunks': ('train', int, 'run each batch as this many length-sorted, trimmed pieces (same math)'),
    'num_workers': ('train', int, 'DataLoader worker processes'),
    'n_layer': ('model', int, 'number of Transformer blocks'),
    'n_head': ('model', int, 'attention heads per block'),
    'n_embd': ('model', int, 'embedding width'),
    'dropout': ('model', float, 'embd_pdrop, resid_pdrop and attn_pdrop at once'),
}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('function', choices=['pretrain', 'finetune', 'evaluate'],
                        help='whether to pretrain, finetune or evaluate a model')
    parser.add_argument('variant', choices=['vanilla', 'synthesizer'], help='which attention to use')
    parser.add_argument('pretrain_corpus_path', help='pretraining text; it also defines the vocabulary')
    parser.add_argument('--reading_params_path', help='params file to load first')
    parser.add_argument('--writing_params_path', help='where to save the trained params')
    parser.add_argument('--finetune_corpus_path', help='TSV of questions and places to finetune on')
    parser.add_argument('--eval_corpus_path', help='TSV of questions (and places) to evaluate on')
    parser.add_argument('--outputs_path', help='where to write one prediction per line')
    extra = parser.add_argument_group('recipe and overrides (defaults: the original settings)')
    extra.add_argument('--recipe', choices=sorted(RECIPES), default='faithful',
                       help="hyperparameter set: 'faithful' (the original) or 'laptop' (sized for a CPU)")
    for name, (_, kind, text) in OVERRIDES.items():
        extra.add_argument('--' + name, type=kind, help=text)
    extra.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    extra.add_argument('--device', help="torch device, e.g. 'cpu' or 'cuda' (default: CUDA when present)")
    extra.add_argument('--compile', action='store_true', help='torch.compile the model')
    extra.add_argument('--metrics_path', help='JSONL of per-step metrics (default: WRITING_PARAMS_PATH.metrics.jsonl)')
    extra.add_argument('--quiet', action='store_true', help='no progress bars')
    return parser


def settings_for(args, n_documents):
    """(model settings, trainer settings) of this run: the recipe, then the overrides."""
    recipe = RECIPES[args.recipe](n_documents)
    model_settings = dict(recipe['model'])
    if args.function == 'pretrain':
        train_settings = dict(recipe['pretrain'])
    elif args.reading_params_path:
        train_settings = dict(recipe['finetune_pretrained'])
    else:
        train_settings = dict(recipe['finetune_scratch'])
    for name, (where, _, _) in OVERRIDES.items():
        value = getattr(args, name)
        if value is None:
            continue
        if name == 'dropout':
            model_settings.update(embd_pdrop=value, resid_pdrop=value, attn_pdrop=value)
        else:
            (model_settings if where == 'model' else train_settings)[name] = value
    return model_settings, train_settings


def read_text(path):
    with open(path, encoding='utf-8') as f:
        return f.read()


def build_model(args, vocab_size, model_settings, device):
    config = model.GPTConfig(vocab_size, BLOCK_SIZE, synthesizer=args.variant == 'synthesizer', **model_settings)
    gpt = model.GPT(config)
    if args.reading_params_path:
        state = torch.load(args.reading_params_path, map_location='cpu', weights_only=True)
        gpt.load_state_dict(state)
    return gpt.to(device)


def describe(args, device, model_settings, train_settings):
    items = [f'recipe={args.recipe}', f'device={device}', f'seed={args.seed}']
    items += [f'{k}={v}' for k, v in model_settings.items()]
    if args.function != 'evaluate':
        items += [f'{k}={v}' for k, v in train_settings.items()]
    return f'{args.function} {args.variant}: ' + ' '.join(items)


def train(args, gpt, train_dataset, train_settings, device):
    metrics_path = args.metrics_path or args.writing_params_path + '.metrics.jsonl'
    config = trainer.TrainerConfig(metrics_path=metrics_path, compile=args.compile,
                                   show_progress=not args.quiet, **train_settings)
    trainer.Trainer(gpt, train_dataset, None, config, device=device).train()
    torch.save(gpt.state_dict(), args.writing_params_path)
    print(f'Params written to {args.writing_params_path}; metrics in {metrics_path}')


def predict(gpt, pretrain_dataset, questions, device, show_progress):
    """The place predicted for each question: the text between the first and second MASK."""
    mask = pretrain_dataset.MASK_CHAR
    prompts = [[pretrain_dataset.stoi[c] for c in q + mask] for q in questions]
    continuations = utils.greedy_decode(gpt, prompts, EVAL_STEPS, device=device, show_progress=show_progress)
    predictions = []
    for q, continuation in zip(questions, continuations):
        completion = q + mask + ''.join(pretrain_dataset.itos[i] for i in continuation)
        predictions.append(completion.split(mask)[1])
    return predictions


def evaluate(args, gpt, pretrain_dataset, device):
    with open(args.eval_corpus_path, encoding='utf-8') as f:
        questions = [line.rstrip('\r\n').split('\t')[0] for line in f]
    predictions = predict(gpt, pretrain_dataset, questions, device, show_progress=not args.quiet)
    with open(args.outputs_path, 'w', encoding='utf-8') as fout:
        for p in predictions:
            fout.write(p + '\n')
    total, correct = utils.evaluate_places(args.eval_corpus_path, predictions)
    if total > 0:
        print(f'Correct: {correct} out of {total}: {correct / total * 100}%')
    else:
        print(f'Predictions written to {args.outputs_path}; no targets provided')


def main(argv=None):
    args = build_parser().parse_args(argv)
    utils.set_seed(args.seed)
    device = trainer.resolve_device(args.device)
    pretrain_dataset = dataset.CharCorruptionDataset(read_text(args.pretrain_corpus_path), BLOCK_SIZE)
    model_settings, train_settings = settings_for(args, len(pretrain_dataset))
    print(describe(args, device, model_settings, train_settings), flush=True)
    gpt = build_model(args, pretrain_dataset.vocab_size, model_settings, device)

    if args.function == 'pretrain':
        train(args, gpt, pretrain_dataset, train_settings, device)
    elif args.function == 'finetune':
        finetune_dataset = dataset.NameDataset(pretrain_dataset, read_text(args.finetune_corpus_path))
        train(args, gpt, finetune_dataset, train_settings, device)
    else:
        evaluate(args, gpt, pretrain_dataset, device)


if __name__ == '__main__':
    main()
