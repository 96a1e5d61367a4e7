#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv and installs mqirtn with its test/extras dependencies.
# torch comes first and pinned: its CPU wheel is on this machine's disk, and a bare `torch` would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${MQIRTN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==${MQIRTN_TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
# transformers' own common testers for tests/test_transformers_common.py: fetched once, offline afterwards.
bash scripts/fetch_transformers_tests.sh "$VENV/bin/python"
echo "mqirtn installed in $VENV"
