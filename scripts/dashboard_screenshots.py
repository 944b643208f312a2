#!/usr/bin/env python3
"""Regenerates docs/dashboard-*.png: runs the dashboard's browser test with its screenshots
directed into docs/ (it trains a run on a fresh local server, then visits every page).

Usage: .venv/bin/python scripts/dashboard_screenshots.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    env = {
        **os.environ,
        "TUFT_DASHBOARD_SCREENSHOTS": str(ROOT / "docs"),
        "TUFT_REQUIRE_BROWSER": "1",
        "JAX_PLATFORMS": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TINKER_TELEMETRY": "0",
    }
    test = "tests/e2e/test_dashboard_browser.py"
    return subprocess.call([sys.executable, "-m", "pytest", test, "-q", "-p", "no:cacheprovider"], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
