#!/usr/bin/env bash
# The main job: installs into .venv, then trains and evaluates MQIRTN on the built-in shapes benchmark
# (`accelerate launch train.py` with no arguments = the embedded default, CPU-friendly). Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One OpenMP thread per process, as in the measured runs: on a shared 2-core machine two threads that wait on each
# other were up to 10x slower. Set OMP_NUM_THREADS yourself on an idle or bigger machine.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no train.py "$@"
