#!/usr/bin/env bash
# Creates (or reuses) the extra venvs that some tests run client code in:
#   .venv-cookbook  tinker-cookbook 0.6.1 + CPU torch, for tests/recipes (real cookbook recipes)
#   .venv-sdk-old   the oldest supported tinker SDK, for tests/e2e/test_sdk_versions.py
# Each is rebuilt only when its pinned requirements change (a stamp records their hash), so a
# second run costs well under a second. scripts/test.sh calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

# ensure_venv DIR REQUIREMENTS [EXTRA PIP ARGS FOR A --no-deps INSTALL...]
ensure_venv() {
    local dir=$1 requirements=$2
    shift 2
    local stamp="$dir/.tuft-requirements.sha256"
    local want
    want=$(cat "$requirements" <(echo "$*") | sha256sum | cut -d' ' -f1)
    if [ -x "$dir/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return
    fi
    echo "setting up $dir from $requirements" >&2
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --upgrade pip
    "$dir/bin/python" -m pip install --quiet -r "$requirements"
    if [ $# -gt 0 ]; then
        "$dir/bin/python" -m pip install --quiet --no-deps "$@"
    fi
    echo "$want" > "$stamp"
}

# tinker-cookbook 0.6.1 requires tml-renderers>=0.4.1, which PyPI lacks, so its dependencies
# are pinned in the requirements file and the package itself goes in without them.
ensure_venv .venv-cookbook tests/recipes/requirements-cookbook.txt tinker-cookbook==0.6.1
ensure_venv .venv-sdk-old tests/e2e/requirements-sdk-old.txt
