#!/usr/bin/env bash
# One command from a fresh clone to a running server (built-in tiny model on CPU unless
# --model-config is given). Extra arguments go to `tuft`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh
exec .venv/bin/tuft "$@"
