#!/usr/bin/env bash
# Installs what the pipeline and the tests need on a fresh machine. Idempotent: a second run is quick.
#   bash tools/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch 2.14.1 + torchvision 0.29.1 come from this machine's local disk (pip is capped at those versions here).
# No -q: a fresh install takes minutes, and pip's own progress says what it is doing.
$PY -m pip install --progress-bar on -r requirements.txt
# Debian packages: chromium + chromedriver (the web UI test drives a real headless browser) and a CJK font
# (fonts-wqy-zenhei, ~10 MB; without one, Chinese queries render as boxes in the browser test's screenshots).
APT_PKGS=()
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  APT_PKGS+=(chromium chromium-driver)
fi
if ! (command -v fc-list >/dev/null 2>&1 && [ -n "$(fc-list :lang=zh 2>/dev/null)" ]); then
  APT_PKGS+=(fonts-wqy-zenhei)
fi
if [ ${#APT_PKGS[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "apt-get install ${APT_PKGS[*]}"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${APT_PKGS[@]}"
  else
    echo "warning: no apt-get: install ${APT_PKGS[*]} by hand (tests/test_webui.py needs chromium; Chinese text" \
         "needs a CJK font)" >&2
  fi
fi
