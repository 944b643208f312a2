#!/usr/bin/env bash
# Debian's Chromium and chromedriver for the dashboard's browser test
# (tests/e2e/test_dashboard_browser.py). Installed only when missing and this runs as root with
# apt-get; otherwise nothing happens (that test then skips, or fails under TUFT_REQUIRE_BROWSER=1).
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
