#!/usr/bin/env bash
# The test command: installs into .venv, then runs the whole suite (tiny random models, CPU, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest tests "$@"
