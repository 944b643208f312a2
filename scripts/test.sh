#!/usr/bin/env bash
# One command from a fresh clone to a passing test suite (CPU; 8 simulated devices where a test asks).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh test
scripts/setup_browser.sh
# Client venvs for the cookbook-recipe and SDK-version tests; TUFT_SKIP_EXTRA_VENVS=1 skips
# building them (those tests then skip), otherwise a missing one fails its tests.
if [ "${TUFT_SKIP_EXTRA_VENVS:-0}" != 1 ]; then
    scripts/setup_extra_venvs.sh
    export TUFT_REQUIRE_EXTRA_VENVS=1
fi
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 TINKER_TELEMETRY=0
exec .venv/bin/python -m pytest "$@"
