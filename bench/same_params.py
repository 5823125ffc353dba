"""Does this tree train exactly as another commit does? Byte-for-byte params of short CPU runs.

    python bench/same_params.py [--ref 1d7ba19] [--keep DIR]

Extracts src/ of commit REF (git archive, so the repository is left as it
is) and runs the same short pretrain and finetune commands with both copies
of src/run.py: fixed seed, `--max_steps 3`, a small model, one CPU thread.
For each run it compares a sha256 of the params (every key, dtype, shape
and tensor byte), the metrics file without its timings, and stdout (which
holds the effective settings). The cases cover the default CPU chunks,
`--chunks 1`, `--batching stratified`, the synthesizer, DataLoader workers,
the laptop recipe (whose cosine follows --max_epochs), weight decay on
matrices, and a finetune from each pretrained file. Exit status 1 on any
difference.
(Not a pytest test: it needs git history, and hashes are only comparable
between two runs on one machine.)
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
SMALL = ['--n_layer', '2', '--n_head', '2', '--n_embd', '32', '--batch_size', '16', '--max_steps', '3',
         '--seed', '3', '--device', 'cpu', '--quiet']

# name -> (pretrain flags, finetune flags); every finetune reads the pretrain's params
CASES = {
    'vanilla, default chunks (4 on a CPU)': ([], []),
    'vanilla, --chunks 1': (['--chunks', '1'], ['--chunks', '1']),
    'vanilla, --batching stratified': (['--batching', 'stratified'], ['--batching', 'stratified', '--chunks', '2']),
    'synthesizer, default chunks': (['VARIANT=synthesizer'], []),
    'vanilla, --num_workers 2': (['--num_workers', '2'], ['--num_workers', '1']),
    'vanilla, --recipe laptop --max_epochs 7': (['--recipe', 'laptop', '--max_epochs', '7'], ['--recipe', 'laptop']),
    'vanilla, --weight_decay_on matrices': (['--weight_decay_on', 'matrices'], ['--weight_decay', '0.2']),
}


def params_digest(path):
    """sha256 over the params file's keys, in order, and each tensor's dtype, shape and raw bytes.

    Not of the file itself: torch.save names the zip's inner folder after the
    file it writes, and atomic_write's temporary name holds the process id.
    """
    import torch
    digest = hashlib.sha256()
    for key, tensor in torch.load(path, map_location='cpu', weights_only=True).items():
        digest.update(f'{key} {tensor.dtype} {tuple(tensor.shape)}'.encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def metrics_without_timings(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in row.items() if k not in ('tokens_per_s', 'wall_s')} for row in rows]


def run(src, folder, function, variant, flags):
    """One `python SRC/run.py` run writing into `folder`: (params sha256, metrics, stdout)."""
    params = os.path.join(folder, f'{function}.params')
    argv = [function, variant, os.path.join(ROOT, 'wiki.txt'), '--writing_params_path', params]
    if function == 'finetune':
        argv += ['--reading_params_path', os.path.join(folder, 'pretrain.params'),
                 '--finetune_corpus_path', os.path.join(ROOT, 'birth_places_train.tsv')]
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    result = subprocess.run([sys.executable, os.path.join(src, 'run.py')] + argv + SMALL + flags,
                            cwd=folder, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f'{src}/run.py {function} failed:\n{result.stderr}')
    stdout = result.stdout.replace(folder, 'FOLDER')
    return params_digest(params), metrics_without_timings(params + '.metrics.jsonl'), stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ref', default='1d7ba19', help='the commit to compare with (default: before issue 11)')
    parser.add_argument('--keep', help='write the runs into this folder (and keep them) instead of a temporary one')
    args = parser.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix='same_params.')
    old_src = os.path.join(work, 'old')
    os.makedirs(old_src, exist_ok=True)
    archive = subprocess.run(['git', 'archive', args.ref, 'src'], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(['tar', '-x', '-C', old_src], input=archive, check=True)
    trees = {'old': os.path.join(old_src, 'src'), 'new': os.path.join(ROOT, 'src')}
    print(f'# {args.ref} (old) against the working tree (new); runs in {work}')
    differences = 0
    for number, (name, (pretrain_flags, finetune_flags)) in enumerate(CASES.items()):
        variant = 'synthesizer' if 'VARIANT=synthesizer' in pretrain_flags else 'vanilla'
        pretrain_flags = [f for f in pretrain_flags if not f.startswith('VARIANT=')]
        for function, flags in (('pretrain', pretrain_flags), ('finetune', finetune_flags)):
            results = {}
            for tree, src in trees.items():
                folder = os.path.join(work, f'case{number}', tree)
                os.makedirs(folder, exist_ok=True)
                results[tree] = run(src, folder, function, variant, flags)
            same = results['old'] == results['new']
            differences += not same
            print(f'{"same" if same else "DIFFERENT":9s} {results["new"][0][:16]}  {function:8s} {name}', flush=True)
            if not same:
                for part, old, new in zip(('params', 'metrics', 'stdout'), results['old'], results['new']):
                    if old != new:
                        print(f'    {part} differs:\n      old {old!r:.300}\n      new {new!r:.300}')
    print(f'{differences} difference(s)')
    if not args.keep:
        shutil.rmtree(work)
    sys.exit(1 if differences else 0)


if __name__ == '__main__':
    main()
