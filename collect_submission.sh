#!/usr/bin/env bash
# Builds assignment5.zip in the repository root: src/*.py plus the params and
# predictions files of the three model runs, whichever exist. Every expected
# file that is missing is named on stderr. Needs only Python 3 (no zip binary).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON=""
for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3,))' 2>/dev/null; then
        PYTHON="$candidate"
        break
    fi
done
if [ -z "$PYTHON" ]; then
    echo "collect_submission.sh: needs python3 on PATH" >&2
    exit 1
fi

"$PYTHON" - <<'PYEOF'
import glob
import os
import sys
import tempfile
import zipfile

ZIP_NAME = 'assignment5.zip'
EXPECTED = [
    'vanilla.model.params',
    'vanilla.nopretrain.dev.predictions',
    'vanilla.nopretrain.test.predictions',
    'vanilla.pretrain.params',
    'vanilla.finetune.params',
    'vanilla.pretrain.dev.predictions',
    'vanilla.pretrain.test.predictions',
    'synthesizer.pretrain.params',
    'synthesizer.finetune.params',
    'synthesizer.pretrain.dev.predictions',
    'synthesizer.pretrain.test.predictions',
]

sources = sorted(glob.glob(os.path.join('src', '*.py')))
if not sources:
    sys.exit('collect_submission.sh: no src/*.py files found in ' + os.getcwd())
present = [name for name in EXPECTED if os.path.isfile(name)]
missing = [name for name in EXPECTED if name not in present]
for name in missing:
    print(f'missing: {name}', file=sys.stderr)

fd, tmp_path = tempfile.mkstemp(prefix='.' + ZIP_NAME + '.', suffix='.tmp', dir='.')
os.close(fd)
try:
    with zipfile.ZipFile(tmp_path, 'w', compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sources + present:
            zf.write(path, arcname=path.replace(os.sep, '/'))
    os.chmod(tmp_path, 0o644)
    os.replace(tmp_path, ZIP_NAME)
except BaseException:
    if os.path.exists(tmp_path):
        os.remove(tmp_path)
    raise

print(f'Wrote {ZIP_NAME}: {len(sources)} source files, {len(present)} of {len(EXPECTED)} '
      f'params/predictions files' + (f' ({len(missing)} missing, listed above)' if missing else ''))
PYEOF
