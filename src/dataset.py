"""Datasets: span-corruption pretraining on Wikipedia text and the birthplace QA task.

Both datasets share one character vocabulary, built by CharCorruptionDataset
from the pretraining text: id 0 is the pad character, id 1 the mask character,
and ids 2.. are the text's distinct characters in code point order.

Importing this module has no side effects; `python src/dataset.py namedata`
and `python src/dataset.py charcorruption` print a few decoded examples.
"""
import argparse
import os
import random

import torch
from torch.utils.data import Dataset

PAD_CHAR = u"\u25A1"   # □
MASK_CHAR = u"\u2047"  # ⁇


def check_reserved(text):
    """ValueError naming the line of the pad or mask character, if the text holds one: the model reserves both."""
    for char, name in ((PAD_CHAR, 'pad'), (MASK_CHAR, 'mask')):
        at = text.find(char)
        if at >= 0:
            line = text.count('\n', 0, at) + 1
            raise ValueError(f'line {line} contains the {name} character U+{ord(char):04X} ({char}), '
                             f'which the model reserves; remove it from the corpus')


def split_documents(data):
    """Lines of `data`, without the empty string after a final newline."""
    lines = data.split('\n')
    if lines and lines[-1] == '':
        lines.pop()
    return lines


class NameDataset(Dataset):
    """`Where was X born?<TAB>place` lines as (x, y) pairs whose y is pad except the answer.

    With s = question + MASK + place + MASK padded to block_size:
    x = s[:-1] and y = PAD * (len(question) - 1) + s[len(question):],
    so the loss (which ignores pad) trains only the answer.
    """

    def __init__(self, pretraining_dataset, data):
        self.MASK_CHAR = pretraining_dataset.MASK_CHAR
        self.PAD_CHAR = pretraining_dataset.PAD_CHAR
        self.itos = pretraining_dataset.itos
        self.stoi = pretraining_dataset.stoi
        self.block_size = pretraining_dataset.block_size
        # The original drops every non-ASCII character before splitting.
        ascii_data = data.encode('utf-8').decode('ascii', errors='ignore')
        self.data = [line.rstrip('\r') for line in split_documents(ascii_data)]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        question, answer = self.data[idx].split('\t')
        s = question + self.MASK_CHAR + answer + self.MASK_CHAR
        s = s + self.PAD_CHAR * (self.block_size - len(s))
        y = self.PAD_CHAR * (len(question) - 1) + s[len(question):]
        x = s[:-1]
        x = torch.tensor([self.stoi[c] for c in x], dtype=torch.long)
        y = torch.tensor([self.stoi[c] for c in y], dtype=torch.long)
        return x, y


class CharCorruptionDataset(Dataset):
    """Single-span corruption of each document, a simplified T5 objective.

    Item idx (fresh randomness on every call):
      1. keep the first L characters of document idx, L uniform in
         [4, int(block_size * 7 / 8)] (the whole document if shorter);
      2. cut the kept text into prefix + masked_content + suffix, the masked
         length uniform in [1, round(L / 2) - 1] (mean L / 4) and its start
         uniform over every position where it fits;
      3. masked_string = prefix + MASK + suffix + MASK + masked_content,
         right-padded with PAD to block_size;
      4. x = masked_string[:-1], y = masked_string[1:].
    """

    def __init__(self, data, block_size):
        self.MASK_CHAR = MASK_CHAR
        self.PAD_CHAR = PAD_CHAR
        check_reserved(data)
        chars = [PAD_CHAR, MASK_CHAR] + sorted(set(data))
        self.stoi = {ch: i for i, ch in enumerate(chars)}
        self.itos = {i: ch for i, ch in enumerate(chars)}
        self.block_size = block_size
        self.vocab_size = len(chars)
        self.data = split_documents(data)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        document = self.data[idx]
        kept = document[:random.randint(4, int(self.block_size * 7 / 8))]
        masked_len = random.randint(1, max(1, round(len(kept) / 2) - 1)) if kept else 0
        masked_len = min(masked_len, len(kept))
        start = random.randint(0, len(kept) - masked_len)
        prefix, masked_content, suffix = kept[:start], kept[start:start + masked_len], kept[start + masked_len:]
        s = prefix + MASK_CHAR + suffix + MASK_CHAR + masked_content
        s = (s + PAD_CHAR * (self.block_size - len(s)))[:self.block_size]
        x = torch.tensor([self.stoi[c] for c in s[:-1]], dtype=torch.long)
        y = torch.tensor([self.stoi[c] for c in s[1:]], dtype=torch.long)
        return x, y


def decode(dataset, ids):
    return ''.join(dataset.itos[int(i)] for i in ids)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Print a few decoded examples of a dataset.')
    parser.add_argument('dataset_type', choices=['namedata', 'charcorruption'],
                        help='namedata: birth_places_train.tsv; charcorruption: wiki.txt')
    parser.add_argument('--count', type=int, default=4, help='how many examples to print')
    args = parser.parse_args(argv)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
    with open(os.path.join(root, 'wiki.txt'), encoding='utf-8') as f:
        corruption_dataset = CharCorruptionDataset(f.read(), 128)
    if args.dataset_type == 'namedata':
        with open(os.path.join(root, 'birth_places_train.tsv'), encoding='utf-8') as f:
            dataset = NameDataset(corruption_dataset, f.read())
    else:
        dataset = corruption_dataset
    for _, (x, y) in zip(range(args.count), dataset):
        print('x:', decode(dataset, x))
        print('y:', decode(dataset, y))


if __name__ == '__main__':
    main()
