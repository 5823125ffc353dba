"""Evaluation speed: `python src/run.py evaluate` against the one-question-at-a-time loop.

    python bench/evaluate.py [--params P --variant vanilla] [--reference_questions 50]

The reference is the original loop: for each question, utils.sample re-runs
the whole prefix for every one of the 32 decoded characters. It is timed on
the first --reference_questions dev questions and scaled to all of them; the
fast path is the whole `run.py evaluate` process (start-up included) on all
500. Predictions of the two are compared on the questions both decoded.
Without --params a randomly initialised default model is written and used.
"""
import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.join(ROOT, 'src'))
import dataset  # noqa: E402
import model  # noqa: E402
import utils  # noqa: E402


def reference_predictions(gpt, corpus, questions):
    mask = corpus.MASK_CHAR
    predictions = []
    for q in questions:
        x = torch.tensor([corpus.stoi[c] for c in q + mask], dtype=torch.long)[None, ...]
        out = utils.sample(gpt, x, 32, sample=False)[0]
        predictions.append(''.join(corpus.itos[int(i)] for i in out).split(mask)[1])
    return predictions


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--params', help='params file of the default model (default: a random model)')
    parser.add_argument('--variant', choices=['vanilla', 'synthesizer'], default='vanilla')
    parser.add_argument('--reference_questions', type=int, default=50,
                        help='how many questions the slow loop decodes (its time is scaled to all)')
    args = parser.parse_args()

    with open(os.path.join(ROOT, 'wiki.txt'), encoding='utf-8') as f:
        corpus = dataset.CharCorruptionDataset(f.read(), 128)
    dev_path = os.path.join(ROOT, 'birth_dev.tsv')
    with open(dev_path, encoding='utf-8') as f:
        questions = [line.rstrip('\r\n').split('\t')[0] for line in f]
    config = model.GPTConfig(corpus.vocab_size, 128, n_layer=4, n_head=8, n_embd=256,
                             synthesizer=args.variant == 'synthesizer')
    utils.set_seed(0)
    gpt = model.GPT(config)
    with tempfile.TemporaryDirectory() as tmp:
        params = args.params
        if params is None:
            params = os.path.join(tmp, 'random.params')
            torch.save(gpt.state_dict(), params)
        gpt.load_state_dict(torch.load(params, map_location='cpu', weights_only=True))
        gpt.eval()

        n = min(args.reference_questions, len(questions))
        start = time.perf_counter()
        slow = reference_predictions(gpt, corpus, questions[:n])
        slow_per_question = (time.perf_counter() - start) / n

        outputs = os.path.join(tmp, 'dev.predictions')
        command = [sys.executable, os.path.join(ROOT, 'src', 'run.py'), 'evaluate', args.variant,
                   os.path.join(ROOT, 'wiki.txt'), '--reading_params_path', params,
                   '--eval_corpus_path', dev_path, '--outputs_path', outputs, '--quiet', '--device', 'cpu']
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        fast_total = time.perf_counter() - start
        with open(outputs, encoding='utf-8') as f:
            fast = [line.rstrip('\n') for line in f]

    slow_total = slow_per_question * len(questions)
    same = sum(a == b for a, b in zip(slow, fast[:n]))
    cpu = platform.processor() or platform.machine()
    print(f'# evaluate, {args.variant}, {len(questions)} dev questions; torch {torch.__version__}; '
          f'{cpu}, {torch.get_num_threads()} threads')
    print(f'one at a time (utils.sample), {n} questions timed: {slow_per_question:.3f} s/question, '
          f'{slow_total:.1f} s for {len(questions)} (scaled)')
    print(f'run.py evaluate, whole process:            {fast_total:.1f} s   {slow_total / fast_total:.1f}x')
    print(f'identical predictions on the {n} questions both decoded: {same}/{n}')


if __name__ == '__main__':
    main()
