"""Evaluation: a place predicted for every question, greedily decoded; the predictions written; the accuracy."""
import sys

import torch

import checks
import recipes
import utils

STEPS = 32  # characters greedily decoded per question


def predict(gpt, pretrain_dataset, questions, device, show_progress, skip=()):
    """The place predicted for each question: the text between the first and second MASK.

    Questions whose index is in `skip` get ''. A prompt too long for the cached
    decoder goes through utils.sample, which crops the context to the block
    size as the original evaluation did.
    """
    mask, stoi, itos = pretrain_dataset.MASK_CHAR, pretrain_dataset.stoi, pretrain_dataset.itos
    prompts = {i: [stoi[c] for c in q + mask] for i, q in enumerate(questions) if i not in skip}
    fits = [i for i, p in prompts.items() if len(p) + STEPS - 1 <= gpt.get_block_size()]
    # Decoding may stop at the second MASK: nothing after it is part of a prediction.
    decoded = utils.greedy_decode(gpt, [prompts[i] for i in fits], STEPS, device=device,
                                  show_progress=show_progress, stop_id=stoi[mask])
    continuations = dict(zip(fits, decoded))
    for i, prompt in prompts.items():
        if i not in continuations:
            x = torch.tensor([prompt], dtype=torch.long, device=device)
            continuations[i] = utils.sample(gpt, x, STEPS)[0, len(prompt):].tolist()
    predictions = []
    for i, q in enumerate(questions):
        if i in continuations:
            completion = q + mask + ''.join(itos[t] for t in continuations[i])
            predictions.append(completion.split(mask)[1])
        else:
            predictions.append('')
    return predictions


def read_questions(args, pretrain_dataset):
    """The eval questions and {index: characters the vocabulary lacks}; the synthesizer's length limit checked."""
    max_positions = recipes.BLOCK_SIZE - 1 if args.variant == 'synthesizer' else None
    return checks.read_questions(args.eval_corpus_path, pretrain_dataset.stoi, max_positions, STEPS,
                                 prompt=args.eval_prompt)


def evaluate(args, gpt, pretrain_dataset, device, questions, unknown):
    """Predict a place for every question (read_questions), write them whole, then print the accuracy."""
    for index, chars in sorted(unknown.items()):
        print(f'warning: {args.eval_corpus_path} line {index + 1}: {", ".join(map(repr, chars))} not in the '
              f'vocabulary of {args.pretrain_corpus_path}; predicting an empty string', file=sys.stderr)
    predictions = predict(gpt, pretrain_dataset, questions, device, show_progress=not args.quiet, skip=unknown)
    with utils.atomic_write(args.outputs_path) as temporary, open(temporary, 'w', encoding='utf-8') as fout:
        for p in predictions:
            fout.write(p + '\n')
    total, correct = utils.evaluate_places(args.eval_corpus_path, predictions)
    if total > 0:
        print(f'Correct: {correct} out of {total}: {correct / total * 100}%')
    else:
        print(f'Predictions written to {args.outputs_path}; no targets provided')
