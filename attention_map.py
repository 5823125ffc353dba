"""Draw the attention weights of every layer and head of one or more models, as heat maps over the characters.

    python attention_map.py --model vanilla vanilla.finetune.params \
        --model synthesizer synthesizer.finetune.params --output attention.png [--dev 1 2 3] [--question TEXT]
    python attention_map.py --model vanilla laptop/vanilla.finetune.params --output a.png -- --recipe laptop

Each model answers each question as `src/run.py evaluate` does (greedy, with
the key/value cache); then it reads `question⁇answer⁇` once more with its
attention modules keeping their weights (`keep_weights`, src/attention.py),
and those weights are drawn: one row per layer, one column per head, query
position down, key position across, on one colour scale from 0 to 1. The
questions are lines of birth_dev.tsv (--dev, default the first three) or
given with --question. Flags after `--` are src/run.py flags for building
the model (default: the faithful recipe). Needs matplotlib.
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, 'src'))
import checks  # noqa: E402
import dataset  # noqa: E402
import evaluation  # noqa: E402
import run  # noqa: E402

DEV = os.path.join(ROOT, 'birth_dev.tsv')
PANEL_IN = 1.5  # inches per heat map
DPI = 90


def load(variant, params, corpus, flags):
    """(the GPT in eval mode on the CPU, the pretraining dataset) for a params file, as run.py evaluate builds it."""
    args = run.parse_args(['evaluate', variant, corpus, '--reading_params_path', params, '--device', 'cpu', *flags])
    text = checks.read_text(corpus, 'PRETRAIN_CORPUS_PATH')
    pretrain_dataset = dataset.CharCorruptionDataset(text, run.BLOCK_SIZE)
    model_settings, _ = run.settings_for(args, len(pretrain_dataset), torch.device('cpu'))
    checks.check_settings(model_settings, {}, run.BLOCK_SIZE)
    gpt = run.build_model(args, pretrain_dataset.vocab_size, model_settings, torch.device('cpu'))
    return gpt.eval(), pretrain_dataset


def attention_weights(gpt, pretrain_dataset, question):
    """(the characters read, [(module name, weights (heads, T, T))]) for the question and the model's answer."""
    mask = pretrain_dataset.MASK_CHAR
    answer = evaluation.predict(gpt, pretrain_dataset, [question], 'cpu', show_progress=False)[0]
    text = (question + mask + answer + mask)[:gpt.get_block_size() - 1]
    modules = [(name, m) for name, m in gpt.named_modules() if hasattr(m, 'keep_weights')]
    for _, m in modules:
        m.keep_weights = True
    try:
        with torch.no_grad():
            gpt(torch.tensor([[pretrain_dataset.stoi[c] for c in text]]))
    finally:
        for _, m in modules:
            m.keep_weights = False
    return text, answer, [(name, m.weights[0]) for name, m in modules]


def word_ticks(chars):
    """(positions, labels): the first character of each word, and each mask, so the reader can find their place."""
    starts = [i for i, c in enumerate(chars) if c != ' ' and (i == 0 or chars[i - 1] in ' ⁇' or c == '⁇')]
    ends = starts[1:] + [len(chars)]
    return starts, [chars[a:b].strip() for a, b in zip(starts, ends)]


