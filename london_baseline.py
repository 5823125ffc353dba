"""Accuracy on the dev set of always answering "London".

    python london_baseline.py

Prints the same `Correct:` line as `src/run.py evaluate`, computed by
`utils.evaluate_places`.
"""
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, 'src'))
import utils  # noqa: E402

DEV_PATH = os.path.join(ROOT, 'birth_dev.tsv')


def main():
    with open(DEV_PATH, encoding='utf-8') as f:
        n_lines = len(f.read().splitlines())
    predictions = ['London'] * n_lines
    total, correct = utils.evaluate_places(DEV_PATH, predictions)
    print(f'Correct: {correct} out of {total}: {correct / total * 100}%')


if __name__ == '__main__':
    main()
