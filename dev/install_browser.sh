#!/usr/bin/env bash
# Headless Chromium for tests/test_ui_browser.py, from the distribution's packages (Playwright drives it).
# Never fails: without a browser that one test skips and says why.
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo -n"; fi
if command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium for the browser test (apt-get)..."
    (timeout 240 $SUDO apt-get install -y -q chromium \
        || (timeout 120 $SUDO apt-get update -q && timeout 240 $SUDO apt-get install -y -q chromium)) \
        >/tmp/nanochat_chromium_install.log 2>&1 \
        || echo "could not install chromium (see /tmp/nanochat_chromium_install.log): the browser test will skip"
else
    echo "no apt-get here: install Chromium yourself to run the browser test (it will skip)"
fi
exit 0
