#!/usr/bin/env bash
# Installs everything atscale needs on a fresh Debian machine (run as root, or with sudo available):
# FFCV's system libraries, the pinned torch/torchvision, then atscale itself (editable) with its Python dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq pkg-config libturbojpeg0-dev libopencv-dev >/dev/null
fi
PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
"$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi  # pyenv creates the `atscale` shim only on rehash
"$PY" -c "import ffcv.loader, timm, torch; print('atscale install ok: torch', torch.__version__, 'timm', timm.__version__)"
