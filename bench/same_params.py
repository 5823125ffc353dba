"""Does this tree train exactly as another commit does? Byte-for-byte params of short CPU runs.

    python bench/same_params.py [--ref cb08d11] [--keep DIR]

Extracts src/ of commit REF (git archive, so the repository is left as it
is) and runs the same short commands with both copies of src/run.py: fixed
seed, `--max_steps 3`, a small model, one CPU thread. Each case runs a
pretrain, a finetune from its params, a finetune from scratch, and an
evaluation of the finetuned params on the dev set. For each run it compares
a sha256 of the params (every key, dtype, shape and tensor byte) or of the
predictions, the metrics file without its timings, and stdout (which holds
the effective settings; their order on the settings line is not compared).
The cases cover both variants, both recipes, the default CPU chunks,
`--chunks 1`, `--batching stratified`, DataLoader workers, weight decay on
matrices, `--train_step fixed`, `--data_path device`, and two processes
under torchrun (gloo). Exit status 1 on any difference.
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
FUNCTIONS = ('pretrain', 'finetune', 'scratch', 'evaluate')  # scratch: a finetune without pretrained params

# name -> (variant, processes, pretrain flags, flags of the finetunes and the evaluation)
CASES = {
    'vanilla, default chunks (4 on a CPU)': ('vanilla', 1, [], []),
    'vanilla, --chunks 1': ('vanilla', 1, ['--chunks', '1'], ['--chunks', '1']),
    'vanilla, --batching stratified': ('vanilla', 1, ['--batching', 'stratified'],
                                       ['--batching', 'stratified', '--chunks', '2']),
    'synthesizer, default chunks': ('synthesizer', 1, [], []),
    'vanilla, --num_workers 2': ('vanilla', 1, ['--num_workers', '2'], ['--num_workers', '1']),
    'vanilla, --recipe laptop --max_epochs 7': ('vanilla', 1, ['--recipe', 'laptop', '--max_epochs', '7'],
                                                ['--recipe', 'laptop']),
    'synthesizer, --recipe laptop': ('synthesizer', 1, ['--recipe', 'laptop'], ['--recipe', 'laptop']),
    'vanilla, --weight_decay_on matrices': ('vanilla', 1, ['--weight_decay_on', 'matrices'],
                                            ['--weight_decay', '0.2']),
    'vanilla, --train_step fixed': ('vanilla', 1, ['--train_step', 'fixed'], ['--train_step', 'fixed']),
    'synthesizer, --data_path device --train_step fixed': (
        'synthesizer', 1, ['--data_path', 'device', '--train_step', 'fixed'], ['--data_path', 'device']),
    'vanilla, --data_path device': ('vanilla', 1, ['--data_path', 'device'], ['--data_path', 'device']),
    'vanilla, 2 processes (torchrun, gloo)': ('vanilla', 2, [], ['--batch_size', '6']),
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


def file_digest(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def settings_unordered(stdout):
    """stdout with the items of run.py's settings line (`pretrain vanilla: recipe=... ...`) sorted."""
    lines = stdout.split('\n')
    for i, line in enumerate(lines):
        head, colon, items = line.partition(': ')
        if colon and head.split(' ')[0] in ('pretrain', 'finetune', 'evaluate') and '=' in items:
            lines[i] = head + colon + ' '.join(sorted(items.split(' ')))
    return '\n'.join(lines)


def argv_of(function, variant, folder):
    """run.py's arguments for `function` (FUNCTIONS) writing into `folder`; the output file's path."""
    wiki, train = os.path.join(ROOT, 'wiki.txt'), os.path.join(ROOT, 'birth_places_train.tsv')
    if function == 'evaluate':
        output = os.path.join(folder, 'dev.predictions')
        return ['evaluate', variant, wiki, '--reading_params_path', os.path.join(folder, 'finetune.params'),
                '--eval_corpus_path', os.path.join(ROOT, 'birth_dev.tsv'), '--outputs_path', output], output
    output = os.path.join(folder, f'{function}.params')
    argv = ['pretrain' if function == 'pretrain' else 'finetune', variant, wiki, '--writing_params_path', output]
    if function != 'pretrain':
        argv += ['--finetune_corpus_path', train]
    if function == 'finetune':
        argv += ['--reading_params_path', os.path.join(folder, 'pretrain.params')]
    return argv, output


def run(src, folder, function, variant, processes, flags):
    """One run.py run of `src` writing into `folder`: (params or predictions sha256, metrics, stdout)."""
    argv, output = argv_of(function, variant, folder)
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    launcher = [sys.executable]
    if processes > 1 and function != 'evaluate':
        launcher += ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(processes)]
    result = subprocess.run(launcher + [os.path.join(src, 'run.py')] + argv + SMALL + flags,
                            cwd=folder, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f'{src}/run.py {function} failed:\n{result.stderr}')
    stdout = settings_unordered(result.stdout.replace(folder, 'FOLDER'))
    if function == 'evaluate':
        return file_digest(output), None, stdout
    return params_digest(output), metrics_without_timings(output + '.metrics.jsonl'), stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ref', default='cb08d11', help='the commit to compare with (default: before issue 21)')
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
    for number, (name, (variant, processes, pretrain_flags, later_flags)) in enumerate(CASES.items()):
        for function in FUNCTIONS:
            flags = pretrain_flags if function == 'pretrain' else later_flags
            results = {}
            for tree, src in trees.items():
                folder = os.path.join(work, f'case{number}', tree)
                os.makedirs(folder, exist_ok=True)
                results[tree] = run(src, folder, function, variant, processes, flags)
            same = results['old'] == results['new']
            differences += not same
            print(f'{"same" if same else "DIFFERENT":9s} {results["new"][0][:16]}  {function:8s} {name}', flush=True)
            if not same:
                for part, old, new in zip(('output', 'metrics', 'stdout'), results['old'], results['new']):
                    if old != new:
                        print(f'    {part} differs:\n      old {old!r:.300}\n      new {new!r:.300}')
    print(f'{differences} difference(s)')
    if not args.keep:
        shutil.rmtree(work)
    sys.exit(1 if differences else 0)


if __name__ == '__main__':
    main()
