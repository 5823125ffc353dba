"""Denormal floats: evaluation speed with and without flushing them to zero, and the predictions of both.

    python bench/denormals.py [--questions 40]

Two default-size vanilla models decode the first --questions dev questions
with utils.greedy_decode and run one forward pass, each timed with the CPU
flushing denormals (what run.py does) and without:
- 'nn defaults': every Linear, Embedding and LayerNorm at PyTorch's default
  initialisation instead of the contract's normal(0, 0.02);
- 'denormal weights': the contract's initialisation with the attention and
  MLP matrices scaled by 1e-37, into float32's denormal range, as a long
  weight decay can leave weights that no gradient reaches; every forward
  pass then computes with denormals.
One thread, so that toggling the setting reaches every thread that computes
(utils.flush_denormals says why). Prints the CPU model, both times, their
ratio, and whether the predictions are identical.
"""
import argparse
import contextlib
import os
import platform
import sys
import time

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.join(ROOT, 'src'))
import dataset  # noqa: E402
import model  # noqa: E402
import utils  # noqa: E402


def cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(kind, vocab_size):
    utils.set_seed(0)
    gpt = model.GPT(model.GPTConfig(vocab_size, 128, n_layer=4, n_head=8, n_embd=256))
    with torch.no_grad():
        for module in gpt.modules():
            if kind == 'nn defaults' and module is not gpt and hasattr(module, 'reset_parameters'):
                module.reset_parameters()
        if kind == 'denormal weights':
            for name, p in gpt.named_parameters():
                if p.dim() == 2 and ('.attn.' in name or '.mlp.' in name):
                    p.mul_(1e-37)
    return gpt.eval()


def timed(gpt, prompts, stop_id, flush):
    """(seconds of greedy_decode, seconds of one forward, continuations), flushing denormals or not."""
    torch.set_flush_denormal(False)
    # greedy_decode flushes by itself (utils.flush_denormals); __wrapped__ is the function without it
    decode = utils.greedy_decode if flush else utils.greedy_decode.__wrapped__
    start = time.perf_counter()
    decoded = decode(gpt, prompts, 32, stop_id=stop_id)
    decode_s = time.perf_counter() - start
    with utils.flush_denormals() if flush else contextlib.nullcontext(), torch.no_grad():
        start = time.perf_counter()
        gpt(torch.tensor([prompts[0]]))
        forward_s = time.perf_counter() - start
    return decode_s, forward_s, decoded


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--questions', type=int, default=40, help='dev questions to decode (default 40)')
    args = parser.parse_args()
    torch.set_num_threads(1)
    with open(os.path.join(ROOT, 'wiki.txt'), encoding='utf-8') as f:
        corpus = dataset.CharCorruptionDataset(f.read(), 128)
    with open(os.path.join(ROOT, 'birth_dev.tsv'), encoding='utf-8') as f:
        questions = [line.split('\t')[0] for line in f.read().split('\n') if line][:args.questions]
    prompts = [[corpus.stoi[c] for c in q + corpus.MASK_CHAR] for q in questions]
    stop_id = corpus.stoi[corpus.MASK_CHAR]
    print(f'# greedy_decode of {len(prompts)} dev questions and one forward pass, default-size vanilla model; '
          f'{cpu_model()}; torch {torch.__version__}, 1 thread')
    for kind in ('nn defaults', 'denormal weights'):
        gpt = build(kind, corpus.vocab_size)
        slow = timed(gpt, prompts, stop_id, flush=False)
        fast = timed(gpt, prompts, stop_id, flush=True)
        print(f'{kind:17s} greedy_decode: {slow[0]:7.2f} s without flushing, {fast[0]:6.2f} s with, '
              f'{slow[0] / fast[0]:5.1f}x | one forward: {slow[1]:.4f} s, {fast[1]:.4f} s, '
              f'{slow[1] / fast[1]:5.1f}x | identical predictions: {slow[2] == fast[2]}')


if __name__ == '__main__':
    main()