def draw(blocks, path):
    """One PNG: for each (title, characters, [(name, weights)]) block, a row per module and a column per head."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm
    from PIL import Image  # a dependency of matplotlib

    cols = max(w.size(0) for _, _, layers in blocks for _, w in layers)
    heights = [len(layers) + 0.6 for _, _, layers in blocks]
    fig = plt.figure(figsize=(cols * PANEL_IN + 1, sum(heights) * PANEL_IN), dpi=DPI, layout='constrained')
    norm = PowerNorm(gamma=0.5, vmin=0, vmax=1)  # small weights stay visible beside large ones
    subfigs = fig.subfigures(len(blocks), 1, height_ratios=heights, squeeze=False)[:, 0]
    for subfig, (title, chars, layers) in zip(subfigs, blocks):
        subfig.suptitle(title, fontsize=10, x=0.02, ha='left')
        axes = subfig.subplots(len(layers), cols, squeeze=False)
        ticks, labels = word_ticks(chars)
        for i, (name, weights) in enumerate(layers):
            for h, ax in enumerate(axes[i]):
                ax.set_xticks([])
                ax.set_yticks([])
                if h >= weights.size(0):
                    ax.axis('off')
                    continue
                image = ax.imshow(weights[h].numpy(), cmap='magma', norm=norm, interpolation='nearest')
                if i == 0:
                    ax.set_title(f'head {h + 1}', fontsize=8)
                if i == len(layers) - 1:
                    ax.set_xticks(ticks, labels, fontsize=5, rotation=90)
            axes[i, 0].set_yticks(ticks, labels, fontsize=5)
            axes[i, 0].set_ylabel(module_label(name), fontsize=8)
        for ax in axes.ravel():
            ax.tick_params(length=1.5, pad=1)
        subfig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.015, pad=0.01, label='attention weight')
    tmp = path + '.tmp.png'
    fig.savefig(tmp)
    # 256 colours hold the colour map, the text and the white: a third of the size of full colour
    Image.open(tmp).convert('RGB').quantize(256).save(tmp, optimize=True)
    os.replace(tmp, path)


def module_label(name):
    """'blocks.2.attn' -> 'layer 3'; other module names as they are."""
    parts = name.split('.')
    if len(parts) == 3 and parts[0] == 'blocks' and parts[2] == 'attn':
        return f'layer {int(parts[1]) + 1}'
    return name


def questions_from(args):
    """The questions and their gold places ('' where unknown): --question texts, else --dev lines."""
    if args.question:
        return [(q, '') for q in args.question]
    with open(DEV, encoding='utf-8') as f:
        lines = [line.rstrip('\n').split('\t') for line in f]
    for n in args.dev:
        if not 1 <= n <= len(lines):
            raise checks.BadInput(f'--dev {n}: birth_dev.tsv has lines 1 to {len(lines)}')
    return [tuple(lines[n - 1]) for n in args.dev]


def main(argv=None):
    parser = argparse.ArgumentParser(prog='attention_map.py', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', nargs=2, action='append', required=True, metavar=('VARIANT', 'PARAMS'),
                        help='the attention variant and its params file (repeat for a comparison)')
    parser.add_argument('--output', required=True, help='PNG file to write')
    parser.add_argument('--dev', type=int, nargs='+', default=[1, 2, 3], help='line numbers of birth_dev.tsv')
    parser.add_argument('--question', action='append', help='a question of your own (instead of --dev)')
    parser.add_argument('--corpus', default=os.path.join(ROOT, 'wiki.txt'), help='the pretraining corpus')
    parser.add_argument('flags', nargs='*', help='src/run.py flags for the model, after -- (e.g. --recipe laptop)')
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit('attention_map.py needs matplotlib: pip install matplotlib')
    try:
        checks.check_outputs([('--output', args.output)], [('--model', p) for _, p in args.model])
        questions = questions_from(args)
        models = [(variant, *load(variant, params, args.corpus, args.flags)) for variant, params in args.model]
        blocks = []
        for question, gold in questions:
            for variant, gpt, pretrain_dataset in models:
                unknown = sorted(set(question) - set(pretrain_dataset.stoi))
                if unknown:
                    raise checks.BadInput(f'the question {question!r} has characters the vocabulary lacks: {unknown}')
                chars, answer, layers = attention_weights(gpt, pretrain_dataset, question)
                if not layers:  # a perceiver with no middle blocks: its cross-attention is not drawn
                    print(f'attention_map.py: {variant} has no self-attention layer to draw; left out')
                    continue
                said = f'answers {answer!r}' + (f' (gold: {gold!r})' if gold else '')
                blocks.append((f'{variant}: {question} {said}', chars, layers))
        if not blocks:
            raise checks.BadInput('no model has a self-attention layer to draw')
    except checks.BadInput as e:
        sys.exit(f'attention_map.py: error: {e}')
    draw(blocks, args.output)
    print(f'Attention maps written to {args.output}')


if __name__ == '__main__':
    main()
