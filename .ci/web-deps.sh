#!/usr/bin/env bash
# Installs what the browser tests (tests/test_web.py) need on a fresh Debian machine:
#   - Debian's chromium (Playwright drives /usr/bin/chromium; it never downloads a browser of its own);
#   - the Python packages gradio (the page, fireflow's `web` extra) and playwright (the driver).
# Idempotent: installs only what is missing. Usage: .ci/web-deps.sh [PYTHON]  (default: $PYTHON or python3)
set -euo pipefail

PYTHON="${1:-${PYTHON:-python3}}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if [ ! -x /usr/bin/chromium ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi

# The same bounds as pyproject's `web` extra (the page uses Gradio 6's API).
if ! "$PYTHON" -c 'import gradio, playwright, sys; sys.exit(int(gradio.__version__.split(".")[0]) != 6)' 2>/dev/null; then
    "$PYTHON" -m pip install -q "gradio>=6,<7" "playwright>=1.45"
fi

/usr/bin/chromium --version
"$PYTHON" -c 'import gradio, playwright; print("gradio", gradio.__version__, "and playwright are installed")'
