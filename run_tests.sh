#!/usr/bin/env bash
# Install what the tests need (the app's venv, test packages, Debian chromium) and run the whole suite.
#   ./run_tests.sh              everything
#   ./run_tests.sh -k hub       extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")"

./start_linux.sh --install-only
VPY=.venv/bin/python

STAMP=.venv/.requirements-test.sha256
WANT=$(sha256sum requirements-test.txt | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[hearth] installing requirements-test.txt"
  "$VPY" -m pip install --quiet -r requirements-test.txt
  echo "$WANT" > "$STAMP"
fi

# Browser tests drive Debian's chromium through Playwright (never `playwright install`).
if [ ! -x /usr/bin/chromium ]; then
  echo "[hearth] installing Debian chromium for the browser tests"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

export GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_XET=1
exec "$VPY" -m pytest "$@"
