#!/usr/bin/env bash
# Installs what the pipeline and the tests need on a fresh machine. Idempotent: a second run is quick.
#   bash tools/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch 2.14.1 + torchvision 0.29.1 come from this machine's local disk (pip is capped at those versions here).
$PY -m pip install -q -r requirements.txt
# The web UI test drives a real headless browser (Debian's chromium + chromedriver).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "warning: chromium/chromedriver not found and no apt-get: tests/test_webui.py will fail" >&2
  fi
fi
