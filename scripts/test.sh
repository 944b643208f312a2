#!/usr/bin/env bash
# One command from a fresh clone to a passing test suite (CPU; 8 simulated devices where a test asks).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh test
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 TINKER_TELEMETRY=0
exec .venv/bin/python -m pytest "$@"
