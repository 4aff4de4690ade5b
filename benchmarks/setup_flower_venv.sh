#!/usr/bin/env bash
# Create benchmarks/.venv-flower: the Flower 1.42 side of benchmarks/peer_compare.py.
#
# torch is installed FIRST, so that resolving flwr[simulation] never pulls a multi-GB CUDA build:
# on this machine a CPU wheel (2.13.0+cpu) lies in pip's find-links and pip prefers it to PyPI's
# build. Elsewhere set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to get the CPU build.
# Idempotent: does nothing when everything is already installed.
#
# Usage: bash benchmarks/setup_flower_venv.sh   (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-flower"
PY="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
FLWR_VERSION="1.42.0"

check() {
    "$VENV/bin/python" - "$TORCH_VERSION" "$FLWR_VERSION" <<'EOF' 2>/dev/null
import sys

import flwr
import numpy
import psutil
import ray
import sklearn
import torch

torch_ok = torch.__version__.split("+")[0] == sys.argv[1]
sys.exit(0 if torch_ok and flwr.__version__ == sys.argv[2] else 1)
EOF
}

if [[ -x "$VENV/bin/python" ]] && check; then
    echo "setup_flower_venv: $VENV already has torch $TORCH_VERSION and flwr $FLWR_VERSION"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup_flower_venv: creating $VENV with $("$PY" --version)"
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
# 2. Flower with its Ray simulation extra, and the rest of the peer task's needs.
"${PIP[@]}" install "flwr[simulation]==$FLWR_VERSION" scikit-learn numpy psutil

if ! check; then
    echo "setup_flower_venv: installation finished but the version check failed" >&2
    exit 1
fi
"$VENV/bin/python" -c "import flwr, ray, torch; print('flwr', flwr.__version__, \
'| ray', ray.__version__, '| torch', torch.__version__)"
