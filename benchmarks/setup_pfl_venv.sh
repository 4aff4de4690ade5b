#!/usr/bin/env bash
# Create benchmarks/.venv-pfl: the pfl-research 0.6 side of benchmarks/peer_compare.py and
# benchmarks/compute_compare.py (Apple's "pfl", https://github.com/apple/pfl-research).
#
# torch is installed FIRST, so that resolving pfl[pytorch] never pulls a multi-GB CUDA build:
# on this machine a CPU wheel (2.13.0+cpu) lies in pip's find-links and pip prefers it to PyPI's
# build. Elsewhere set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to get the CPU build.
# Idempotent: does nothing when everything is already installed.
#
# Usage: bash benchmarks/setup_pfl_venv.sh   (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-pfl"
PY="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
PFL_VERSION="0.6.0"

check() {
    "$VENV/bin/python" - "$TORCH_VERSION" "$PFL_VERSION" <<'PYEOF' 2>/dev/null
import importlib.metadata as md
import sys

import numpy
import pfl.algorithm
import pfl.model.pytorch
import psutil
import sklearn
import torch

torch_ok = torch.__version__.split("+")[0] == sys.argv[1]
sys.exit(0 if torch_ok and md.version("pfl") == sys.argv[2] else 1)
PYEOF
}

if [[ -x "$VENV/bin/python" ]] && check; then
    echo "setup_pfl_venv: $VENV already has torch $TORCH_VERSION and pfl $PFL_VERSION"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup_pfl_venv: creating $VENV with $("$PY" --version)"
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip

# 1. torch, CPU build (see above).
TORCH_ARGS=()
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    TORCH_ARGS=(--extra-index-url "$TORCH_INDEX_URL")
fi
"${PIP[@]}" install "torch==$TORCH_VERSION" "${TORCH_ARGS[@]}"
# 2. pfl with its PyTorch extra, and the rest of the peer tasks' needs.
"${PIP[@]}" install "pfl[pytorch]==$PFL_VERSION" scikit-learn numpy psutil

if ! check; then
    echo "setup_pfl_venv: installation finished but the version check failed" >&2
    exit 1
fi
"$VENV/bin/python" -c "import importlib.metadata as m, torch; print('pfl', m.version('pfl'), \
'| torch', torch.__version__)"
