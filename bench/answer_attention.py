"""Where a model looks while it writes its answer: per layer, over the dev questions.

    python bench/answer_attention.py --model vanilla vanilla.finetune.params \
        --model synthesizer synthesizer.finetune.params [--questions 500] [-- run.py flags, e.g. --recipe laptop]

For each dev question the model answers (greedy, as src/run.py evaluate) and
reads `question⁇answer⁇` with its weights kept (attention_map.py). The rows
that predict the answer (from the first mask to the last answer character)
are summarised per layer, averaged over heads, rows and questions: the
weight on the person's name (between "Where was " and " born?"), on the
first character, on the answer's own part, each row's entropy (nats) and
its largest weight. It also counts the answers that are right.
"""
import argparse
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, ROOT)
import attention_map  # noqa: E402

COLUMNS = ('name', 'first', 'answer part', 'entropy', 'largest')


def summary(rows, name, answer_start):
    """The COLUMNS for answer rows (heads, rows, keys)."""
    entropy = -(rows.clamp_min(1e-30).log() * rows).sum(-1)
    return torch.stack([rows[..., name].sum(-1).mean(), rows[..., 0].mean(), rows[..., answer_start:].sum(-1).mean(),
                        entropy.mean(), rows.max(-1).values.mean()])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', nargs=2, action='append', required=True, metavar=('VARIANT', 'PARAMS'))
    parser.add_argument('--questions', type=int, default=500, help='the first N lines of birth_dev.tsv')
    parser.add_argument('flags', nargs='*', help='src/run.py flags for the model, after --')
    args = parser.parse_args()
    with open(os.path.join(ROOT, 'birth_dev.tsv'), encoding='utf-8') as f:
        lines = [line.rstrip('\n').split('\t') for line in f][:args.questions]
    for variant, params in args.model:
        gpt, pretrain_dataset = attention_map.load(variant, params, os.path.join(ROOT, 'wiki.txt'), args.flags)
        total, right, n = 0, 0, 0
        for question, gold in lines:
            chars, answer, layers = attention_map.attention_weights(gpt, pretrain_dataset, question)
            right += answer == gold
            name = slice(len('Where was '), len(question) - len(' born?'))
            start = len(question)  # the first mask: its row predicts the answer's first character
            total = total + torch.stack([summary(w[:, start:len(chars) - 1], name, start) for _, w in layers])
            n += 1
        print(f'{variant} ({params}): {right} of {n} answers right; answer rows, mean over heads, rows, questions')
        print('| layer | ' + ' | '.join(COLUMNS) + ' |\n' + '|---' * (len(COLUMNS) + 1) + '|')
        for i, values in enumerate(total / n):
            print(f'| {i + 1} | ' + ' | '.join(f'{v:.2f}' for v in values.tolist()) + ' |')


if __name__ == '__main__':
    main()
